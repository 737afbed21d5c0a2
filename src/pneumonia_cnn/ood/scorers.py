"""Scores of one tap's features, each fitted on the training images' features."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .taps import CONTENT_BOX_VIEWS, INPUT_TAP, penultimate_layer


# ------------------------------------------------------------------ scores: each fitted on the training features
def _as_tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))


def _as_array(value) -> np.ndarray:
    return value.numpy().astype(np.float64) if isinstance(value, torch.Tensor) else np.asarray(value, np.float64)


class GaussianScore:
    """Distance to the nearest class of class-conditional Gaussians with one shared covariance (Lee et al.,
    2018), the covariance shrunk by Ledoit and Wolf's rule so that it inverts with more features than images."""
    kind = "gaussian"

    def __init__(self, means, precision):
        self.means, self.precision = _as_array(means), _as_array(precision)

    @classmethod
    def fit(cls, features: np.ndarray, labels=None) -> GaussianScore:
        from sklearn.covariance import LedoitWolf
        labels = np.zeros(len(features), int) if labels is None else np.asarray(labels)
        classes = sorted(set(labels.tolist()))
        means = np.stack([features[labels == c].mean(0) for c in classes])
        centred = np.concatenate([features[labels == c] - means[i] for i, c in enumerate(classes)])
        return cls(means, LedoitWolf(assume_centered=True).fit(centred).precision_)

    def score(self, features: np.ndarray) -> np.ndarray:
        distances = [np.einsum("ij,jk,ik->i", features - mean, self.precision, features - mean) for mean in self.means]
        return np.sqrt(np.maximum(np.min(distances, axis=0), 0))

    def state(self) -> dict:
        return {"means": _as_tensor(self.means), "precision": _as_tensor(self.precision)}

    @classmethod
    def from_state(cls, state: dict) -> GaussianScore:
        return cls(state["means"], state["precision"])


