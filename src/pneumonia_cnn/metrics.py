"""The one implementation of the metrics of a decision and a ranking: training's per-epoch validation,
``evaluate``, ``stress``, ``compare`` and adaptation all report these. Written in numpy, not as calls to
scikit-learn's functions, because the bootstrap computes them for every resample and scikit-learn's input
validation cost 20-45 ms a resample (the metrics themselves a fraction of a millisecond);
``tests/evaluation/test_metric_definitions.py`` checks every metric against scikit-learn's."""
from __future__ import annotations

import numpy as np

from .calibration import expected_calibration_error


def ranking_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) among the images scored at or above each distinct score, highest
    first: scikit-learn's binary classification curve (the same stable sort, the same ties)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked_scores, ranked_labels = scores[order], labels[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(ranked_scores)), len(ranked_labels) - 1]
    true_positives = np.cumsum(ranked_labels)[last_of_each_score]
    return true_positives, 1 + last_of_each_score - true_positives


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (trapezoids: a tie counts half), NaN unless both classes are present."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=float)
    if not len(labels):
        return float("nan")
    true_positives, false_positives = ranking_curve(labels, scores)
    if true_positives[-1] == 0 or false_positives[-1] == 0:
        return float("nan")
    return float(np.trapezoid(np.r_[0, true_positives] / true_positives[-1],
                              np.r_[0, false_positives] / false_positives[-1]))


def average_precision(labels, scores) -> float:
    """Area under the precision-recall curve as scikit-learn's ``average_precision_score`` takes it: the
    precision at each distinct score weighted by the recall it adds (no interpolation)."""
    true_positives, false_positives = ranking_curve(np.asarray(labels).astype(int), np.asarray(scores, dtype=float))
    precision = true_positives / (true_positives + false_positives)
    # the positives each score adds, divided once at the end: a perfect ranking sums to exactly 1
    return float(np.sum(np.diff(np.r_[0, true_positives]) * precision) / true_positives[-1])


def _ratio(numerator, denominator) -> float:
    return float(numerator / denominator) if denominator else float("nan")


# What scikit-learn's functions refused (they validated every call): no caller passes these, but a metric of them
# would be a number that means nothing.
def _zero_or_one(values, what: str) -> np.ndarray:
    given = np.asarray(values)
    whole = given.astype(int)
    if (whole & ~1).any() or not np.array_equal(given.astype(float), whole):  # 2, -1, or 0.6 truncated to 0
        raise ValueError(f"{what} must be 0 or 1")
    return whole


def _check_probabilities(labels, probabilities, predicted) -> None:
    if not len(labels) or not len(labels) == len(probabilities) == len(predicted):
        raise ValueError(f"metrics need as many labels, probabilities and decisions, at least one: got "
                         f"{len(labels)}, {len(probabilities)}, {len(predicted)}")
    if not ((probabilities >= 0) & (probabilities <= 1)).all():  # NaN compares false
        raise ValueError("probabilities must be finite and within [0, 1]")


def point_metrics(labels, probabilities, threshold: float = 0.5, predicted=None) -> dict:
    """``predicted`` (0/1 per image), when given, is the decision as made (``Decision.positive``) instead of
    ``probabilities >= threshold``. A ratio with nothing to count (the specificity of images that are all
    PNEUMONIA) is NaN, and so are the ranking's areas and the balanced accuracy with one class."""
    labels = _zero_or_one(labels, "labels")
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = _zero_or_one(probabilities >= threshold if predicted is None else predicted, "decisions")
    _check_probabilities(labels, probabilities, predicted)
    both = len(set(labels.tolist())) == 2
    tn, fp, fn, tp = np.bincount(2 * labels + predicted, minlength=4)[:4].tolist()
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    metrics = {
        "accuracy": _ratio(tp + tn, len(labels)),
        "balanced_accuracy": (sensitivity + specificity) / 2 if both else float("nan"),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(labels, probabilities) if both else float("nan"),
        "pr_auc": min(1.0, average_precision(labels, probabilities)) if both else float("nan"),  # rounding
        "brier": float(np.mean((probabilities - labels) ** 2)),
        "log_loss": float(-np.mean(np.where(labels == 1, np.log(clipped), np.log1p(-clipped)))),
        "ece": expected_calibration_error(labels, probabilities),
    }
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["confusion_matrix"] = {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}
    return metrics
