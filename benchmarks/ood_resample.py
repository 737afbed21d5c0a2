"""How much the shipped detector's flag rates move with the 1,000 training images it is fitted on.

    python benchmarks/ood_resample.py src/pneumonia_cnn/builtin/best.pt [--samples 5]

For each seed, the end-of-run recipe (``OODDetector.fit`` on 1,000 training images drawn with that seed, its
threshold on val) is refitted on the checkpoint's own network, and the fractions flagged are measured on val,
the shared test folder and each adult_xray_dev source. Seed 0 is the sample that ``train --seed 0`` draws.
Features come from the torch forward (``ood.extract``); the served ONNX path agrees to within rounding.
Writes benchmarks/ood_resample.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))
sys.path.insert(0, str(PROJECT / "benchmarks"))

from ood_study import load_pixels  # noqa: E402

from pneumonia_cnn import ood  # noqa: E402
from pneumonia_cnn.checkpoint import build_model, load_checkpoint  # noqa: E402
from pneumonia_cnn.training.finish import MAX_OOD_FIT_IMAGES  # noqa: E402

REPORTED = ("val", "test", "covid_collection", "actualmed")


def refit(model, sets: dict, features: dict, seed: int, quantile: float) -> dict:
    chosen = np.sort(np.random.default_rng(seed).permutation(len(sets["train"]["pixels"]))[:MAX_OOD_FIT_IMAGES])
    fit = {"features": [f[chosen] for f in features["train"][0]], "logits": features["train"][1][chosen],
           "pixels": sets["train"]["pixels"][chosen], "labels": sets["train"]["labels"][chosen]}
    held = {"features": features["val"][0], "logits": features["val"][1], "pixels": sets["val"]["pixels"]}
    detector = ood.OODDetector.fit(model, fit, held, quantile=quantile, seed=seed)
    return {name: float(np.mean(detector.flagged(detector.score(features[name][0])))) for name in REPORTED}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "data" / "chest_xray_224")
    parser.add_argument("--adults", type=Path, default=PROJECT.parent / "shared" / "data" / "adult_xray_dev")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "ood_resample.json")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    model = build_model(checkpoint).eval()
    sets = load_pixels(checkpoint, args.data, args.adults, None)
    taps = ood.default_taps(model)
    features = {name: ood.extract(model, entry["pixels"], taps) for name, entry in sets.items()}
    quantile = float(checkpoint["config"].get("ood_quantile", 0.95))
    rows = []
    for seed in range(args.samples):
        rates = refit(model, sets, features, seed, quantile)
        rows.append({"seed": seed, **{f"flagged_{name}": rate for name, rate in rates.items()}})
        print(" ".join(f"{k} {v:.1%}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    summary = {f"flagged_{name}": [min(r[f"flagged_{name}"] for r in rows), max(r[f"flagged_{name}"] for r in rows)]
               for name in REPORTED}
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "method": ood.METHOD, "taps": taps,
                                    "images_per_sample": MAX_OOD_FIT_IMAGES, "rows": rows, "range": summary},
                                   indent=2) + "\n")
    print(f"range over {args.samples} samples: " + ", ".join(f"{k} {lo:.1%}-{hi:.1%}" for k, (lo, hi) in
                                                              summary.items()) + f"; written: {args.out}")


if __name__ == "__main__":
    main()
