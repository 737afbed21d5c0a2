"""Operating points, calibration and prevalence: hand-checked cases (each value worked out by hand below)."""
import numpy as np
import pytest

from pneumonia_cnn.calibration import (
    Calibration,
    Decision,
    choose_threshold,
    compare_calibrations,
    estimate_prior,
    fit_calibration,
    fit_decision,
    log_loss,
    logit,
    parse_threshold_policy,
    shift_prior,
    sigmoid,
)
from pneumonia_cnn.errors import ConfigError

# a vertical stretch of the ROC curve: no negative scores above 0.45, so thresholds 0.9 ... 0.5 all have
# false-positive rate 0 while sensitivity climbs 0.2, 0.4, 0.6, 0.8, 1.0
VERTICAL_LABELS = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0])
VERTICAL_SCORES = np.array([0.9, 0.8, 0.71, 0.6, 0.5, 0.45, 0.3, 0.2, 0.1])


def test_sensitivity_is_the_highest_threshold_reaching_it_inside_a_vertical_stretch():
    # 60% of 5 positives = 3: the third-highest positive, 0.71, is the highest threshold with sensitivity 0.6;
    # roc_curve's dropped collinear points made the earlier code answer 0.5 (every positive called)
    assert choose_threshold(VERTICAL_LABELS, VERTICAL_SCORES, "sensitivity:0.6") == 0.71
    assert choose_threshold(VERTICAL_LABELS, VERTICAL_SCORES, "sensitivity:0.61") == 0.6  # needs 4 of 5
    assert choose_threshold(VERTICAL_LABELS, VERTICAL_SCORES, "sensitivity:1.0") == 0.5


def test_sensitivity_with_tied_scores():
    labels = np.array([1, 1, 1, 1, 1, 0, 0])
    scores = np.array([0.8, 0.7, 0.7, 0.7, 0.2, 0.75, 0.1])
    # 50% of 5 = 2.5 -> 3 positives needed: at 0.7 four are called (0.8 and the three ties), at 0.8 only one
    assert choose_threshold(labels, scores, "sensitivity:0.5") == 0.7


def test_specificity_is_the_lowest_threshold_reaching_it():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.35, 0.5, 0.9])
    # 75% of 4 negatives = 3 below the threshold: above 0.3; the lowest observed score above it is 0.35
    # (a positive), which keeps that positive called: specificity 0.75, sensitivity 1.0
    assert choose_threshold(labels, scores, "specificity:0.75") == 0.35
    # all 4 negatives below: above 0.6, and the lowest score above it is 0.9
    assert choose_threshold(labels, scores, "specificity:1.0") == 0.9
    # the highest score is a negative: the threshold lies just above it and calls nothing positive
    t = choose_threshold(np.array([1, 0]), np.array([0.2, 0.7]), "specificity:1.0")
    assert 0.7 < t < 0.7000001


