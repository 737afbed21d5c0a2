"""Put a trained run into the package as the built-in model, with its model card and example X-rays.

    pneumonia-cnn train --data ../shared/data/chest_xray_224 --out runs/builtin --preset best --seed 0
    python benchmarks/builtin_model.py runs/builtin

Copies RUN/best.pt to src/pneumonia_cnn/builtin/best.pt and writes card.json beside it: the file's SHA-256,
the training configuration, the data's license and attribution, the intended use, the figures on the shared
`test` folder with 95% intervals (scored by this machine's served path, as `evaluate` does), the
out-of-distribution flag rates, and the command that retrains it. Four shared `test` X-rays it gets right and
in distribution (two per class) become the packaged examples.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn import builtin  # noqa: E402
from pneumonia_cnn.checkpoint import load_checkpoint  # noqa: E402
from pneumonia_cnn.evaluation.evaluate import evaluate  # noqa: E402
from pneumonia_cnn.inference import Predictor  # noqa: E402

FOLDER = PROJECT / "src" / "pneumonia_cnn" / "builtin"
DATA = {"name": "Chest X-Ray Images (Pneumonia), the Kaggle set by Paul Mooney",
        "attribution": "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
                       "Images for Classification. Mendeley Data, v2 (2018), doi:10.17632/rscbjbr9sj.2",
        "license": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
        "split": "the dataset's train split, divided by patient into train 4,137 / val 559 / test 520 images "
                 "(../shared/data/chest_xray_224)"}
REPRODUCE = ("pneumonia-cnn train --data ../shared/data/chest_xray_224 --out runs/builtin --preset best --seed 0 "
             "&& python benchmarks/builtin_model.py runs/builtin")
METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc", "pr_auc", "ece", "brier")


def figures(data: Path) -> dict:
    report = evaluate("builtin", data, "test", device="cpu", bootstrap=1000, figures=False)
    shared_test = {k: report["metrics"][k] for k in METRICS}
    shared_test.update(threshold=report["threshold"], images=report["n_images"], patients=report["n_patients"],
                       flagged_out_of_distribution=report["ood"]["fraction_flagged"])
    adults = data.parent / "adult_xray_dev"
    rates = {}
    for source in ("covid_collection", "actualmed"):
        files = sorted((adults / source).glob("*.jpeg"))
        if files:
            flags = [p.in_distribution is False for p in Predictor("builtin", "cpu").predict_files(files)]
            rates[source] = {"images": len(files), "flagged": float(np.mean(flags))}
    return {"shared_test": shared_test, "adult_xray_dev_flagged": rates, "report": report}


def choose_examples(report: dict, count: int = 2) -> list[Path]:
    """The first ``count`` images per class, by file name, that the model gets right and in distribution."""
    chosen = []
    for label in (0, 1):
        right = sorted(p["path"] for p in report["predictions"] if p["label"] == label and not p["flagged"]
                       and (p["probability"] >= report["threshold"]) == bool(label))
        chosen += [Path(p) for p in right[:count]]
    return chosen


def write_examples(paths: list[Path]):
    folder = FOLDER / "examples"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    lines = ["# Example X-rays", "", f"From {DATA['name']}: {DATA['attribution']}. License: {DATA['license']}.",
             "The files of ../shared/data/chest_xray_224/test, copied byte for byte (224x224): images the model",
             "never trained on, from patients of the dataset's train split (the shared data re-splits it by patient;",
             "the dataset's own test split is kept aside). The file name starts with the dataset's label.", ""]
    for path in paths:
        target = folder / f"{path.parent.name}_{path.name}"
        shutil.copyfile(path, target)
        lines.append(f"- `{target.name}`: `{path.parent.name}/{path.name}`")
    (folder / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    args = parser.parse_args()
    run = Path(args.run)
    source = run / "best.pt" if run.is_dir() else run
    shutil.copyfile(source, builtin.checkpoint_path())
    checkpoint = load_checkpoint("builtin")
    measured = figures(Path(args.data))
    write_examples(choose_examples(measured.pop("report")))
    config = checkpoint["config"]
    card = {"run_id": checkpoint["run_id"], "sha256": builtin.sha256(),
            "bytes": builtin.checkpoint_path().stat().st_size,
            "model": {"name": checkpoint["model"]["name"], "parameters": checkpoint.get("parameters"),
                      "input": checkpoint["preprocessing"]},
            "training": {"preset": config["preset"], "seed": config["seed"], "epochs_run": len(checkpoint["history"]),
                         "best_epoch": checkpoint["epoch"], "device": checkpoint.get("decision_fit", {}).get("device"),
                         "config": config},
            "decision": {"threshold": checkpoint["threshold"], "policy": checkpoint["threshold_policy"],
                         "calibration": checkpoint["calibration"]},
            "data": DATA, "intended_use": checkpoint["intended_use"], "figures": measured, "reproduce": REPRODUCE,
            "not_a_medical_device": True}
    (FOLDER / "card.json").write_text(json.dumps(card, indent=2, default=float) + "\n")
    print(json.dumps({k: card[k] for k in ("run_id", "sha256", "bytes", "figures")}, indent=2, default=float))


if __name__ == "__main__":
    main()
