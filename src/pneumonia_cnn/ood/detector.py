"""The detector: components' evidence combined, and its threshold on validation images."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch.nn as nn

from .scorers import (
    FOLDS,
    METHOD,
    SCORERS,
    GaussianScore,
    _as_array,
    _as_tensor,
    _fit_scorer,
    conservative_quantile,
    default_recipe,
    default_taps,
    training_method,
)
from .taps import extract


class OODDetector:
    """Components' evidence summed; an image scoring above ``threshold`` is flagged.

    Each component is a fitted scorer (``SCORERS``) of one tap's features. New detectors turn a component's
    score into an empirical p-value among the training images' cross-fitted scores and sum -2 log p (Fisher's
    method): one view that finds the image far outside counts fully, which an average would dilute. Detectors
    stored before taps average standardised scores (``combine="mean"``).
    ``taps`` are what the detector needs from ``TappedModel``, in the order ``score(features, ...)`` takes.
    """

    def __init__(self, taps, components: list[dict], threshold: float, quantile: float, method: str = METHOD,
                 combine: str = "fisher"):
        self.taps = [(str(m), str(r)) for m, r in taps]
        self.components, self.method, self.combine = components, method, combine
        self.threshold, self.quantile = float(threshold), float(quantile)

    # ---------- fitting
    @classmethod
    def fit(cls, model: nn.Module, fit, held_out=None, *legacy_args, quantile: float = 0.95, seed: int = 0,
            recipe=None, **legacy_kwargs) -> OODDetector:
        """Fit on ``fit``, a dict of numpy arrays: ``features`` (a list, one (N, D) array per tap of
        ``default_taps(model)``, or of ``recipe``'s taps), ``logits`` (N,), ``pixels`` (N, H, W) and ``labels``
        (N,); the threshold is ``conservative_quantile`` of the scores of ``held_out`` (the same keys but
        labels: the validation images, in distribution and never trained on) at ``quantile``.

        Each scorer is fitted on all of ``fit``; its calibration scores are cross-fitted (``FOLDS`` seeded
        folds, each scored by a scorer fitted on the others), so every training image calibrates and the
        held-out images only set the threshold, which keeps its bound. The older call ``fit(model, pixels,
        labels, device, ..., held_out_pixels=...)`` is still accepted: it extracts the features itself."""
        if not isinstance(fit, dict):
            return cls._fit_on_images(model, fit, held_out, *legacy_args, quantile=quantile, seed=seed,
                                      **legacy_kwargs)
        recipe = recipe or default_recipe(model)
        taps = list(dict.fromkeys(tap for _, tap, _ in recipe))
        if len(fit["features"]) != len(taps):
            raise ValueError(f"fit has features of {len(fit['features'])} taps; the detector needs {len(taps)}: {taps}")
        features = [np.asarray(f, dtype=np.float64) for f in fit["features"]]
        labels = np.asarray(fit["labels"])
        folds = np.random.default_rng(seed).permutation(len(labels)) % FOLDS
        components = []
        for kind, tap, options in recipe:
            values = features[taps.index(tap)]
            calibration = np.empty(len(values))
            for fold in range(FOLDS):  # each image scored by a scorer fitted without it
                calibration[folds == fold] = _fit_scorer(kind, values[folds != fold], labels[folds != fold],
                                                         options).score(values[folds == fold])
            components.append({"kind": kind, "tap": taps.index(tap), "calibration": np.sort(calibration),
                               "scorer": _fit_scorer(kind, values, labels, options)})
        detector = cls(taps, components, np.inf, quantile)
        if held_out is not None and len(held_out["features"][0]) >= 20:
            detector.threshold = conservative_quantile(detector.score(held_out["features"]), quantile)
        else:  # no validation images: the out-of-fold scores of the training images stand in
            out_of_fold = np.sum([detector._evidence(c, c["calibration"]) for c in components], axis=0)
            detector.threshold = conservative_quantile(out_of_fold, quantile)
        return detector

    @classmethod
    def _fit_on_images(cls, model, pixels_uint8, labels, device="cpu", quantile: float = 0.95, seed: int = 0,
                       held_out_pixels=None, **_) -> OODDetector:
        taps = default_taps(model)
        features, logits = extract(model, pixels_uint8, taps, device)
        fit = {"features": features, "logits": logits, "labels": np.asarray(labels), "pixels": pixels_uint8}
        held_out = None
        if held_out_pixels is not None and len(held_out_pixels) >= 20:
            held_features, held_logits = extract(model, held_out_pixels, taps, device)
            held_out = {"features": held_features, "logits": held_logits, "pixels": held_out_pixels}
        return cls.fit(model, fit, held_out, quantile=quantile, seed=seed)

    # ---------- scoring
    def score(self, features, logits=None, pixels=None, device=None) -> np.ndarray:
        """(N,) scores from the taps' features (a list in ``taps`` order); higher is further outside. The
        current components need neither ``logits`` nor ``pixels``. The older call ``score(model, pixels,
        device)`` is still accepted."""
        if isinstance(features, nn.Module):
            features, _ = extract(features, logits, self.taps, device or "cpu")
        evidence = [self._evidence(c, c["scorer"].score(np.asarray(features[c["tap"]], dtype=np.float64)))
                    for c in self.components]
        combined = np.sum(evidence, axis=0) if self.combine == "fisher" else np.mean(evidence, axis=0)
        return np.asarray(combined, dtype=np.float64)

    @staticmethod
    def _evidence(component: dict, raw: np.ndarray) -> np.ndarray:
        """-2 log of the upper-tail p-value among the calibration images. Past the largest of them the
        p-value follows an exponential tail through the median (p = 1/2) and the largest (p = 1/(n + 1)), so
        that an image far outside still scores higher than one just outside, however few images calibrate."""
        if "calibration" not in component:
            return (raw - component["centre"]) / component["scale"]
        calibration = component["calibration"]
        count, largest, median = len(calibration), calibration[-1], np.median(calibration)
        above = count - np.searchsorted(calibration, raw, side="left")
        log_p = np.log((1 + above) / (count + 1))
        decay = max(largest - median, 1e-12) / np.log((count + 1) / 2)
        beyond = raw > largest
        log_p[beyond] = -np.log(count + 1) - (raw[beyond] - largest) / decay
        return -2 * log_p

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        """The one rule of the flag from the score (``predictor.batch_checks`` adds the model-free reasons): above
        the threshold, or no score at all (NaN: the benchmarks had counted it in distribution)."""
        return ~(np.asarray(scores) <= self.threshold)

    # ---------- storage in the checkpoint (tensors, numbers and strings only)
    def state(self) -> dict:
        components = []
        for c in self.components:
            stored = {"kind": c["kind"], "tap": c["tap"], **c["scorer"].state()}
            if "calibration" in c:
                stored["calibration"] = _as_tensor(c["calibration"])
            else:
                stored.update(centre=c["centre"], scale=c["scale"])
            components.append(stored)
        return {"version": 2, "method": self.method, "combine": self.combine, "taps": [list(t) for t in self.taps],
                "components": components, "threshold": self.threshold, "quantile": self.quantile}

    @classmethod
    def from_state(cls, state: dict) -> OODDetector:
        check_state(state)
        if "version" not in state:
            return cls._from_legacy_state(state)
        if state["version"] != 2:  # a later version's detector may compute something else from the same fields
            raise ValueError(f"version {state['version']!r}; this version reads version 2")
        components = []
        for stored in state["components"]:
            component = {"kind": stored["kind"], "tap": int(stored["tap"]),
                         "scorer": SCORERS[stored["kind"]].from_state(stored)}
            if "calibration" in stored:
                component["calibration"] = _as_array(stored["calibration"])
            else:
                component.update(centre=float(stored["centre"]), scale=float(stored["scale"]))
            components.append(component)
        return cls([tuple(t) for t in state["taps"]], components, state["threshold"], state["quantile"],
                   state.get("method") or training_method(state["taps"]), state.get("combine", "fisher"))

    @classmethod
    def _from_legacy_state(cls, state: dict) -> OODDetector:
        """The detector of checkpoints written before taps: per layer, a Gaussian on the channel means and
        standard deviations with its own centre and scale, the layers averaged."""
        components = [{"kind": "gaussian", "tap": index, "scorer": GaussianScore(means, precision),
                       "centre": float(centre), "scale": float(scale)}
                      for index, (means, precision, centre, scale) in
                      enumerate(zip(state["means"], state["precisions"], state["centres"], state["scales"]))]
        return cls([(layer, "mean_std") for layer in state["layers"]], components, state["threshold"],
                   state["quantile"], "multi-layer Mahalanobis (Lee et al., 2018), as fitted before taps", "mean")

    def describe(self, bound_images: str = "validation images") -> str:
        """One line for the model card; ``bound_images``: the images whose scores set the threshold, which the
        detector does not store (``adapt`` refits it on a site's: ``info.ood_bound_images`` reads its record)."""
        return (f"{self.method}; taps {', '.join(f'{m}:{r}' for m, r in self.taps)}; an image scoring above "
                f"{self.threshold:.3f} (a 90%-confidence upper bound of the {self.quantile:.1%} quantile of "
                f"{bound_images}) is flagged")


class InvalidState(ValueError):
    """A stored detector's field that scoring cannot use: its dotted name (``ood.threshold``) and why."""


def check_state(state: dict) -> None:
    """The stored detector's numbers, which scoring uses unchecked: a NaN threshold flagged every image (and
    ``info`` said "scoring above nan"), NaN calibration or reference values flagged all or none, a scale of 0
    divided by zero, a tap index past the taps failed mid-scoring. Missing fields are ``from_state``'s to name."""
    for name, wanted in (("threshold", "a finite number"), ("quantile", "a rate strictly between 0 and 1")):
        value = state.get(name, 0.5)
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                and (name == "threshold" or 0 < value < 1)):
            raise InvalidState(f"ood.{name} must be {wanted}, not {_shown(value)}")
    if "version" not in state:  # the detector of checkpoints written before taps: one of each per layer
        parts = [(f"ood.{name}[{i}]", value) for name in ("means", "precisions", "centres", "scales")
                 for i, value in enumerate(_listed(state.get(name)))]
    else:
        components = [c for c in _listed(state.get("components")) if isinstance(c, dict)]
        taps = len(_listed(state.get("taps")))
        for i, component in enumerate(components):
            tap = component.get("tap", 0)
            if not (isinstance(tap, numbers.Integral) and not isinstance(tap, bool) and 0 <= tap < taps):
                raise InvalidState(f"ood.components[{i}].tap must be the index of one of its {taps} taps, not "
                                   f"{_shown(tap)}")
        parts = [(f"ood.components[{i}].{name}", c[name]) for i, c in enumerate(components)
                 for name in ("calibration", "reference", "means", "precision", "centre", "scale") if name in c]
    for name, value in parts:
        try:
            values = _as_array(value)
        except (TypeError, ValueError, RuntimeError):  # text, ragged lists, a tensor numpy cannot hold
            values = np.array([np.nan])
        if not np.isfinite(values).all():
            raise InvalidState(f"{name} must hold finite numbers only, not NaN, infinite or other values")
        if name.endswith(("calibration", "reference")) and not values.size:
            raise InvalidState(f"{name} must hold at least one value")
        if name.split("[")[0].endswith(("scale", "scales")) and not (values > 0).all():
            raise InvalidState(f"{name} must be positive, not {_shown(value)}")


def _listed(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"
