"""From score to decision, measured: python benchmarks/decision.py runs/best/best.pt

1. The operating point on val: the threshold the policy picks now, and the one the earlier rule picked (the
   first point of ``roc_curve`` reaching the target, whose dropped collinear points could skip past it).
2. Calibration: each method's log loss and ECE on val (5-fold, from the checkpoint) and on the shared `test`
   folder (fitted on all of val).
3. The shared `test` folder at the saved threshold.
4. The stress panel at the saved threshold, plain and with ``--adapt-batch`` (each shifted folder is one
   site's batch).
5. Simulated sites (a strong acquisition shift of the `test` folder, at its own pneumonia rate and at 30%):
   plain, ``--prevalence estimate``, ``--adapt-batch``, and both.
Prints markdown tables and writes JSON beside this file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn.calibration import expected_calibration_error, fit_calibration, log_loss  # noqa: E402
from pneumonia_cnn.checkpoint import load_checkpoint  # noqa: E402
from pneumonia_cnn.data.cache import build_or_load  # noqa: E402
from pneumonia_cnn.data.dataset import load_split  # noqa: E402
from pneumonia_cnn.data.intensity import standardise_intensity  # noqa: E402
from pneumonia_cnn.evaluation import stress  # noqa: E402
from pneumonia_cnn.evaluation.metrics import bootstrap_metrics  # noqa: E402
from pneumonia_cnn.inference import Predictor  # noqa: E402
from pneumonia_cnn.metrics import point_metrics  # noqa: E402


def earlier_rule(labels, probabilities, target):
    """What calibration.choose_threshold did before: the first ROC point (drop_intermediate) reaching X."""
    from sklearn.metrics import roc_curve
    _, tpr, thresholds = roc_curve(labels, probabilities)
    return float(np.minimum(thresholds, 1.0)[np.where(tpr >= target)[0][0]])


def operating_point(checkpoint) -> dict:
    reference = checkpoint["reference"]["val"]
    labels, raw = np.array(reference["labels"]), np.array(reference["raw_scores"])
    probabilities = fit_calibration(labels, raw, checkpoint["calibration"]["method"]).probabilities(raw)
    target = float(checkpoint["threshold_policy"].split(":")[1]) if ":" in checkpoint["threshold_policy"] else None
    rows = {"now": checkpoint["threshold"]}
    if checkpoint["threshold_policy"].startswith("sensitivity"):
        rows["earlier rule"] = earlier_rule(labels, probabilities, target)
    return {name: {"threshold": t, "val_sensitivity": float((probabilities[labels == 1] >= t).mean()),
                   "val_specificity": float((probabilities[labels == 0] < t).mean())} for name, t in rows.items()}


def calibration_table(checkpoint, test_raw, test_labels) -> dict:
    reference = checkpoint["reference"]["val"]
    labels, raw = np.array(reference["labels"]), np.array(reference["raw_scores"])
    table = {}
    for method, cv in checkpoint["decision_fit"]["calibration_comparison"].items():
        p = fit_calibration(labels, raw, method).probabilities(test_raw)
        table[method] = {"val_cv_log_loss": cv["log_loss"], "val_cv_ece": cv["ece"],
                         "test_log_loss": log_loss(test_labels, p),
                         "test_ece": expected_calibration_error(test_labels, p)}
    return table


def decide(predictor, pixels, labels) -> dict:
    entries, notes = predictor.assess(pixels)
    probabilities = np.array([e["probability"] for e in entries])
    predicted = [e["label"] == predictor.class_names[1] for e in entries]  # the labels as decided
    metrics = point_metrics(labels, probabilities, entries[0]["threshold"], predicted)
    return {k: metrics[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "ece")} | {"notes": notes}


def stress_rows(checkpoint_path, raw_images, labels, intensity) -> list[dict]:
    plain, adapted = Predictor(checkpoint_path, "cpu"), Predictor(checkpoint_path, "cpu", adapt_batch=True)
    rows = []
    for name, transform in [("none", None), *stress.SHIFT_PANEL.items()]:
        pixels = np.stack([standardise_intensity(transform(g, i) if transform else g, intensity)
                           for i, g in enumerate(raw_images)])
        rows.append({"shift": name, "plain": decide(plain, pixels, labels),
                     "adapt_batch": decide(adapted, pixels, labels)})
    return rows


def site_shift(gray, index):
    """The simulated site of benchmarks/site_adaptation.py: tighter collimation, blur, exposure, noise."""
    return stress.noise(stress.gamma(stress.blur(stress.border_crop(gray, 0.12), 1.5), 1.5), 0.03, index)


def site_rows(checkpoint_path, raw_images, labels, intensity) -> list[dict]:
    """Each batch scored plain, with the rate given, with it estimated (EM), with AdaBN, and with both."""
    shifted = np.stack([standardise_intensity(site_shift(g, i), intensity) for i, g in enumerate(raw_images)])
    unshifted = np.stack([standardise_intensity(g, intensity) for g in raw_images])
    rng = np.random.default_rng(0)
    negatives, positives = np.where(labels == 0)[0], np.where(labels == 1)[0]
    low = np.sort(np.concatenate([negatives, rng.choice(positives, int(len(negatives) * 0.3 / 0.7), replace=False)]))
    batches = (("test folder at 30% pneumonia", unshifted, low), ("simulated site", shifted, np.arange(len(labels))),
               ("simulated site at 30% pneumonia", shifted, low))
    rows = []
    for site, pixels, chosen in batches:
        rate = float(labels[chosen].mean())
        for name, options in (("plain", {}), (f"--prevalence {rate:.2f} (given)", {"prevalence": rate}),
                              ("--prevalence estimate", {"prevalence": "estimate"}),
                              ("--adapt-batch", {"adapt_batch": True}),
                              ("--adapt-batch --prevalence estimate", {"prevalence": "estimate", "adapt_batch": True})):
            row = decide(Predictor(checkpoint_path, "cpu", **options), pixels[chosen], labels[chosen])
            rows.append({"site": site, "rate": rate, "options": name, **row})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "decision.json"))
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    predictor = Predictor(args.checkpoint, "cpu")
    pre = predictor.bundle.preprocessing
    images = load_split(args.data, "test", class_names=predictor.class_names)
    raw = build_or_load(images, pre.size, pre.interpolation, "none")
    test = build_or_load(images, pre.size, pre.interpolation, pre.intensity)
    scores = predictor.score(test.images)
    result = {"checkpoint": args.checkpoint, "operating_point": operating_point(checkpoint),
              "calibration": calibration_table(checkpoint, scores.raw, test.labels),
              "test": {k: v for k, v in bootstrap_metrics(test.labels, scores.probabilities, predictor.threshold,
                                                          groups=test.patients, resamples=1000).items()
                       if k in ("accuracy", "sensitivity", "specificity", "roc_auc", "ece")},
              "stress": stress_rows(args.checkpoint, np.asarray(raw.images), raw.labels, pre.intensity),
              "sites": site_rows(args.checkpoint, np.asarray(raw.images), raw.labels, pre.intensity)}
    Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    print_tables(result)


def print_tables(result):
    print("| operating point on val | threshold | val sensitivity | val specificity |\n|---|---|---|---|")
    for name, row in result["operating_point"].items():
        print(f"| {name} | {row['threshold']:.4f} | {row['val_sensitivity']:.3f} | {row['val_specificity']:.3f} |")
    print("\n| calibration | val log loss (5-fold) | val ECE (5-fold) | test log loss | test ECE |")
    print("|---|---|---|---|---|")
    for method, row in result["calibration"].items():
        print(f"| {method} | {row['val_cv_log_loss']:.4f} | {row['val_cv_ece']:.4f} | {row['test_log_loss']:.4f} | "
              f"{row['test_ece']:.4f} |")
    print("\n" + " ".join(f"{k} {v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                          for k, v in result["test"].items()))
    print("\n| shift | plain: sens / spec | --adapt-batch: sens / spec |\n|---|---|---|")
    for row in result["stress"]:
        p, a = row["plain"], row["adapt_batch"]
        print(f"| {row['shift']} | {p['sensitivity']:.3f} / {p['specificity']:.3f} | "
              f"{a['sensitivity']:.3f} / {a['specificity']:.3f} |")
    print("\n| site | options | accuracy | sensitivity | specificity | ROC AUC | ECE | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["sites"]:
        print(f"| {row['site']} ({row['rate']:.2f}) | {row['options']} | {row['accuracy']:.3f} | "
              f"{row['sensitivity']:.3f} | {row['specificity']:.3f} | {row['roc_auc']:.3f} | {row['ece']:.3f} | "
              f"{'; '.join(row['notes'])} |")


if __name__ == "__main__":
    main()
