"""The one scoring path: preprocessed uint8 images -> raw scores, probabilities and OOD features, as served.

Every command that turns images into probabilities calls ``Scorer.score``: training's end-of-run fits,
``evaluate``, ``predict``, ``serve``, ``stress``, ``adapt``, the OOD fit and the report. Fitting the threshold,
the calibration and the OOD reference on these outputs is what makes the checkpoint's promises hold for what
``predict`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..device import keep_freed_memory_for_reuse, resolve_device
from .bundle import Bundle
from .engines import make_engine


@dataclass
class Scores:
    """Per image: ``raw`` (the ensemble's combined logit before calibration), ``probabilities`` (calibrated,
    at the decision's prevalence), ``features`` (OOD taps), ``members`` (each member's raw logit)."""
    raw: np.ndarray
    probabilities: np.ndarray
    members: np.ndarray
    features: list[np.ndarray] = field(default_factory=list)

    def __len__(self):
        return len(self.raw)


class Scorer:
    def __init__(self, bundle: Bundle, device: str = "auto", engine: str = "auto", amp: str = "off", taps=None,
                 cache: bool = True):
        """``taps``: the layers to read for an OOD detector not fitted yet (default: the bundle's detector's);
        ``cache=False`` for weights scored once (keeps their exported graph out of the cache)."""
        self.bundle = bundle
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()  # glibc would otherwise page-fault every batch's activations in again
        self.amp = amp
        self.taps = bundle.taps if taps is None else [tuple(t) for t in taps]
        self.engine = make_engine(bundle.models, bundle.preprocessing.size, bundle.tta, self.taps, self.device,
                                  engine, amp, cache)

    @property
    def description(self) -> dict:
        """How the scores were computed: stored beside anything fitted on them."""
        return {"engine": self.engine.name, "precision": self.engine.precision, "tta": self.bundle.tta,
                "device": self.device.type}

    def score(self, pixels_uint8, batch_size: int = 64, progress: bool = False) -> Scores:
        """``pixels_uint8`` (N, H, W) at the model's size after its intensity standardisation (what the
        cache holds and ``Preprocessing`` makes)."""
        count = len(pixels_uint8)
        members = np.empty((len(self.bundle.models), count))
        features: list[np.ndarray] | None = None
        starts = range(0, count, batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="scoring", unit="batch", leave=False, disable=None)
        for start in starts:
            batch = np.asarray(pixels_uint8[start:start + batch_size])
            logits, tapped = self.engine.run(batch)
            members[:, start:start + len(batch)] = logits
            if features is None:
                features = [np.empty((count, f.shape[1])) for f in tapped]
            for target, value in zip(features, tapped):
                target[start:start + len(batch)] = value
        raw = self.bundle.combine(members)
        return Scores(raw, self.bundle.decision.probabilities(raw), members, features or [])

    def probabilities(self, pixels_uint8, batch_size: int = 64) -> np.ndarray:
        return self.score(pixels_uint8, batch_size).probabilities
