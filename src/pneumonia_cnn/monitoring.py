"""Drift: are the images a site sends still like the ones the model was validated on?

The checkpoint keeps its validation images' raw scores (logits before calibration) and out-of-distribution
scores (``checkpoint["reference"]["val"]``). A batch of new images, or the server's rolling window of recent
ones, is compared with that reference on both scores by the population stability index (PSI, over the
reference's quantile bins) and the two-sample Kolmogorov-Smirnov test. Neither needs labels.

Levels (docs/hospital.md, "Deploying in a hospital"): PSI below 0.1 is stable, 0.1 to 0.25 a shift worth watching
("warning"), above 0.25 a major shift ("drift"), the usual reading of the index in credit and clinical
model monitoring. A KS p-value below 0.001 also counts as drift: with a few hundred images on each side that
is a difference in distribution that chance does not explain.
"""
from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np

from .errors import PneumoniaCNNError

PSI_WARNING = 0.10
PSI_DRIFT = 0.25
KS_P_DRIFT = 0.001
SCORES = ("raw_scores", "ood_scores")
SMALL_REFERENCE = 100
OFFLINE_MINIMUM = 30  # new images before an offline check judges: the PSI of a handful is noise (one image: 8)
EPSILON = 1e-4  # an empty bin counts as this share, so the index stays finite


def reference_of(checkpoint: dict) -> dict | None:
    """The validation scores a checkpoint keeps, or None for checkpoints of earlier versions."""
    val = (checkpoint.get("reference") or {}).get("val") or {}
    if not val.get("raw_scores"):
        return None
    out = {"raw_scores": np.asarray(val["raw_scores"], dtype=np.float64)}
    ood = val.get("ood_scores")
    if ood is not None and len(ood) == len(out["raw_scores"]) and all(v is not None for v in ood):
        out["ood_scores"] = np.asarray(ood, dtype=np.float64)
    return out


NO_REFERENCE = ("no validation scores in this checkpoint (one of an earlier version, or adapted to a site: its "
                "model is not the one the scores came from)")


def no_reference_reason(checkpoint: dict) -> str:
    """Why a checkpoint keeps no validation scores, from what it is: a run's last.pt (its training state, written
    each epoch to resume training: the end-of-run steps store the scores in best.pt), an adapted model, or one
    of an earlier version."""
    if checkpoint.get("training_state") is not None:
        return ("no validation scores in this checkpoint: it is a training-state file, a run's last.pt kept to "
                "resume training; the run's best.pt holds them once the run has finished: give that")
    if checkpoint.get("adaptation"):
        return ("no validation scores in this checkpoint: it was adapted to a site, and its model is not the one "
                "the scores came from")
    return NO_REFERENCE


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties merged), so each bin holds about 1/bins of it."""
    edges = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(edges)


def bin_count(reference_size: int) -> int:
    """Ten bins, fewer for a small reference: at least five reference images per bin."""
    return int(min(10, max(2, reference_size // 5)))


def population_stability_index(reference, current, bins: int | None = None) -> float:
    """PSI = sum over bins of (current share - reference share) * ln(current share / reference share)."""
    reference, current = np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)
    edges = quantile_edges(reference, bins or bin_count(len(reference)))
    expected = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    actual = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1)
    expected = np.maximum(expected / len(reference), EPSILON)
    actual = np.maximum(actual / len(current), EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_test(reference, current) -> tuple[float, float]:
    from scipy.stats import ks_2samp
    result = ks_2samp(np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64))
    return float(result.statistic), float(result.pvalue)


def level_of(psi: float, ks_pvalue: float) -> str:
    if psi > PSI_DRIFT or ks_pvalue < KS_P_DRIFT:
        return "drift"
    return "warning" if psi > PSI_WARNING else "ok"


def compare(reference: dict | None, current: dict, minimum: int = 1, no_reference: str = NO_REFERENCE) -> dict:
    """``current``: {"raw_scores": [...], "ood_scores": [...]} of new images -> a report per score and overall;
    ``no_reference``: the reason given when ``reference`` is None (``no_reference_reason``)."""
    count = len(current.get("raw_scores", []))
    report = {"images": count, "levels": {"psi_warning": PSI_WARNING, "psi_drift": PSI_DRIFT,
                                          "ks_pvalue_drift": KS_P_DRIFT}}
    if reference is None:
        return {**report, "status": "unavailable", "reason": no_reference}
    report["reference_images"] = len(reference["raw_scores"])
    if len(reference["raw_scores"]) < SMALL_REFERENCE:
        report["note"] = (f"the reference holds only {len(reference['raw_scores'])} validation images: the PSI "
                          f"is noisy (bins of a few images); trust the KS p-value more")
    if count < minimum:
        return {**report, "status": "collecting", "reason": f"{count} of {minimum} images needed"}
    worst = "ok"
    for name in SCORES:
        values = [v for v in current.get(name, []) if v is not None and math.isfinite(v)]
        if name not in reference or not values:
            continue
        psi = population_stability_index(reference[name], values)
        statistic, pvalue = ks_test(reference[name], values)
        level = level_of(psi, pvalue)
        report[name] = {"psi": psi, "ks_statistic": statistic, "ks_pvalue": pvalue, "status": level,
                        "mean": float(np.mean(values)), "reference_mean": float(np.mean(reference[name]))}
        worst = max(worst, level, key=("ok", "warning", "drift").index)
    return {**report, "status": worst}


class DriftMonitor:
    """The server's rolling window of recent scores, compared with the reference on demand."""

    def __init__(self, reference: dict | None, window: int = 500, minimum: int | None = None,
                 no_reference: str = NO_REFERENCE):
        self.reference, self.window, self.no_reference = reference, int(window), no_reference
        self.minimum = int(minimum if minimum is not None else min(100, self.window))
        self.raw, self.ood = deque(maxlen=self.window), deque(maxlen=self.window)
        self.lock = threading.Lock()
        self.seen = 0
        self._cached: tuple[int, dict] | None = None

    def add(self, raw_score: float, ood_score: float | None) -> None:
        with self.lock:
            self.raw.append(float(raw_score))
            self.ood.append(None if ood_score is None else float(ood_score))
            self.seen += 1

    def report(self) -> dict:
        with self.lock:
            seen, current = self.seen, {"raw_scores": list(self.raw), "ood_scores": list(self.ood)}
        if self._cached is not None and self._cached[0] == seen:
            return self._cached[1]
        report = {**compare(self.reference, current, self.minimum, self.no_reference), "window": self.window}
        self._cached = (seen, report)
        return report


