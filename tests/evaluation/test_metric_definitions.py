"""The metrics (numpy, for the bootstrap's speed) are scikit-learn's: the same values on ties, one class, empty
ratios and clipped probabilities, and hand-checked on small cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumonia_cnn.evaluation import metrics as evaluation_metrics
from pneumonia_cnn.metrics import average_precision, point_metrics, roc_auc


def scikit_learn_metrics(labels, probabilities, threshold=0.5, predicted=None) -> dict:
    """The definitions the README names: scikit-learn's functions, called as the metrics used to call them."""
    labels, probabilities = np.asarray(labels).astype(int), np.asarray(probabilities, dtype=float)
    predicted = (probabilities >= threshold if predicted is None else np.asarray(predicted)).astype(int)
    both = len(set(labels.tolist())) == 2
    return {
        "accuracy": accuracy_score(labels, predicted),
        "balanced_accuracy": balanced_accuracy_score(labels, predicted) if both else math.nan,
        "sensitivity": recall_score(labels, predicted, pos_label=1, zero_division=np.nan),
        "specificity": recall_score(labels, predicted, pos_label=0, zero_division=np.nan),
        "ppv": precision_score(labels, predicted, pos_label=1, zero_division=np.nan),
        "npv": precision_score(labels, predicted, pos_label=0, zero_division=np.nan),
        "f1": f1_score(labels, predicted, pos_label=1, zero_division=np.nan),
        "roc_auc": roc_auc_score(labels, probabilities) if both else math.nan,
        "pr_auc": min(1.0, average_precision_score(labels, probabilities)) if both else math.nan,
        "brier": brier_score_loss(labels, probabilities, pos_label=1),
        "log_loss": log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1]),
    }


def assert_same(ours: dict, theirs: dict, context) -> None:
    for name, value in theirs.items():
        if math.isnan(value):
            assert math.isnan(ours[name]), (name, ours[name], context)
        else:
            assert ours[name] == pytest.approx(value, abs=1e-12), (name, ours[name], value, context)


