"""Operating thresholds and temperature scaling, fitted on validation predictions (never on test)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve


def choose_threshold(labels: np.ndarray, probabilities: np.ndarray, policy: str | float = 0.5) -> float:
    """``policy``: a number in (0, 1), ``youden`` (max sensitivity + specificity - 1), or
    ``sensitivity:X`` (the highest threshold whose sensitivity reaches X, i.e. the fewest false positives)."""
    if isinstance(policy, (int, float)):
        return float(policy)
    policy = str(policy).strip().lower()
    try:
        value = float(policy)
        if not 0 < value < 1:
            raise ValueError(f"threshold {value} must be between 0 and 1")
        return value
    except ValueError as error:
        if "must be" in str(error):
            raise
    labels = np.asarray(labels).astype(int)
    if len(set(labels.tolist())) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation set")
    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    thresholds = np.minimum(thresholds, 1.0)
    if policy == "youden":
        best = int(np.argmax(tpr - fpr))
        return float(thresholds[best])
    if policy.startswith("sensitivity:") or policy.startswith("specificity:"):
        kind, _, target_text = policy.partition(":")
        target = float(target_text)
        if kind == "sensitivity":
            reaching = np.where(tpr >= target)[0]
            return float(thresholds[reaching[0]])  # roc_curve orders thresholds from high to low
        reaching = np.where(1 - fpr >= target)[0]
        return float(thresholds[reaching[-1]])
    raise ValueError(f"unknown threshold policy {policy!r}: use a number, youden, sensitivity:X or specificity:X")


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T minimising the log loss of sigmoid(logit / T) (Guo et al., 2017)."""
    import torch
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimiser.step(closure)
    temperature = float(log_t.detach().exp())
    return float(np.clip(temperature, 0.05, 20.0))


def logit(probabilities: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def expected_calibration_error(labels, probabilities, bins: int = 10) -> float:
    labels, probabilities = np.asarray(labels, dtype=float), np.asarray(probabilities, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            error += chosen.mean() * abs(probabilities[chosen].mean() - labels[chosen].mean())
    return float(error)
