"""Out-of-distribution flag rates of a checkpoint: prints a table and writes JSON.

    python benchmarks/ood.py runs/best/best.pt [--data ../shared/data/chest_xray_224]

In distribution: the data's test folder. Outside it, built from what is at hand: photographs and documents
that ship with scikit-image, blank and noise images, inverted X-rays, crops of other regions (corners, small
tiles) of the X-rays themselves, and the stress panel's shifts of the test X-rays. For each group: the
fraction flagged and the ROC AUC of the OOD score for telling the group from the test folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn.data.cache import build_or_load  # noqa: E402
from pneumonia_cnn.data.dataset import load_split  # noqa: E402
from pneumonia_cnn.data.intensity import standardise_intensity  # noqa: E402
from pneumonia_cnn.data.readers import ImageMeta  # noqa: E402
from pneumonia_cnn.evaluation.stress import SHIFT_PANEL  # noqa: E402
from pneumonia_cnn.inference import Predictor  # noqa: E402


def resize(gray, size):
    return np.asarray(Image.fromarray(gray).resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)


def flags(predictor, raw_images, metas=None):
    intensity = predictor.preprocessing.get("intensity", "none")
    pixels = np.stack([standardise_intensity(resize(g, predictor.size), intensity) for g in raw_images])
    checks = predictor.check_inputs(pixels, metas)
    flagged = np.array([not c.get("in_distribution", True) for c in checks])
    return flagged, np.array([c.get("ood_score", 0) for c in checks])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "ood_results.json"))
    args = parser.parse_args()
    from skimage import data as skimage_data
    predictor = Predictor(args.checkpoint, "cpu")
    test = build_or_load(load_split(args.data, args.split), predictor.size, intensity="none")
    raw = np.asarray(test.images)
    in_flags, in_scores = flags(predictor, raw)
    groups = {}
    photos = {n: getattr(skimage_data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins",
                                                       "moon", "text", "page", "horse", "hubble_deep_field")}
    gray_photos, metas = [], []
    for image in photos.values():
        image = np.asarray(image)
        if image.dtype == bool:
            image = (image * 255).astype(np.uint8)
        color = image.ndim == 3
        gray = np.asarray(Image.fromarray(image).convert("L"))
        gray_photos.append(gray)
        saturation = float(np.asarray(Image.fromarray(image).convert("HSV"))[..., 1].mean() / 255) if color else 0.0
        metas.append(ImageMeta("PNG", gray.shape, saturation=saturation))
    groups["photographs and documents (scikit-image)"] = (gray_photos, metas)
    rng = np.random.default_rng(0)
    groups["blank and noise"] = ([np.full((224, 224), v, np.uint8) for v in (0, 128, 255)] +
                                 [rng.integers(0, 256, (224, 224), dtype=np.uint8) for _ in range(3)], None)
    sample = raw[rng.permutation(len(raw))[:60]]
    groups["inverted X-rays"] = ([255 - g for g in sample], None)
    h, w = raw.shape[1:]
    groups["corner crops of X-rays"] = ([resize(g[: h // 3, : w // 3], (h, w)) for g in sample], None)
    tile = (slice(h // 2 - h // 8, h // 2 + h // 8), slice(w // 3 - w // 8, w // 3 + w // 8))
    groups["small tiles of X-rays"] = ([resize(g[tile], (h, w)) for g in sample], None)
    for shift, transform in SHIFT_PANEL.items():
        groups[f"shift: {shift}"] = ([transform(g, i) for i, g in enumerate(sample)], None)
    rows = [{"group": f"in distribution: {args.split} folder", "images": int(len(raw)),
             "flagged": float(in_flags.mean()), "auc_vs_test": None}]
    for name, (images, metas) in groups.items():
        group_flags, scores = flags(predictor, images, metas)
        auc = roc_auc_score(np.r_[np.zeros(len(in_scores)), np.ones(len(scores))], np.r_[in_scores, scores])
        rows.append({"group": name, "images": len(images), "flagged": float(group_flags.mean()),
                     "auc_vs_test": float(auc)})
    width = max(len(r["group"]) for r in rows) + 2
    print(f"{'group':<{width}}{'images':>7}{'flagged':>9}{'OOD-score AUC vs test':>23}")
    for r in rows:
        auc = f"{r['auc_vs_test']:.3f}" if r["auc_vs_test"] is not None else "-"
        print(f"{r['group']:<{width}}{r['images']:>7}{r['flagged']:>9.1%}{auc:>23}")
    Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
