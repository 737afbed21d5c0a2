"""From a score to a decision: calibration, the operating threshold, and a site's pneumonia prevalence.

Pure functions of arrays, fitted on validation outputs (never on test). Thresholds are taken from the observed
scores, as an ROC curve does, and an image is called positive when its probability is >= the threshold.

- ``choose_threshold``: a number, ``youden``, ``sensitivity:X`` (the highest threshold whose sensitivity
  reaches X: the fewest false positives at that sensitivity) or ``specificity:X`` (the lowest threshold whose
  specificity reaches X: the most true positives at that specificity).
- ``Calibration``: ``logit' = scale * logit + bias`` with Platt scaling (scale and bias; Platt, 1999) or a
  temperature (bias 0; Guo et al., 2017). Class weighting shifts every logit by about log(pos_weight), which a
  temperature cannot undo and a bias can.
- Prevalence shift (label shift): a site whose pneumonia rate differs from the calibration set's moves every
  logit by ``logit(new prior) - logit(old prior)`` (Saerens, Latinne and Decaestecker, 2002); the new prior is
  given, or estimated from the site's unlabelled batch by their EM algorithm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, PneumoniaCNNError

CALIBRATION_METHODS = ("platt", "temperature", "none")


# ------------------------------------------------------------------ thresholds
def parse_threshold_policy(policy, name: str = "threshold") -> tuple[str, float | None]:
    """``("fixed", p)``, ``("youden", None)``, ``("sensitivity", x)`` or ``("specificity", x)``; a
    ``ConfigError`` naming ``name`` otherwise."""
    text = str(policy).strip().lower()
    kind, _, value_text = text.partition(":")
    if text == "youden":
        return "youden", None
    try:
        if kind in ("sensitivity", "specificity"):
            value = float(value_text)
        elif not value_text:
            kind, value = "fixed", float(text)
        else:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{name}: {policy!r} is not a threshold policy; use a probability, youden, "
                          f"sensitivity:X or specificity:X") from None
    if not (0 < value < 1 or (kind != "fixed" and value == 1)):
        raise ConfigError(f"{name}: {policy!r} needs a value between 0 and 1"
                          f"{' (exclusive)' if kind == 'fixed' else ''}")
    return kind, value


MEAN_OF_MEMBERS = "mean of members"  # an ensemble of earlier checkpoints: the mean of its members' thresholds
# the calibration such an ensemble applies: each member's own, then the mean (its method names the members' methods)
MEMBERS_CALIBRATION = "mean of the members' calibrated probabilities"


def is_operating_point(policy) -> bool:
    """True for policies defined by the ROC curve (a place on it), False for a fixed probability, which the
    mean of an ensemble's members' thresholds also is."""
    return policy != MEAN_OF_MEMBERS and parse_threshold_policy(policy)[0] != "fixed"


def choose_threshold(labels, probabilities, policy="0.5") -> float:
    kind, value = parse_threshold_policy(policy)
    if kind == "fixed":
        return float(value)
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(probabilities, dtype=np.float64)
    positives, negatives = np.sort(scores[labels == 1])[::-1], np.sort(scores[labels == 0])
    if not len(positives) or not len(negatives):
        raise ConfigError("threshold: choosing one needs both classes in the validation images")
    if kind == "sensitivity":
        # sensitivity(t) >= X  <=>  at least k positives score >= t  <=>  t <= the k-th highest positive
        k = max(1, math.ceil(value * len(positives) - 1e-9))
        return float(positives[k - 1])
    if kind == "specificity":
        # specificity(t) >= X  <=>  at least m negatives score < t  <=>  t > the m-th lowest negative;
        # the lowest observed score above it gives the same decisions as any threshold down to it
        m = max(1, math.ceil(value * len(negatives) - 1e-9))
        above = scores[scores > negatives[m - 1]]
        return float(above.min()) if len(above) else float(np.nextafter(negatives[m - 1], np.inf))
    return _youden_threshold(labels, scores)


def _youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum of sensitivity + specificity - 1 over every observed score; the highest threshold on ties."""
    candidates = np.unique(scores)[::-1]
    positives, negatives = scores[labels == 1], scores[labels == 0]
    sensitivity = (positives[None, :] >= candidates[:, None]).mean(axis=1)
    specificity = (negatives[None, :] < candidates[:, None]).mean(axis=1)
    return float(candidates[int(np.argmax(sensitivity + specificity - 1))])


