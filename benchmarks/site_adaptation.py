"""Adaptation to a simulated new site: python benchmarks/site_adaptation.py runs/best/best.pt

The site is the shared X-rays under a fixed, strong acquisition shift (tighter collimation, blur, a
different exposure curve and noise). Unlabelled images: the shifted ``test`` folder. Labelled: 50 shifted
``val`` images per class. Prints the model before and after ``adapt`` on the whole shifted test folder
(images never used by the adaptation), and the out-of-distribution flag rates.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn.adaptation import adapt, format_adaptation  # noqa: E402
from pneumonia_cnn.evaluation import stress  # noqa: E402
from pneumonia_cnn.evaluation.evaluate import evaluate  # noqa: E402


def site_shift(gray, index):
    shifted = stress.border_crop(gray, 0.12)
    shifted = stress.blur(shifted, 1.5)
    shifted = stress.gamma(shifted, 1.5)
    return stress.noise(shifted, 0.03, index)


def write_site(source: Path, target: Path, per_class=None, labelled=True):
    for name in ("NORMAL", "PNEUMONIA"):
        files = sorted((source / name).iterdir())
        if per_class:
            files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:per_class]]
        for index, path in enumerate(files):
            gray = np.asarray(Image.open(path).convert("L"))
            out = (target / name / path.name) if labelled else (target / f"{name}_{path.name}")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(site_shift(gray, index)).save(out.with_suffix(".png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "site_adaptation.json"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="site-"))
    data = Path(args.data)
    write_site(data / "test", folder / "site_test", labelled=True)
    write_site(data / "test", folder / "site_unlabelled", labelled=False)
    write_site(data / "val", folder / "site_labelled", per_class=args.per_class)
    result = adapt(args.checkpoint, folder / "site_unlabelled", folder / "adapted.pt",
                   labelled=folder / "site_labelled", device="cpu", recalibrate=True)
    print(format_adaptation(result))
    rows = {}
    for name, checkpoint in (("original", args.checkpoint), ("adapted", folder / "adapted.pt")):
        report = evaluate(checkpoint, folder / "site_test", None, device="cpu", bootstrap=500, figures=False)
        m = report["metrics"]
        rows[name] = {k: m[k] for k in ("roc_auc", "accuracy", "sensitivity", "specificity")}
        rows[name]["flagged"] = report["ood"]["fraction_flagged"]
        print(f"{name:>9} on the shifted test folder ({report['n_images']} images): ROC AUC "
              f"{m['roc_auc']['value']:.3f} [{m['roc_auc']['ci95'][0]:.3f}, {m['roc_auc']['ci95'][1]:.3f}]  accuracy "
              f"{m['accuracy']['value']:.3f}  sensitivity {m['sensitivity']['value']:.3f}  specificity "
              f"{m['specificity']['value']:.3f}  flagged out-of-distribution {report['ood']['fraction_flagged']:.1%}")
    Path(args.out).write_text(json.dumps({"adapt": result, "shifted_test": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