def drift_of_files(checkpoint, paths, device: str = "cpu", batch_size: int = 32,
                   minimum: int = OFFLINE_MINIMUM) -> dict:
    """``pneumonia-cnn drift``: the same comparison for a folder of new images, offline (judged from
    ``minimum`` readable images on; a PneumoniaCNNError when none is readable)."""
    from .inference import Predictor
    from .inference.bundle import load_bundle
    bundle = load_bundle(checkpoint)
    predictions = Predictor(bundle, device).predict_files(paths, batch_size)
    scored = [p for p in predictions if p.error is None]
    if not scored:
        raise PneumoniaCNNError(f"none of the {len(predictions)} image(s) could be read (first: "
                                f"{predictions[0].path}: {predictions[0].error})")
    current = {"raw_scores": [p.raw_score for p in scored], "ood_scores": [p.ood_score for p in scored]}
    report = compare(reference_of(bundle.checkpoints[0]), current, minimum, no_reference_reason(bundle.checkpoints[0]))
    report["skipped"] = [{"path": p.path, "error": p.error} for p in predictions if p.error]
    report["model"] = bundle.model_id
    return report


def format_drift(report: dict) -> str:
    lines = [f"drift: {report['status']}" + (f" ({report['reason']})" if report.get("reason") else ""),
             f"images: {report['images']} new, {report.get('reference_images', 0)} in the reference (validation)"]
    for name, title in (("raw_scores", "scores"), ("ood_scores", "OOD scores")):
        if name in report:
            part = report[name]
            lines.append(f"{title:>10}: PSI {part['psi']:.3f}  KS {part['ks_statistic']:.3f} "
                         f"(p={part['ks_pvalue']:.2g})  mean {part['mean']:.3f} vs {part['reference_mean']:.3f}  "
                         f"-> {part['status']}")
    levels = report["levels"]
    lines.append(f"levels: PSI > {levels['psi_warning']} warning, > {levels['psi_drift']} drift; "
                 f"KS p < {levels['ks_pvalue_drift']} drift")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    for item in report.get("skipped", []):
        lines.append(f"skipped {item['path']}: {item['error']}")
    return "\n".join(lines)