# ------------------------------------------------------------------ calibration
def logit(probabilities) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def sigmoid(logits) -> np.ndarray:
    """exp overflows to inf below a logit of about -709, which is the right limit (0): numpy's RuntimeWarning there
    reached train's output as a bare "overflow encountered in exp". The formula stays: thresholds are its values."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


@dataclass(frozen=True)
class Calibration:
    """``logit' = scale * logit + bias``; ``prior`` is the pneumonia rate of the images it was fitted on.
    ``note``: why a requested fit was not applied (Platt's slope <= 0: ``none`` instead), "" otherwise; not part of
    the stored calibration (a checkpoint's ``calibration`` holds the four fields above, which earlier versions
    read): training records it in ``decision_fit.calibration_note``."""
    method: str = "none"
    scale: float = 1.0
    bias: float = 0.0
    prior: float | None = None
    note: str = field(default="", compare=False)

    def logits(self, raw_logits) -> np.ndarray:
        return self.scale * np.asarray(raw_logits, dtype=np.float64) + self.bias

    def probabilities(self, raw_logits) -> np.ndarray:
        return sigmoid(self.logits(raw_logits))

    def to_dict(self) -> dict:
        return {"method": self.method, "scale": self.scale, "bias": self.bias, "prior": self.prior}

    @classmethod
    def from_dict(cls, values: dict | None) -> Calibration:
        return cls(**values) if values else cls()

    @classmethod
    def from_temperature(cls, temperature: float) -> Calibration:
        """What checkpoints of earlier versions stored: a temperature only."""
        temperature = float(temperature)
        return cls("temperature" if temperature != 1.0 else "none", 1.0 / temperature, 0.0)


def fit_calibration(labels, raw_logits, method: str = "platt") -> Calibration:
    labels = np.asarray(labels).astype(int)
    x = np.asarray(raw_logits, dtype=np.float64)
    prior = float(labels.mean()) if len(labels) else None
    if method == "none":
        return Calibration("none", 1.0, 0.0, prior)
    if len(set(labels.tolist())) < 2:
        raise ConfigError("calibration: fitting it needs both classes in the validation images")
    if method == "temperature":
        return Calibration("temperature", 1.0 / fit_temperature(labels, x), 0.0, prior)
    if method == "platt":
        from sklearn.linear_model import LogisticRegression
        model = LogisticRegression(C=1e10, solver="lbfgs", max_iter=1000).fit(x[:, None], labels)  # unpenalised
        slope = float(model.coef_[0, 0])
        if slope <= 0:  # scores that fall with pneumonia, or do not change with it: a scale would reverse the ranking
            return Calibration("none", 1.0, 0.0, prior, platt_refusal(slope, len(labels)))
        return Calibration("platt", float(model.coef_[0, 0]), float(model.intercept_[0]), prior)
    raise ConfigError(f"calibration: unknown method {method!r}; choose from {', '.join(CALIBRATION_METHODS)}")


def platt_refusal(slope: float, images: int) -> str:
    """Why Platt scaling was not applied: the note ``fit_calibration`` gives its ``none``."""
    return (f"platt calibration not applied: fitted slope {slope:.3g} <= 0 on {images} images, the scores do not "
            f"rank the classes (pneumonia does not score higher); probabilities left uncalibrated")


def fit_temperature(labels, raw_logits) -> float:
    """The temperature T minimising the log loss of sigmoid(logit / T), searched on log T."""
    from scipy.optimize import minimize_scalar
    labels = np.asarray(labels, dtype=np.float64)
    x = np.asarray(raw_logits, dtype=np.float64)

    def loss(log_t):
        z = x / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, z) - labels * z))

    result = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def compare_calibrations(labels, raw_logits, folds: int = 5, seed: int = 0) -> dict:
    """Each method's log loss and ECE on val, fitted on the other folds (cross-validated, so that a method
    is not judged on the images it was fitted on)."""
    from sklearn.model_selection import StratifiedKFold
    labels = np.asarray(labels).astype(int)
    x = np.asarray(raw_logits, dtype=np.float64)
    if np.bincount(labels, minlength=2).min() < 2:  # a fold without the class: no method can be fitted there (it
        return {}  # ended training with "fitting it needs both classes")
    folds = max(2, min(folds, int(np.bincount(labels, minlength=2).min())))
    out_of_fold = {method: np.zeros(len(labels)) for method in CALIBRATION_METHODS}
    for fit_index, test_index in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, labels):
        for method in CALIBRATION_METHODS:
            fitted = fit_calibration(labels[fit_index], x[fit_index], method)
            out_of_fold[method][test_index] = fitted.probabilities(x[test_index])
    return {method: {"log_loss": log_loss(labels, p), "ece": expected_calibration_error(labels, p)}
            for method, p in out_of_fold.items()}


def fit_decision(labels, raw_logits, policy="0.5", method: str = "none") -> Decision:
    """Calibration, then the threshold on the calibrated validation probabilities (never on test)."""
    calibration = fit_calibration(labels, raw_logits, method)
    probabilities = calibration.probabilities(raw_logits)
    return Decision(calibration, choose_threshold(labels, probabilities, policy), str(policy))


@dataclass(frozen=True)
class Decision:
    """What a score means and what is done with it: calibration, threshold, and the prevalence the
    probabilities are stated for (``prior``; None = the calibration images' own)."""
    calibration: Calibration = Calibration()
    threshold: float = 0.5
    policy: str = "0.5"
    prior: float | None = None
    prior_note: str = ""

    @property
    def prior_shift(self) -> float:
        if self.prior is None or self.calibration.prior is None:
            return 0.0
        return prior_offset(self.calibration.prior, self.prior)

    def logits(self, raw_logits) -> np.ndarray:
        return self.calibration.logits(raw_logits) + self.prior_shift

    def probabilities(self, raw_logits) -> np.ndarray:
        return sigmoid(self.logits(raw_logits))

    def positive(self, raw_logits) -> np.ndarray:
        """The decision per score: probability >= threshold. An operating point is decided on the calibrated
        probability before any prevalence shift: the shift moves the probabilities and the threshold alike, but
        along float paths that differ in the last bit, which flipped the label of the image that defines the
        threshold under some rates."""
        if is_operating_point(self.policy):
            return self.calibration.probabilities(raw_logits) >= self.threshold
        return self.probabilities(raw_logits) >= self.threshold

    @property
    def effective_threshold(self) -> float:
        """The threshold on the probabilities as stated. An operating point (sensitivity, specificity,
        Youden) is a place on the ROC curve, which a prevalence change leaves where it is, so its threshold
        moves with the probabilities; a fixed probability threshold stays, and its decisions change."""
        if not self.prior_shift or not is_operating_point(self.policy):
            return float(self.threshold)
        return float(sigmoid(logit(self.threshold) + self.prior_shift))

    def with_prior(self, prior: float, note: str) -> Decision:
        if self.calibration.prior is None:
            raise ConfigError("prevalence: this checkpoint does not record the pneumonia rate its probabilities "
                              "were calibrated at (retrain or refit it with this version)")
        if not 0 < prior < 1:
            raise ConfigError(f"prevalence: {prior} must be strictly between 0 and 1")
        return Decision(self.calibration, self.threshold, self.policy, float(prior), note)

    def to_dict(self) -> dict:
        return {"calibration": self.calibration.to_dict(), "threshold": float(self.threshold),
                "threshold_policy": self.policy, "prior": self.prior, "prior_note": self.prior_note}


# ------------------------------------------------------------------ prevalence
RATE_BOUNDS = (1e-6, 1 - 1e-6)  # the pneumonia rates --prevalence takes


def parse_prevalence(value, estimate: bool = True) -> float | str | None:
    """None, "estimate", or a rate strictly between 0 and 1; ``estimate``: whether the refusal offers it."""
    if value is None or str(value).lower() == "estimate":
        return None if value is None else "estimate"
    try:
        rate = float(value)
    except ValueError:
        raise PneumoniaCNNError(f"--prevalence {value}: give a rate between 0 and 1"
                                f"{', or ' + repr('estimate') if estimate else ''}") from None
    if not 0 < rate < 1:
        raise PneumoniaCNNError(f"--prevalence {value}: must be strictly between 0 and 1")
    if not RATE_BOUNDS[0] <= rate <= RATE_BOUNDS[1]:  # 1e-320 had been applied as 1e-12 while stated as given
        raise PneumoniaCNNError(f"--prevalence {value}: must lie between {RATE_BOUNDS[0]:g} and {RATE_BOUNDS[1]:g} "
                                f"(no site's pneumonia rate is rarer or commoner; at 1e-320 every probability had "
                                f"rounded to 0)")
    return rate


def shown_rate(rate: float) -> str:
    """A pneumonia rate as the notes print it: three decimals, or as many digits as it takes at the ends (1e-06
    and 0.999999 had shown as 0.000 and 1.000)."""
    return f"{rate:.3f}" if 0.001 <= rate <= 0.999 else f"{rate:.6g}"


def prior_offset(old_prior: float, new_prior: float) -> float:
    """Bayes' rule under label shift, on the logit: what moves p(y|x) to a population whose rate is ``new_prior``."""
    return float(logit(new_prior) - logit(old_prior))


def shift_prior(calibrated_logits, old_prior: float, new_prior: float) -> np.ndarray:
    """Bayes' rule under label shift: p(y|x) for a population whose pneumonia rate is ``new_prior``."""
    return np.asarray(calibrated_logits, dtype=np.float64) + prior_offset(old_prior, new_prior)


def estimate_prior(calibrated_probabilities, old_prior: float, iterations: int = 1000,
                   tolerance: float = 1e-8) -> float:
    """Saerens et al. (2002) EM: the pneumonia rate of an unlabelled batch, from calibrated probabilities."""
    base = logit(np.clip(calibrated_probabilities, 1e-9, 1 - 1e-9))
    prior = float(old_prior)
    for _ in range(iterations):
        updated = float(np.clip(sigmoid(shift_prior(base, old_prior, prior)).mean(), 1e-4, 1 - 1e-4))
        if abs(updated - prior) < tolerance:
            return updated
        prior = updated
    return prior


def estimate_prior_of_members(member_probabilities, member_priors, iterations: int = 1000,
                              tolerance: float = 1e-8) -> float:
    """The EM above for an ensemble whose probability is the mean of its members' calibrated probabilities, each
    calibrated at its own rate (``member_priors``): at a candidate rate each member's probability is moved from its
    own rate before the mean, as the ensemble states them. One member: ``estimate_prior``."""
    base = logit(np.clip(np.atleast_2d(np.asarray(member_probabilities, dtype=np.float64)), 1e-9, 1 - 1e-9))
    if base.shape[0] != len(member_priors):  # one image's members as a 1-D list would broadcast into a grid
        raise ValueError(f"{base.shape[0]} rows of probabilities for {len(member_priors)} members")
    own = logit(np.asarray(member_priors, dtype=np.float64))[:, None]
    prior = float(np.mean(member_priors))
    for _ in range(iterations):
        updated = float(np.clip(sigmoid(base - own + logit(prior)).mean(), 1e-4, 1 - 1e-4))
        if abs(updated - prior) < tolerance:
            return updated
        prior = updated
    return prior


# ------------------------------------------------------------------ quality of probabilities
def log_loss(labels, probabilities) -> float:
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def reliability_bins(labels, probabilities, bins: int = 10) -> list[dict]:
    """Per equal-width bin: count, mean predicted probability, observed pneumonia rate."""
    labels, probabilities = np.asarray(labels, dtype=float), np.asarray(probabilities, dtype=float)
    index = np.clip(np.digitize(probabilities, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            rows.append({"bin": [b / bins, (b + 1) / bins], "count": int(chosen.sum()),
                         "predicted": float(probabilities[chosen].mean()), "observed": float(labels[chosen].mean())})
    return rows


def expected_calibration_error(labels, probabilities, bins: int = 10) -> float:
    total = len(np.asarray(labels))
    return float(sum(row["count"] / total * abs(row["predicted"] - row["observed"])
                     for row in reliability_bins(labels, probabilities, bins))) if total else 0.0


def shown_probability(probability: float, threshold: float | None, digits: int = 4) -> str:
    """``probability`` to ``digits`` decimals, or as many more as it takes (at most 10) to differ from the threshold
    shown alike: 0.93116 NORMAL was shown as 0.9312, which is the threshold's own 0.9312 (rounding keeps the order,
    so a probability shown apart from the threshold is shown on its side)."""
    if threshold is not None and probability != threshold:
        while digits < 10 and f"{probability:.{digits}f}" == f"{threshold:.{digits}f}":
            digits += 1
    return f"{probability:.{digits}f}"


def decision_not_fitted(checkpoint: dict) -> bool:
    """Weights saved while training (best.pt before the run's end-of-run steps, last.pt): no decision was fitted,
    and the threshold 0.5 is a placeholder; not "a checkpoint of an earlier version", which stored a temperature."""
    return not any(key in checkpoint for key in ("calibration", "temperature", "decision_fit", "imported"))
