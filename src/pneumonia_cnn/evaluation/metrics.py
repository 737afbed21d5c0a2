"""Clinical metrics with 95% confidence intervals (the metrics of ``pneumonia_cnn.metrics``: scikit-learn's).

Intervals come from a seeded bootstrap, stratified by class; when file names carry patient ids the
resampling unit is the patient (images of one patient are not independent). Proportions also get a
Wilson interval, reported beside the bootstrap one.
"""
from __future__ import annotations

import math

import numpy as np

from ..metrics import point_metrics, roc_auc


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> list[float]:
    if total == 0:
        return [float("nan"), float("nan")]
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # the bounds are exactly 0 and 1 at none and all (rounding gave 0.9999999999999999)
    return [0.0 if successes == 0 else max(0.0, float(centre - half)),
            1.0 if successes == total else min(1.0, float(centre + half))]


def _wilson_for(name: str, cm: dict):
    tn, fp, fn, tp = cm["tn"], cm["fp"], cm["fn"], cm["tp"]
    pairs = {"accuracy": (tp + tn, tn + fp + fn + tp), "sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
             "ppv": (tp, tp + fp), "npv": (tn, tn + fn)}
    return wilson_interval(*pairs[name]) if name in pairs else None


# With one class only, the metrics an interval is given for: those of that class alone. ROC AUC, PR AUC, balanced
# accuracy and the other class's recall are undefined (NaN); PPV and NPV are fixed by the missing class (with no
# NORMAL image no call can be a false positive: PPV 1, NPV 0), and so is F1 with no PNEUMONIA image.
ONE_CLASS_METRICS = {0: ("accuracy", "specificity", "brier", "log_loss", "ece"),
                     1: ("accuracy", "sensitivity", "f1", "brier", "log_loss", "ece")}
FEW_PER_CLASS = 10  # fewer bootstrap units of a class than this: the intervals are unreliable


def bootstrap_metrics(labels, probabilities, threshold: float = 0.5, groups=None, resamples: int = 1000,
                      seed: int = 0, predicted=None) -> dict:
    """Every metric as ``{"value": v, "ci95": [lo, hi]}`` (plus ``wilson95`` for proportions); ``predicted``:
    the decisions as made, when given (see ``point_metrics``). With both classes, a resample missing one is left
    out (class stratification makes that rare); with one class only, every resample counts for the metrics of
    that class (``ONE_CLASS_METRICS``) and the others have no interval."""
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = None if predicted is None else np.asarray(predicted).astype(int)
    point = point_metrics(labels, probabilities, threshold, predicted)
    names = [k for k in point if k != "confusion_matrix"]
    present = sorted(set(labels.tolist()))
    both = len(present) != 1
    sampled = names if both else [k for k in names if k in ONE_CLASS_METRICS.get(present[0], ())]
    samples = {k: [] for k in names}
    units = len(np.unique(np.arange(len(labels)) if groups is None else np.asarray(groups)))
    for chosen in resampled_indices(labels, groups, resamples, seed):
        if both and len(set(labels[chosen].tolist())) < 2:
            continue
        sample = point_metrics(labels[chosen], probabilities[chosen], threshold,
                               None if predicted is None else predicted[chosen])
        for k in sampled:
            samples[k].append(sample[k])
    result = {}
    for k in names:
        values = np.asarray(samples[k], dtype=float)
        values = values[np.isfinite(values)]
        ci = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else \
            [float("nan"), float("nan")]
        if k != "log_loss":  # proportions and areas: a sum's rounding gave 1.0000000000000002
            ci = [min(max(v, 0.0), 1.0) if np.isfinite(v) else v for v in ci]
        result[k] = {"value": point[k], "ci95": ci}
        wilson = _wilson_for(k, point["confusion_matrix"])
        if wilson and k in sampled:
            result[k]["wilson95"] = wilson
    result["confusion_matrix"] = point["confusion_matrix"]
    result["n_images"] = int(len(labels))
    result["n_units"] = int(units)
    return result


def resampled_indices(labels, groups=None, resamples: int = 1000, seed: int = 0):
    """The images of each bootstrap resample: units (``groups``: patients; else images) drawn with replacement
    within each class, a unit's class being positive if any of its images is (seeded: the same resamples for the
    same labels, groups and seed)."""
    labels = np.asarray(labels).astype(int)
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(np.arange(len(labels)) if groups is None else np.asarray(groups),
                                return_inverse=True)
    members = [np.where(inverse == g)[0] for g in range(len(unique))]
    group_label = np.array([labels[m].max() for m in members])
    strata = [np.where(group_label == c)[0] for c in (0, 1) if (group_label == c).any()]
    for _ in range(resamples if resamples else 0):
        chosen_groups = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
        yield np.concatenate([members[g] for g in chosen_groups])


def units_per_class(labels, groups=None) -> list[int]:
    """How many bootstrap units (patients when ``groups`` is given, else images) each class has; a patient is
    positive if any image is, as the bootstrap stratifies."""
    labels = np.asarray(labels).astype(int)
    if groups is None:
        return [int((labels == c).sum()) for c in (0, 1)]
    unit_label: dict = {}
    for label, group in zip(labels.tolist(), groups):
        unit_label[group] = max(unit_label.get(group, 0), label)
    return [sum(1 for v in unit_label.values() if v == c) for c in (0, 1)]


