"""The one implementation of the metrics of a decision and a ranking (scikit-learn's functions): training's
per-epoch validation, ``evaluate``, ``stress``, ``compare`` and adaptation all report these."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from .calibration import expected_calibration_error


def point_metrics(labels, probabilities, threshold: float = 0.5, predicted=None) -> dict:
    """``predicted`` (0/1 per image), when given, is the decision as made (``Decision.positive``) instead of
    ``probabilities >= threshold``."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = (probabilities >= threshold if predicted is None else np.asarray(predicted)).astype(int)
    both = len(set(labels.tolist())) == 2
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    metrics = {
        "accuracy": accuracy_score(labels, predicted),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted) if both else float("nan"),
        "sensitivity": recall_score(labels, predicted, pos_label=1, zero_division=np.nan),
        "specificity": recall_score(labels, predicted, pos_label=0, zero_division=np.nan),
        "ppv": precision_score(labels, predicted, pos_label=1, zero_division=np.nan),
        "npv": precision_score(labels, predicted, pos_label=0, zero_division=np.nan),
        "f1": f1_score(labels, predicted, pos_label=1, zero_division=np.nan),
        "roc_auc": roc_auc_score(labels, probabilities) if both else float("nan"),
        "pr_auc": min(1.0, average_precision_score(labels, probabilities)) if both else float("nan"),  # rounding
        "brier": brier_score_loss(labels, probabilities, pos_label=1),
        "log_loss": log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1]),
        "ece": expected_calibration_error(labels, probabilities),
    }
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["confusion_matrix"] = {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}
    return metrics
