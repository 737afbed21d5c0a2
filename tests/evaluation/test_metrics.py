import numpy as np
import pytest
from scipy.stats import norm

from pneumonia_cnn.calibration import choose_threshold, expected_calibration_error, fit_temperature
from pneumonia_cnn.evaluation.metrics import (
    bootstrap_metrics,
    delong_test,
    paired_auc_bootstrap,
    per_patient,
    point_metrics,
    resampled_indices,
    wilson_interval,
)

# 4 positives, 4 negatives; at threshold 0.5: TP 3, FN 1, TN 3, FP 1
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.4])


def test_point_metrics_hand_checked():
    m = point_metrics(LABELS, SCORES, 0.5)
    assert m["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert m["accuracy"] == 0.75 and m["sensitivity"] == 0.75 and m["specificity"] == 0.75
    assert m["ppv"] == 0.75 and m["npv"] == 0.75 and m["f1"] == 0.75 and m["balanced_accuracy"] == 0.75
    # AUC: of 16 positive-negative pairs, 14 are ordered correctly (0.3 < 0.6 and 0.3 < 0.4 are not)
    assert m["roc_auc"] == pytest.approx(14 / 16)
    # average precision: positives at ranks 1, 2, 3 (precision 1) and 6 (precision 4/6)
    assert m["pr_auc"] == pytest.approx((1 + 1 + 1 + 4 / 6) / 4)
    expected_brier = np.mean((SCORES - LABELS) ** 2)
    assert m["brier"] == pytest.approx(expected_brier)
    assert m["log_loss"] == pytest.approx(-np.mean(LABELS * np.log(SCORES) + (1 - LABELS) * np.log(1 - SCORES)))


def test_wilson_interval_known_value():
    low, high = wilson_interval(3, 4)
    assert low == pytest.approx(0.3006, abs=1e-3) and high == pytest.approx(0.9544, abs=1e-3)


def test_bootstrap_is_seeded_and_covers_the_value():
    labels = np.r_[np.ones(60), np.zeros(40)].astype(int)
    rng = np.random.default_rng(0)
    scores = np.clip(labels * 0.3 + rng.random(100) * 0.7, 0, 1)
    a = bootstrap_metrics(labels, scores, 0.5, resamples=300, seed=1)
    b = bootstrap_metrics(labels, scores, 0.5, resamples=300, seed=1)
    assert a == b
    names = ("accuracy", "roc_auc", "sensitivity", "specificity", "brier", "pr_auc", "npv", "ppv", "f1", "log_loss")
    for name in names:
        low, high = a[name]["ci95"]
        assert low <= a[name]["value"] <= high and low < high
    assert "wilson95" in a["sensitivity"]


def test_patient_bootstrap_resamples_patients():
    # Two positive patients with 10 images each: P1's all caught, P2's all missed. Negatives are all right.
    # Per image, sensitivity is 10 of 20 images, so resampled values stay near 0.5 (sd 0.11). Per patient, a resample
    # draws P1 twice (1.0), P2 twice (0.0) or one of each (0.5), each end a quarter of the time: the interval
    # must reach both ends exactly, and a bootstrap that ignored the patients could not.
    labels = np.r_[np.ones(20), np.zeros(20)].astype(int)
    scores = np.r_[np.full(10, 0.9), np.full(10, 0.1), np.full(20, 0.1)]
    patients = ["P1"] * 10 + ["P2"] * 10 + ["N1"] * 10 + ["N2"] * 10
    by_patient = bootstrap_metrics(labels, scores, 0.5, groups=patients, resamples=100, seed=0)
    by_image = bootstrap_metrics(labels, scores, 0.5, resamples=100, seed=0)
    assert by_patient["n_units"] == 4 and by_patient["n_images"] == 40 and by_image["n_units"] == 40
    assert by_patient["sensitivity"]["value"] == by_image["sensitivity"]["value"] == 0.5
    assert by_patient["sensitivity"]["ci95"] == [0.0, 1.0]
    low, high = by_image["sensitivity"]["ci95"]
    assert 0.2 < low < 0.5 < high < 0.8


def test_per_patient_takes_any_positive_image_and_the_highest_score():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.3, 0.2, 0.6])
    patients = ["p1", "p1", "p2", "n1", "n1", "n2"]
    patient_labels, patient_scores, order = per_patient(labels, scores, patients)
    assert order == ["n1", "n2", "p1", "p2"]
    assert patient_labels.tolist() == [0, 0, 1, 1] and patient_scores.tolist() == [0.3, 0.6, 0.9, 0.4]


def test_delong_matches_hand_computation():
    labels = np.array([1, 1, 1, 0, 0, 0])
    a = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])  # AUC 1
    b = np.array([0.9, 0.2, 0.7, 0.3, 0.8, 0.1])  # 6 of 9 pairs ordered: AUC 2/3
    result = delong_test(labels, a, b)
    assert result["auc_a"] == 1.0 and result["auc_b"] == pytest.approx(6 / 9)
    # by hand: a's components are constant (variance 0); b's per-positive components are 1, 1/3, 2/3 and
    # per-negative ones 2/3, 1/3, 1, each with sample variance 1/9, so var(difference) = 1/27 + 1/27 = 2/27
    assert result["difference"] == pytest.approx(3 / 9)
    assert result["z"] == pytest.approx((1 / 3) / np.sqrt(2 / 27))  # = sqrt(1.5)
    assert result["p_value"] == pytest.approx(2 * norm.sf(np.sqrt(1.5)))  # 0.2207
    half = 1.959964 * np.sqrt(2 / 27)
    assert result["ci95"] == pytest.approx([1 / 3 - half, 1 / 3 + half])
    same = delong_test(labels, a, a)
    assert same["p_value"] == 1.0