def test_youden_takes_the_highest_threshold_among_equal_maxima():
    labels = np.array([1, 1, 0, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    # J at 0.8: 2/3 - 0 = 0.667; at 0.6: 3/3 - 1/3 = 0.667 (tie); at 0.9: 1/3; the higher one wins
    assert choose_threshold(labels, scores, "youden") == 0.8


def test_threshold_policy_errors_name_the_field():
    for bad in ("sensitivity:1.5", "specificity:0", "bogus", "1.0", "sensitivity:x"):
        with pytest.raises(ConfigError, match="threshold"):
            parse_threshold_policy(bad)
    assert parse_threshold_policy("0.3") == ("fixed", 0.3)
    assert choose_threshold(VERTICAL_LABELS, VERTICAL_SCORES, "0.3") == 0.3


def _shifted_logits(seed=0, count=4000, shift=-1.0):
    """Labels drawn from known probabilities sigmoid(z); the model's logits are z + shift, as class weighting
    with pos_weight ~ exp(shift) leaves them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(1.0, 2.0, count)
    labels = (rng.random(count) < sigmoid(z)).astype(int)
    return labels, z + shift


def test_platt_undoes_a_logit_shift_that_a_temperature_cannot():
    labels, raw = _shifted_logits()
    platt = fit_calibration(labels, raw, "platt")
    temperature = fit_calibration(labels, raw, "temperature")
    assert platt.scale == pytest.approx(1.0, abs=0.1) and platt.bias == pytest.approx(1.0, abs=0.15)
    assert temperature.bias == 0.0
    assert log_loss(labels, platt.probabilities(raw)) < log_loss(labels, temperature.probabilities(raw)) - 0.005
    assert platt.prior == pytest.approx(labels.mean())
    table = compare_calibrations(labels, raw)
    assert table["platt"]["log_loss"] < table["temperature"]["log_loss"] <= table["none"]["log_loss"] + 1e-9
    assert table["platt"]["ece"] < table["none"]["ece"]


def test_prior_shift_hand_checked():
    # calibrated at a pneumonia rate of 0.75, an image at p = 0.5 (logit 0): at a rate of 0.25 its logit moves
    # by logit(0.25) - logit(0.75) = -2 ln 3, so p = 1 / (1 + 9) = 0.1
    assert sigmoid(shift_prior([0.0], 0.75, 0.25))[0] == pytest.approx(0.1)
    decision = Decision(Calibration("none", 1.0, 0.0, prior=0.75), threshold=0.5, policy="sensitivity:0.95")
    moved = decision.with_prior(0.25, "given")
    assert moved.probabilities([0.0])[0] == pytest.approx(0.1)
    assert moved.effective_threshold == pytest.approx(0.1)  # an operating point stays on the ROC curve
    fixed = Decision(Calibration("none", 1.0, 0.0, prior=0.75), threshold=0.5, policy="0.5").with_prior(0.25, "x")
    assert fixed.effective_threshold == 0.5  # a fixed probability stays; its decisions change
    with pytest.raises(ConfigError, match="prevalence"):
        Decision(Calibration("temperature", 1.0, 0.0, prior=None)).with_prior(0.3, "given")


def test_em_estimates_a_batch_prevalence():
    labels, raw = _shifted_logits(seed=1, count=20000, shift=0.0)
    calibration = fit_calibration(labels, raw, "platt")
    # a batch with a pneumonia rate of 0.3: keep all negatives and a subset of positives
    rng = np.random.default_rng(2)
    negatives, positives = np.where(labels == 0)[0], np.where(labels == 1)[0]
    take = rng.choice(positives, size=int(len(negatives) * 0.3 / 0.7), replace=False)
    batch = np.concatenate([negatives, take])
    estimate = estimate_prior(calibration.probabilities(raw[batch]), calibration.prior)
    assert estimate == pytest.approx(0.3, abs=0.02)
    assert calibration.probabilities(raw[batch]).mean() > 0.4  # without EM the rate would be overstated


def test_fit_decision_chooses_the_threshold_on_calibrated_probabilities():
    labels, raw = _shifted_logits(seed=3, count=1000)
    decision = fit_decision(labels, raw, "sensitivity:0.9", "platt")
    probabilities = decision.probabilities(raw)
    assert (probabilities[labels == 1] >= decision.threshold).mean() >= 0.9
    assert (probabilities[labels == 1] >= np.nextafter(decision.threshold, 1)).mean() < 0.9
    assert logit(decision.threshold) == pytest.approx(decision.calibration.logits(
        raw[labels == 1][np.argsort(-raw[labels == 1])][int(np.ceil(0.9 * (labels == 1).sum())) - 1]))


def test_a_prevalence_never_flips_the_label_of_the_image_that_defines_the_threshold():
    # the built-in model's Platt calibration and the raw score of the validation image its threshold was chosen
    # at: at a rate of 0.75 the moved probability came out 1 ulp below the moved threshold (NORMAL)
    calibration = Calibration("platt", 1.2883733030203146, 2.500981875924573, prior=0.7513416815742398)
    raw = np.array([0.080724])
    decision = Decision(calibration, float(calibration.probabilities(raw)[0]), "sensitivity:0.95")
    rates = np.round(np.arange(0.01, 1.0, 0.01), 2)
    moved = [decision.with_prior(float(rate), "given") for rate in rates]
    assert all(d.positive(raw)[0] for d in moved)
    assert not any(d.positive(raw - 1e-9)[0] for d in moved)  # just below it stays NORMAL
    # what the labels were decided by before: the moved probability against the moved threshold
    assert sum(d.probabilities(raw)[0] < d.effective_threshold for d in moved) > 10
    fixed = Decision(calibration, 0.5, "0.5").with_prior(0.05, "given")  # a fixed threshold: decisions change
    assert not fixed.positive(raw)[0] and Decision(calibration, 0.5, "0.5").positive(raw)[0]


def test_sigmoid_of_extreme_logits_is_quiet_and_exact():
    """train printed "warning: RuntimeWarning: overflow encountered in exp" from a logit below about -709."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]
