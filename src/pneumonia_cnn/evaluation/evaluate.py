"""``evaluate``: predictions on a labelled split (folder or CSV) -> metrics with intervals, JSON, pictures."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..checkpoint import load_checkpoint, save_checkpoint
from ..calibration import choose_threshold
from ..data.cache import build_or_load
from ..data.dataset import has_patient_ids, load_split
from ..errors import DatasetError, PneumoniaCNNError
from ..fileio import display_path, write_json_atomic
from ..inference import Predictor
from .metrics import bootstrap_metrics, per_patient

log = logging.getLogger(__name__)


def cached_split(predictor: Predictor, data, split, cache_dir=None, progress=False):
    images = load_split(data, split, class_names=predictor.class_names)
    return build_or_load(images, predictor.size, predictor.preprocessing.get("interpolation", "bilinear"),
                         predictor.preprocessing.get("intensity", "none"), cache_dir=cache_dir, progress=progress)


def fit_threshold_on_validation(checkpoint_path, data, policy: str, device="auto", cache_dir=None,
                                val_split: str = "val") -> float:
    """Choose the operating threshold on the *validation* split only and save it into the checkpoint."""
    if val_split == "test":
        raise PneumoniaCNNError("the threshold is never chosen on the test split")
    predictor = Predictor(checkpoint_path, device)
    try:
        val = cached_split(predictor, data, val_split, cache_dir)
    except DatasetError as error:
        raise PneumoniaCNNError(f"--threshold {policy} needs a validation split: {error}") from None
    probabilities = predictor.predict_arrays(val.images)
    threshold = choose_threshold(val.labels, probabilities, policy)
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint["threshold"] = threshold
    checkpoint["threshold_policy"] = f"{policy} (chosen on {val_split}, {len(val)} images)"
    path = checkpoint.pop("path")
    save_checkpoint(checkpoint, path)
    return threshold


def evaluate(checkpoint, data, split: str = "test", device: str = "auto", threshold: str | None = None,
             bootstrap: int = 1000, seed: int = 0, cache_dir=None, out=None, figures=True, batch_size: int = 64,
             progress: bool = False) -> dict:
    """Evaluate one checkpoint or an ensemble (a list) on ``data``/``split``; returns the report dict.

    ``threshold``: None uses the threshold saved in the run; a policy (``youden``, ``sensitivity:0.95``,
    a number) is chosen on the data's ``val`` split, never on the split evaluated, and saved into the run.
    """
    checkpoints = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    if threshold is not None and str(threshold) != "saved":
        if len(checkpoints) > 1:
            raise PneumoniaCNNError("choose thresholds per run before ensembling")
        try:
            value = float(threshold)
            checkpoint_data = load_checkpoint(checkpoints[0])
            checkpoint_data["threshold"], checkpoint_data["threshold_policy"] = value, f"{value} (given)"
            save_checkpoint(checkpoint_data, checkpoint_data.pop("path"))
        except ValueError:
            fit_threshold_on_validation(checkpoints[0], data, threshold, device, cache_dir)
    predictor = Predictor(checkpoints, device)
    cached = cached_split(predictor, data, split, cache_dir, progress)
    if len(cached) == 0:
        raise DatasetError(f"{display_path(data)}: no readable images in split {split}")
    probabilities = predictor.predict_arrays(cached.images, batch_size, progress)
    labels = cached.labels
    groups = cached.patients if has_patient_ids(cached.paths) else None
    metrics = bootstrap_metrics(labels, probabilities, predictor.threshold, groups=groups, resamples=bootstrap,
                                seed=seed)
    report = {"checkpoint": [str(c.get("path")) for c in predictor.checkpoints], "model_id": predictor.model_id,
              "data": str(data), "split": split, "n_images": int(len(labels)),
              "counts": {name: int((labels == i).sum()) for i, name in enumerate(predictor.class_names)},
              "n_patients": len(set(cached.patients)), "threshold": predictor.threshold,
              "threshold_policy": predictor.checkpoints[0].get("threshold_policy", "0.5"),
              "temperature": predictor.temperatures, "bootstrap": {"resamples": bootstrap, "seed": seed,
                                                                    "unit": "patient" if groups else "image"},
              "metrics": metrics, "skipped": [{"path": p, "reason": r} for p, r in cached.skipped]}
    if groups is not None:
        patient_labels, patient_scores, _ = per_patient(labels, probabilities, cached.patients)
        report["patient_metrics"] = bootstrap_metrics(patient_labels, patient_scores, predictor.threshold,
                                                      resamples=bootstrap, seed=seed)
    checks = predictor.check_inputs(np.asarray(cached.images))
    flagged = [not c.get("in_distribution", True) for c in checks]
    report["ood"] = {"available": predictor.ood is not None, "flagged": int(sum(flagged)),
                     "fraction_flagged": float(np.mean(flagged)) if flagged else 0.0}
    report["predictions"] = [{"path": p, "label": int(l), "probability": float(q), "flagged": bool(f),
                              "ood_score": c.get("ood_score")}
                             for p, l, q, f, c in zip(cached.paths, labels, probabilities, flagged, checks)]
    if out:
        out = Path(out)
        write_json_atomic(out, report)
        if figures:
            from .figures import evaluation_figures
            report["figures"] = evaluation_figures(report, cached, out.parent / f"{split}_figures")
            write_json_atomic(out, report)
    return report


def format_table(report: dict) -> str:
    metrics = report["metrics"]
    lines = [f"{report['split']}: {report['n_images']} images "
             + ", ".join(f"{k} {v}" for k, v in report["counts"].items())
             + f"; {report['n_patients']} patients; threshold {report['threshold']:.3f}",
             f"{'metric':<20}{'value':>9}   95% CI ({report['bootstrap']['unit']} bootstrap)"]
    for name in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc",
                 "pr_auc", "brier", "log_loss", "ece"):
        entry = metrics[name]
        lines.append(f"{name:<20}{entry['value']:>9.4f}   [{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]")
    cm = metrics["confusion_matrix"]
    lines.append(f"confusion matrix (rows true NORMAL/PNEUMONIA): [[{cm['tn']} {cm['fp']}] [{cm['fn']} {cm['tp']}]]")
    if "patient_metrics" in report:
        pm = report["patient_metrics"]
        lines.append(f"per patient ({pm['n_images']} patients): accuracy {pm['accuracy']['value']:.4f}  "
                     f"sensitivity {pm['sensitivity']['value']:.4f}  specificity {pm['specificity']['value']:.4f}  "
                     f"ROC AUC {pm['roc_auc']['value']:.4f}")
    ood = report.get("ood", {})
    if ood.get("available"):
        lines.append(f"out-of-distribution flags: {ood['flagged']} of {report['n_images']} "
                     f"({ood['fraction_flagged']:.1%})")
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} unreadable file(s)")
    return "\n".join(lines)