def test_paired_bootstrap_resamples_patients_and_brackets_the_difference():
    # two patients of each class, four images each: a patient's images move together
    labels = np.repeat([1, 1, 0, 0], 4)
    patients = np.repeat(["p1", "p2", "n1", "n2"], 4)
    for chosen in resampled_indices(labels, patients, resamples=50, seed=3):
        drawn = patients[chosen]
        assert len(chosen) == 16 and all((drawn == p).sum() in (0, 4, 8) for p in ("p1", "p2", "n1", "n2"))
        assert labels[chosen].sum() == 8  # stratified: as many positive patients as there are
    a = np.r_[[0.9] * 8, [0.1] * 8]  # AUC 1 on every resample
    b = np.r_[[0.9] * 4, [0.2] * 4, [0.5] * 4, [0.1] * 4]  # p2 below n1: AUC 1, 0.5 or 0, by what was drawn
    result = paired_auc_bootstrap(labels, a, b, patients, resamples=400, seed=0)
    assert result["unit"] == "patient" and result["resamples"] == 400
    # b's AUC on a resample: 1 when p2 or n1 is not drawn, else the share of (p1/p2, n1/n2) pairs ordered; the
    # difference is never below 0, and is 0 in a share (1/4 + 1/4 - 1/16 = 7/16) of resamples: p = 2 x 7/16 > 0.5
    assert result["ci95"][0] == 0.0 and 0 < result["ci95"][1] <= 1.0
    assert result["p_value"] == pytest.approx(2 * 7 / 16, abs=0.1)
    by_image = paired_auc_bootstrap(labels, a, b, None, resamples=400, seed=0)
    assert by_image["unit"] == "image" and by_image["ci95"][1] < result["ci95"][1]  # images: narrower


def test_threshold_policies():
    assert choose_threshold(LABELS, SCORES, "0.3") == 0.3
    youden = choose_threshold(LABELS, SCORES, "youden")
    assert youden in SCORES
    t = choose_threshold(LABELS, SCORES, "sensitivity:1.0")
    assert t == 0.3 and (SCORES[LABELS == 1] >= t).all()  # the highest threshold reaching full sensitivity
    t = choose_threshold(LABELS, SCORES, "sensitivity:0.75")
    assert t == 0.7
    with pytest.raises(ValueError):
        choose_threshold(LABELS, SCORES, "bogus")


def test_temperature_scaling_improves_overconfident_logits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    features = (labels * 2 - 1) * 1.0 + rng.normal(0, 1, 2000)
    true_logits = 2 * features  # the exact log-odds for class means of +-1 and unit variance
    overconfident = true_logits * 4
    temperature = fit_temperature(labels, overconfident)
    assert 3.0 < temperature < 5.0
    p_before = 1 / (1 + np.exp(-overconfident))
    p_after = 1 / (1 + np.exp(-overconfident / temperature))
    assert expected_calibration_error(labels, p_after) < expected_calibration_error(labels, p_before)


def test_ece_hand_checked():
    assert expected_calibration_error([1, 0], [0.95, 0.05], bins=10) == pytest.approx(0.05)


def test_decisions_as_made_override_the_threshold_comparison():
    """evaluate passes the labels predict gave (Decision.positive): under a --prevalence rate the image at the
    threshold sits 1 ulp below the stated threshold and is still PNEUMONIA; the counts follow the labels."""
    labels, probabilities = np.array([1, 1, 0, 0]), np.array([0.9, 0.4999999999999999, 0.2, 0.1])
    plain = bootstrap_metrics(labels, probabilities, 0.5, resamples=20)
    decided = bootstrap_metrics(labels, probabilities, 0.5, resamples=20, predicted=[1, 1, 0, 0])
    assert plain["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1} and plain["sensitivity"]["value"] == 0.5
    assert decided["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 0, "tp": 2}
    assert decided["sensitivity"]["value"] == 1.0 and decided["sensitivity"]["ci95"] == [1.0, 1.0]
    assert decided["roc_auc"]["value"] == plain["roc_auc"]["value"] == 1.0  # rankings use the probabilities


def test_intervals_stay_within_zero_and_one():
    """A perfect ranking's PR AUC summed to 1.0000000000000002 and a Wilson bound at all-correct read
    0.9999999999999999: intervals of proportions and areas are clipped to [0, 1], exact at none and all."""
    rng = np.random.default_rng(4)
    labels = np.array([0] * 30 + [1] * 70)
    probabilities = np.where(labels == 1, rng.uniform(0.6, 1, 100), rng.uniform(0, 0.4, 100))
    result = bootstrap_metrics(labels, probabilities, 0.5, resamples=200)
    for name, entry in result.items():
        if isinstance(entry, dict) and "ci95" in entry and name != "log_loss":
            assert 0.0 <= entry["value"] <= 1.0 and all(0.0 <= v <= 1.0 for v in entry["ci95"]), name
    assert result["ppv"]["wilson95"][1] == 1.0 and wilson_interval(0, 12)[0] == 0.0
    perfect = bootstrap_metrics([0] * 5 + [1] * 9, np.linspace(0.05, 0.95, 14), 0.5, resamples=200)
    assert perfect["pr_auc"]["value"] == 1.0 and perfect["pr_auc"]["ci95"] == [1.0, 1.0]  # it summed to 1 + 2e-16
    assert wilson_interval(7, 7)[1] == 1.0 and wilson_interval(3, 7) == pytest.approx([0.158, 0.750], abs=1e-3)