def cases(count=250, seed=3):
    """Random cases of every shape the bootstrap meets: one image, one class, scores tied in few values (rounded
    to 1-3 decimals), probabilities of exactly 0 and 1, decisions all one way."""
    rng = np.random.default_rng(seed)
    for case in range(count):
        n = int(rng.integers(1, 80))
        labels = rng.integers(0, 2, n) if case % 5 else np.full(n, case % 2)
        probabilities = rng.random(n)
        if case % 3:
            probabilities = np.round(probabilities, int(rng.integers(1, 4)))
        if case % 7 == 0:
            probabilities[: n // 2] = rng.integers(0, 2, n // 2)
        threshold = float(rng.choice([0.5, 0.0, 1.01, rng.random()]))
        yield labels, probabilities, threshold


def test_every_metric_is_scikit_learns_on_ties_one_class_and_empty_ratios():
    shapes = {"one class": 0, "ties": 0, "nothing called positive": 0, "a ratio with nothing to count": 0}
    for labels, probabilities, threshold in cases():
        ours = point_metrics(labels, probabilities, threshold)
        assert_same(ours, scikit_learn_metrics(labels, probabilities, threshold), (labels, probabilities, threshold))
        shapes["one class"] += len(set(labels.tolist())) == 1
        shapes["ties"] += len(np.unique(probabilities)) < len(probabilities)
        shapes["nothing called positive"] += not (probabilities >= threshold).any()
        shapes["a ratio with nothing to count"] += any(math.isnan(ours[k]) for k in ("ppv", "npv", "f1"))
    assert min(shapes.values()) >= 20, shapes  # each shape was met often


def test_decisions_as_made_are_counted_as_given():
    rng = np.random.default_rng(5)
    for _ in range(50):
        labels, probabilities = rng.integers(0, 2, 40), rng.random(40)
        predicted = rng.integers(0, 2, 40)
        assert_same(point_metrics(labels, probabilities, 0.5, predicted),
                    scikit_learn_metrics(labels, probabilities, 0.5, predicted), predicted)


def test_hand_checked_values():
    # scores 0.1 0.4 | 0.35 0.8: of the 4 (NORMAL, PNEUMONIA) pairs, 3 are ranked right; at 0.5 only 0.8 is called
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    metrics = point_metrics(labels, scores, 0.5)
    assert metrics["roc_auc"] == 0.75
    # the precision at each PNEUMONIA image reached, highest score first: 1/1 at 0.8, 2/3 at 0.35
    assert metrics["pr_auc"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}
    assert (metrics["sensitivity"], metrics["specificity"], metrics["ppv"]) == (0.5, 1.0, 1.0)
    assert metrics["npv"] == pytest.approx(2 / 3) and metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    # all tied: a tie counts half in the ROC AUC, and the one threshold has precision 1/2
    assert roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5 and average_precision(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == 0.5
    # nothing called PNEUMONIA: no PPV (nothing to count), F1 0 (a PNEUMONIA image was missed)
    nothing = point_metrics([0, 1], [0.2, 0.3], 0.5)
    assert math.isnan(nothing["ppv"]) and nothing["f1"] == 0.0 and nothing["npv"] == 0.5
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_the_bootstrap_gives_the_intervals_scikit_learns_metrics_give(monkeypatch):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 60)
    probabilities = np.round(np.clip(labels * 0.3 + rng.random(60) * 0.7, 0, 1), 2)
    groups = rng.integers(0, 25, 60)
    ours = evaluation_metrics.bootstrap_metrics(labels, probabilities, 0.5, groups=groups, resamples=60, seed=2)

    def reference(labels, probabilities, threshold=0.5, predicted=None):
        metrics = {**scikit_learn_metrics(labels, probabilities, threshold, predicted),
                   "ece": point_metrics(labels, probabilities, threshold, predicted)["ece"]}
        return {**metrics, "confusion_matrix": point_metrics(labels, probabilities, threshold)["confusion_matrix"]}
    monkeypatch.setattr(evaluation_metrics, "point_metrics", reference)
    theirs = evaluation_metrics.bootstrap_metrics(labels, probabilities, 0.5, groups=groups, resamples=60, seed=2)
    for name, value in theirs.items():
        if isinstance(value, dict) and "ci95" in value:
            assert ours[name]["ci95"] == pytest.approx(value["ci95"], abs=1e-12), name
    monkeypatch.undo()
    other_model = rng.random(60)
    ours_paired = evaluation_metrics.paired_auc_bootstrap(labels, probabilities, other_model, groups, 80, seed=4)
    monkeypatch.setattr(evaluation_metrics, "roc_auc", roc_auc_score)
    theirs_paired = evaluation_metrics.paired_auc_bootstrap(labels, probabilities, other_model, groups, 80, seed=4)
    assert ours_paired["resamples"] == theirs_paired["resamples"] == 80
    assert ours_paired["ci95"] == pytest.approx(theirs_paired["ci95"], abs=1e-12)
    assert ours_paired["p_value"] == theirs_paired["p_value"]


@pytest.mark.parametrize("labels, probabilities, predicted, said", [
    ([], [], None, "at least one"),
    ([0, 1], [0.2], None, "as many"),
    ([0, 2], [0.2, 0.7], None, "0 or 1"),
    ([0, -1], [0.2, 0.7], None, "0 or 1"),
    ([0, 1], [0.2, 0.7], [0, 2], "0 or 1"),
    ([0.6, 1.9], [0.2, 0.7], None, "0 or 1"),  # not truncated to 0 and 1
    ([0, 1], [0.2, 0.7], [0.5, 1], "0 or 1"),
    ([0, 1], [math.nan, 0.7], None, "within \\[0, 1\\]"),
    ([0, 1], [0.2, math.inf], None, "within \\[0, 1\\]"),
    ([0, 1], [-0.1, 0.7], None, "within \\[0, 1\\]"),
])
def test_what_scikit_learn_refused_is_refused(labels, probabilities, predicted, said):
    """scikit-learn validated every call; a metric of a NaN score or of a label 2 would be a number that means
    nothing."""
    with pytest.raises(ValueError, match=said):
        point_metrics(labels, probabilities, 0.5, predicted)
    assert math.isnan(roc_auc([], []))
