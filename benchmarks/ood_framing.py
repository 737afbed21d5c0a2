"""How the out-of-distribution flag holds when the framing of an X-ray changes (docs/ood.md, "Framing").

    git show 10e6918:src/pneumonia_cnn/builtin/best.pt > /tmp/builtin_3views.pt
    python benchmarks/ood_framing.py /tmp/builtin_3views.pt builtin --out benchmarks/ood_framing.json

Every adult X-ray of ``adult_xray_dev`` (both sources) and every second image of the shared ``test`` folder
(children, in distribution) is changed as an unseen batch could be (black bands down the sides, painted
sides, a border, bands at top and bottom, a rotation, a shift, noise), then preprocessed and scored as
``predict`` does (``Preprocessing.from_gray``, ``Scorer.score``, the checkpoint's stored detector). Printed per
change: the share of adults flagged (each source) and of children flagged (false alarms). The noise is drawn
from a fixed seed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn.errors import PneumoniaCNNError  # noqa: E402
from pneumonia_cnn.inference.bundle import load_bundle  # noqa: E402
from pneumonia_cnn.inference.scorer import Scorer  # noqa: E402

SHARED = PROJECT.parent / "shared" / "data"


def _sides(gray: np.ndarray, width_ratio: float) -> np.ndarray:
    """Black bands left and right, the canvas ``width_ratio`` times as wide."""
    extra = max(int(round(gray.shape[1] * width_ratio)) - gray.shape[1], 0)
    return np.pad(gray, ((0, 0), (extra // 2, extra - extra // 2)))


def _four_by_three(gray: np.ndarray) -> np.ndarray:
    return _sides(gray, max(4 / 3 * gray.shape[0] / gray.shape[1], 1.0))


def _painted(gray: np.ndarray, share: float) -> np.ndarray:
    out = gray.copy()
    cut = int(round(gray.shape[1] * share))
    out[:, :cut] = 0
    out[:, gray.shape[1] - cut:] = 0
    return out


def _noisy(gray: np.ndarray, sigma: float, rng) -> np.ndarray:
    return np.clip(gray + rng.normal(0, sigma, gray.shape), 0, 255).astype(np.uint8)


def _shifted(gray: np.ndarray, share: float) -> np.ndarray:
    cut = int(round(gray.shape[1] * share))
    if cut == 0:  # an image under 10 pixels wide: nothing to shift by
        return gray.copy()
    out = np.zeros_like(gray)
    out[:, cut:] = gray[:, :-cut]
    return out


def changes(rng) -> dict:
    border = lambda g: np.pad(g, int(round(g.shape[1] * 0.05)))  # noqa: E731
    return {"none": lambda g: g,
            "black side bands, canvas 1.1 wide": lambda g: _sides(g, 1.1),
            "black side bands, canvas 1.2 wide": lambda g: _sides(g, 1.2),
            "black side bands, canvas 4:3": _four_by_three,
            "8% of each side painted black": lambda g: _painted(g, 0.08),
            "15% of each side painted black": lambda g: _painted(g, 0.15),
            "noise sigma 10 and side bands 4:3": lambda g: _noisy(_four_by_three(g), 10, rng),
            "noise sigma 10": lambda g: _noisy(g, 10, rng),
            "black border all round, 5%": border,
            "black bands top and bottom, canvas 1.2 tall": lambda g: np.pad(
                g, ((int(round(g.shape[0] * 0.1)),) * 2, (0, 0))),
            "rotated 5 degrees": lambda g: ndimage.rotate(g, 5, reshape=False, order=1, cval=0),
            "rotated 10 degrees": lambda g: ndimage.rotate(g, 10, reshape=False, order=1, cval=0),
            "shifted 5% sideways": lambda g: _shifted(g, 0.05)}


def flag_rates(checkpoint: str, bundle, grays: dict[str, list[np.ndarray]], seed: int) -> dict:
    scorer = Scorer(bundle, "cpu")
    rates = {}
    for name, change in changes(np.random.default_rng(seed)).items():
        row = {}
        for group, images in grays.items():
            scores = scorer.score(np.stack([bundle.preprocessing.from_gray(change(g)) for g in images]))
            row[group] = float(np.mean(bundle.ood.flagged(bundle.ood.score(scores.features))))
        rates[name] = row
        print(f"{checkpoint}: {name:45s} " + "  ".join(f"{g} {v:6.1%}" for g, v in row.items()), flush=True)
    return {"detector": bundle.ood.method, "taps": bundle.ood.taps, "rates": rates}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    try:
        grays = read_sets(Path(args.data))
        bundles = {c: load_bundle(c) for c in args.checkpoints}  # every checkpoint checked before the long part
    except (PneumoniaCNNError, OSError) as error:
        sys.exit(f"error: {error}")
    results = {"images": {g: len(v) for g, v in grays.items()},
               "checkpoints": {c: flag_rates(c, bundle, grays, args.seed) for c, bundle in bundles.items()}}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def read_sets(data: Path) -> dict[str, list[np.ndarray]]:
    folders = {source: (data / "adult_xray_dev" / source, "*.jpeg") for source in ("covid_collection", "actualmed")}
    folders["children (shared test, every second)"] = (data / "chest_xray_224" / "test", "*/*.jpeg")  # class folders
    paths = {name: sorted(folder.glob(pattern)) for name, (folder, pattern) in folders.items()}
    for name, found in paths.items():
        if not found:
            raise PneumoniaCNNError(f"{folders[name][0]}: no .jpeg X-rays (give --data, the folder holding "
                                    "chest_xray_224 and adult_xray_dev)")
    paths["children (shared test, every second)"] = paths["children (shared test, every second)"][::2]
    return {name: [np.asarray(Image.open(p).convert("L")) for p in found] for name, found in paths.items()}


if __name__ == "__main__":
    main()