# A 95% percentile interval's bounds are the 2.5th and 97.5th percentiles of the resampled values, set by the
# 2.5% most extreme resamples on each side: under 100 resamples, by fewer than three; under 40, they are
# interpolated between the most extreme resamples themselves, and with one the "interval" is that resample's value,
# which need not hold the estimate (accuracy 0.9778 [0.9574, 0.9574]). Efron and Tibshirani ask 1000 or more for
# percentile intervals; 100 is where the bounds stop being single resamples. Below it the intervals are kept (a
# quick look, the tests' small runs) and said to be rough.
FEW_RESAMPLES = 100


def resample_notes(resamples: int) -> list[str]:
    if resamples >= FEW_RESAMPLES:
        return []
    return [f"intervals rough: {resamples} bootstrap resample{'s' if resamples != 1 else ''}, fewer than "
            f"{FEW_RESAMPLES}; each bound rests on the few most extreme resamples and may even exclude the estimate "
            f"(give --bootstrap 1000, the default)"]


def interval_notes(labels, class_names, groups=None) -> list[str]:
    """Why an interval (or a metric) is missing or not to be trusted: one class only, few images."""
    labels = np.asarray(labels).astype(int)
    counts = [int((labels == c).sum()) for c in (0, 1)]
    notes = []
    if len(labels) and min(counts) == 0:
        here, other = (1, 0) if counts[1] else (0, 1)
        fixed = "PPV and NPV" if here == 1 else "PPV, NPV and F1"
        notes.append(f"ROC AUC and PR AUC need both classes: this split has only {class_names[here]} "
                     f"({counts[here]} image{'s' if counts[here] != 1 else ''}); balanced accuracy and "
                     f"{'specificity' if here == 1 else 'sensitivity'} are undefined, and {fixed} have no interval "
                     f"(with no {class_names[other]} image they are fixed by construction)")
    units = units_per_class(labels, groups)
    unit = "image" if groups is None else "patient"
    if len(labels) and min(u for u, c in zip(units, counts) if c) < FEW_PER_CLASS:
        which = ", ".join(f"{name} {u}" for name, u, c in zip(class_names, units, counts) if c)
        notes.append(f"intervals unreliable: fewer than {FEW_PER_CLASS} {unit}s of a class ({unit}s per class: "
                     f"{which}; {len(labels)} image{'s' if len(labels) != 1 else ''} in all); a bootstrap of so few "
                     f"barely varies, so an interval is too narrow or undefined (nan)")
    return notes


def per_patient(labels, probabilities, patients) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A patient is positive if any image is; the patient's score is the maximum image probability."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    order = sorted(set(patients))
    index = {p: i for i, p in enumerate(order)}
    patient_labels = np.zeros(len(order), dtype=int)
    patient_scores = np.zeros(len(order))
    for label, probability, patient in zip(labels, probabilities, patients):
        i = index[patient]
        patient_labels[i] = max(patient_labels[i], int(label))
        patient_scores[i] = max(patient_scores[i], float(probability))
    return patient_labels, patient_scores, order


def delong_test(labels, scores_a, scores_b) -> dict:
    """DeLong, DeLong & Clarke-Pearson (1988): are two correlated ROC AUCs on the same images different?"""
    from scipy.stats import norm
    labels = np.asarray(labels).astype(int)
    positives, negatives = labels == 1, labels == 0
    aucs, v10s, v01s = [], [], []
    for scores in (np.asarray(scores_a, float), np.asarray(scores_b, float)):
        x, y = scores[positives], scores[negatives]
        psi = (x[:, None] > y[None, :]).astype(float) + 0.5 * (x[:, None] == y[None, :])
        aucs.append(psi.mean())
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
    s10 = np.cov(np.vstack(v10s))
    s01 = np.cov(np.vstack(v01s))
    m, n = positives.sum(), negatives.sum()
    covariance = s10 / m + s01 / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = aucs[0] - aucs[1]
    if variance <= 0:
        z, p = 0.0, 1.0
    else:
        z = difference / np.sqrt(variance)
        p = 2 * norm.sf(abs(z))
    half = 1.959964 * np.sqrt(max(variance, 0))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": float(difference),
            "ci95": [float(difference - half), float(difference + half)], "z": float(z), "p_value": float(p)}


def paired_auc_bootstrap(labels, scores_a, scores_b, groups=None, resamples: int = 1000, seed: int = 0) -> dict:
    """The difference of two ROC AUCs on the same images, resampling ``groups`` (patients) as every other interval
    does: DeLong's test takes images as independent, and a patient's images are not."""
    labels = np.asarray(labels).astype(int)
    scores_a, scores_b = np.asarray(scores_a, float), np.asarray(scores_b, float)
    differences = np.array([roc_auc(labels[c], scores_a[c]) - roc_auc(labels[c], scores_b[c])
                            for c in resampled_indices(labels, groups, resamples, seed)
                            if len(set(labels[c].tolist())) == 2])
    if not len(differences):
        return {"unit": "image" if groups is None else "patient", "resamples": 0, "ci95": [math.nan, math.nan],
                "p_value": math.nan}
    # two-sided: twice the share of resamples on the far side of zero (at least one resample's worth)
    p = min(1.0, 2 * max(min((differences <= 0).mean(), (differences >= 0).mean()), 1 / len(differences)))
    return {"unit": "image" if groups is None else "patient", "resamples": int(len(differences)),
            "ci95": [float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))],
            "p_value": float(p)}


def decided_positive(report: dict) -> np.ndarray:
    """Per image of an evaluation report, whether the threshold decided positive: ``positive``, which an image
    given no label (not an X-ray: ``predicted`` null) has too; reports of earlier versions have only ``predicted``."""
    positive_class = report.get("class_names", ["NORMAL", "PNEUMONIA"])[1]
    return np.array([p["positive"] if "positive" in p else p["predicted"] == positive_class
                     for p in report["predictions"]], dtype=bool)