class NeighbourScore:
    """Distance to the k-th nearest training image in L2-normalised features (Sun et al., 2022)."""
    kind = "knn"

    def __init__(self, reference, k: int):
        self.reference = np.asarray(reference.float() if isinstance(reference, torch.Tensor) else reference,
                                    dtype=np.float32)
        if not len(self.reference):  # a cross-fitting fold of a one-image fit has nothing to measure against
            raise ValueError("a k-NN scorer needs at least one reference image")
        self.k = max(1, min(int(k), len(self.reference)))  # a tiny reference set (a few site images) has fewer
        # brute force, one matrix product per chunk: faster than trees in these dimensions (tens to hundreds),
        # and scikit-learn's index would cost more to import (over a second) than a one-image predict to run
        self._reference64 = self.reference.astype(np.float64)
        self._reference_norms = np.einsum("ij,ij->i", self._reference64, self._reference64)

    @staticmethod
    def normalise(features: np.ndarray) -> np.ndarray:
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 10) -> NeighbourScore:
        # rounded as stored (half precision), so that the scores a checkpoint gives are those it was fitted on
        return cls(cls.normalise(features).astype(np.float16), k)

    def score(self, features: np.ndarray, chunk: int | None = None) -> np.ndarray:
        """Euclidean distance from each row to its k-th nearest reference row (after normalising the rows)."""
        queries = self.normalise(np.asarray(features, dtype=np.float64))
        # rows per block: one (rows x references) float64 matrix of about 128 MB, whatever the reference size
        chunk = chunk or max(1, 16_000_000 // max(len(self._reference64), 1))
        kth = np.empty(len(queries))
        for start in range(0, len(queries), chunk):
            block = queries[start:start + chunk]
            squared = block @ self._reference64.T
            squared *= -2.0
            squared += self._reference_norms[None, :]
            squared += np.einsum("ij,ij->i", block, block)[:, None]
            squared.partition(self.k - 1, axis=1)
            kth[start:start + chunk] = squared[:, self.k - 1]
        return np.sqrt(np.maximum(kth, 0.0))

    def state(self) -> dict:
        # half precision: unit-length features lose nothing a 10th-neighbour distance notices, and the
        # reference set is most of a checkpoint's size
        return {"reference": torch.from_numpy(self.reference.astype(np.float16)), "k": self.k}

    @classmethod
    def from_state(cls, state: dict) -> NeighbourScore:
        return cls(state["reference"], state["k"])


SCORERS = {GaussianScore.kind: GaussianScore, NeighbourScore.kind: NeighbourScore}
FOLDS = 5  # cross-fitting: every training image gets a calibration score from a scorer fitted without it


def _fit_scorer(kind: str, values: np.ndarray, labels: np.ndarray, options: dict):
    if kind == "gaussian":
        return GaussianScore.fit(values, labels if options.get("by_class") else None)
    return SCORERS[kind].fit(values, **options)


def default_recipe(model: nn.Module) -> list[tuple[str, tuple[str, str], dict]]:
    """``METHOD``'s components: (scorer kind, tap, fit options), chosen on one adult source and checked on the
    other (benchmarks/ood_study.py)."""
    return [("knn", (penultimate_layer(model), "mean_std"), {"k": 10}),
            ("knn", (INPUT_TAP, "thumbnail4"), {"k": 10}),
            ("knn", (INPUT_TAP, "orientations4"), {"k": 10}),
            ("knn", (INPUT_TAP, "thumbnail4_content"), {"k": 10}),
            ("knn", (INPUT_TAP, "orientations4_content"), {"k": 10})]


FIVE_VIEWS = ("five L2-normalised views (the last feature layer's channel means and spreads; the 4 x 4 thumbnail "
              "and the edges' orientations in 4 x 4 blocks, each of the whole frame and of the content inside its "
              "dark margins)")
THREE_VIEWS = ("three L2-normalised views (the last feature layer's channel means and spreads, the 4 x 4 "
               "thumbnail, the edges' orientations in 4 x 4 blocks)")


def knn_method(references: str = "the training images", calibrated_among: str = "the training images'",
               views: str = FIVE_VIEWS) -> str:
    """``default_recipe``'s method in words (``site_recipe``'s with ``THREE_VIEWS``), naming the images its
    k-NN distances are measured to."""
    return (f"k-NN distances (Sun et al., 2022) to {references} in {views}, combined by Fisher's method over "
            f"their p-values among {calibrated_among} cross-fitted distances")


def site_recipe(model: nn.Module) -> list[tuple[str, tuple[str, str], dict]]:
    """``adapt``'s refit on a site's images: ``default_recipe`` without the content-box views. Its references
    are the site's own images, framing included, and only tens of them, where each further view adds noise
    to a few dozen distances (docs/site-adaptation.md)."""
    return [component for component in default_recipe(model) if component[1][1] not in CONTENT_BOX_VIEWS]


def site_taps(model: nn.Module) -> list[tuple[str, str]]:
    return list(dict.fromkeys(tap for _, tap, _ in site_recipe(model)))


# Fitted on training images: what train's detectors store, and what a stored detector without a method means.
METHOD = knn_method()
# ... and what they stored before the content-box views (2026-11-29)
THREE_VIEW_METHOD = knn_method(views=THREE_VIEWS)
TRAINING_METHODS = (METHOD, THREE_VIEW_METHOD)


def training_method(taps) -> str:
    """The method text of a detector fitted on training images with these taps (one stored without its text)."""
    return METHOD if any(reduction in CONTENT_BOX_VIEWS for _, reduction in taps) else THREE_VIEW_METHOD


def site_method(references: str) -> str:
    """The method of a detector ``adapt`` refitted: its references (``references``, e.g. "20 of the new site's
    40 images") are the site's images, not the training images that ``METHOD`` names."""
    return knn_method(f"{references} (adapt's references, not the training images)", "those references'",
                      THREE_VIEWS)


def conservative_quantile(scores: np.ndarray, quantile: float, confidence: float = 0.9) -> float:
    """The smallest order statistic that is at least the true ``quantile`` with probability ``confidence``
    (a distribution-free binomial bound): a new in-distribution image is then flagged with probability at
    most 1 - quantile, with that confidence, however few held-out images there are."""
    from scipy.stats import binom
    ordered = np.sort(np.asarray(scores, dtype=float))
    n = len(ordered)
    for k in range(1, n + 1):  # P(at least k of n held-out scores fall below the true quantile) ...
        if binom.cdf(k - 1, n, quantile) >= confidence:
            return float(ordered[k - 1])
    return float(ordered[-1] + (ordered[-1] - ordered[0]) * 0.05)  # too few images: just above the largest


def default_taps(model: nn.Module) -> list[tuple[str, str]]:
    """The taps a new detector needs (``default_recipe``'s, in order), known before fitting."""
    return list(dict.fromkeys(tap for _, tap, _ in default_recipe(model)))
