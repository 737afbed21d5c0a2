"""AdaBN (Li et al., 2016): batch-norm statistics re-estimated on a site's images, through the served input
path (gray to RGB, mirror images when the run flips at test time), so that what is adapted is what is served."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import replace

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.loader import to_model_input

# AdaBN redraws its images at the validation images' class mix: it needs some of each class to draw from
MIN_ADAPT_PER_CLASS = 8


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def reestimate_batch_norm(model: torch.nn.Module, pixels_uint8, device="cpu", tta: bool = False,
                          batch_size: int = 32) -> int:
    """In place: every batch-norm layer's running mean and variance become the cumulative average over
    ``pixels_uint8`` (N, H, W); returns how many layers were reset."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.eval()
    for layer in layers:
        layer.train()
    channels = int(getattr(model, "model_kwargs", {}).get("in_channels", 3))
    with torch.no_grad():
        for start in range(0, len(pixels_uint8), batch_size):
            x = to_model_input(torch.from_numpy(np.array(pixels_uint8[start:start + batch_size])), device)
            x = x.expand(-1, channels, -1, -1)
            model(torch.cat([x, torch.flip(x, dims=[3])]) if tta else x)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
    return len(layers)


def distinct_in_canonical_order(pixels_uint8) -> np.ndarray:
    """Indices of the distinct images, ordered by their content: the statistics AdaBN re-estimates depend on
    which images share a forward pass, so the same set of images in another order (or with a file sent twice)
    moved probabilities by up to 0.57 and flipped labels."""
    first: dict[bytes, int] = {}
    for index, image in enumerate(pixels_uint8):
        first.setdefault(hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest(), index)
    return np.array([first[key] for key in sorted(first)], dtype=np.int64)


def fewest_of_a_class(pseudo_positive, distinct) -> tuple[int, bool]:
    """(how many distinct images the rarer pseudo-class has, whether that class is the positive one)."""
    positives = int(np.asarray(pseudo_positive, bool)[distinct].sum())
    return min(positives, len(distinct) - positives), positives <= len(distinct) - positives


def fit_class_mix(pixels_uint8, pseudo_positive, labels, class_names=("NORMAL", "PNEUMONIA")) -> tuple[np.ndarray, str]:
    """The labels an adapted decision's AdaBN draws its class mix by, fitted on labelled images: the
    pseudo-labels, as ``--adapt-batch`` serves, unless they leave fewer than ``MIN_ADAPT_PER_CLASS`` distinct
    images of a class (a batch ``--adapt-batch`` refuses to adapt on); then the images' own labels, since
    re-estimating on nearly one class moves every score. Returns (labels, why the own labels were used, or "")."""
    distinct = distinct_in_canonical_order(pixels_uint8)
    fewer, positive = fewest_of_a_class(pseudo_positive, distinct)
    if fewer >= MIN_ADAPT_PER_CLASS:
        return np.asarray(pseudo_positive, bool), ""
    return np.asarray(labels, bool), (f"the class mix drawn by the images' labels: only {fewer} of the {len(distinct)} "
                                      f"distinct in-distribution images scored {class_names[int(positive)]}"
                                      f" before adaptation, fewer than {MIN_ADAPT_PER_CLASS}")


def balanced_sample(pseudo_positive: np.ndarray, rate: float, seed: int = 0) -> np.ndarray:
    """Indices, drawn with replacement, of which a fraction ``rate`` is pseudo-positive. Batch-norm statistics
    depend on the class mix: a batch at 30% pneumonia re-estimated as it is moves every score (on the shared
    test folder cut to 30%, specificity fell from 1.000 to 0.887), so it is re-estimated at the mix of the
    images the adapted decision was fitted on."""
    positive, negative = np.where(pseudo_positive)[0], np.where(~pseudo_positive)[0]
    if not len(positive) or not len(negative):
        return np.arange(len(pseudo_positive))
    rng = np.random.default_rng(seed)
    total = 2 * len(pseudo_positive)
    take = int(round(total * rate))
    return np.sort(np.concatenate([rng.choice(positive, take), rng.choice(negative, total - take)]))


def adapt_batch_norm(bundle, pixels_uint8, pseudo_positive=None, rate: float | None = None):
    """A bundle whose models' batch-norm statistics come from the distinct images of ``pixels_uint8``, in the
    order of their content (resampled to the class mix ``rate`` by ``pseudo_positive`` labels when both are
    given); the original is untouched."""
    order = distinct_in_canonical_order(pixels_uint8)
    if pseudo_positive is not None and rate is not None:
        # pseudo-negatives first, as validation images (in their class folders' order) were when the adapted
        # decision was fitted: which images share a forward pass moves the statistics
        pseudo_positive = np.asarray(pseudo_positive, bool)
        order = order[np.argsort(pseudo_positive[order], kind="stable")]
        pixels_uint8 = np.asarray(pixels_uint8)[order][balanced_sample(pseudo_positive[order], rate)]
    else:
        pixels_uint8 = np.asarray(pixels_uint8)[order]
    models = []
    for model in bundle.models:
        adapted = copy.deepcopy(model)
        reestimate_batch_norm(adapted, pixels_uint8, tta=bundle.tta)
        models.append(adapted)
    return replace(bundle, models=models)


def member_pseudo_labels(bundle, member_logits) -> list[np.ndarray]:
    """Each member's own decision on its own scores: what it adapts by alone."""
    from .bundle import decision_of
    return [decision_of(checkpoint).positive(logits) for checkpoint, logits in zip(bundle.checkpoints, member_logits)]


def adapt_each_member(bundle, pixels_uint8, member_pseudo):
    """A fitted ensemble with each member re-estimated as it was when it stored its adapted validation scores, on
    which the ensemble's adapted decision is fitted: by its own pseudo-labels (``member_pseudo_labels``), at its
    own adapted calibration's class mix (re-estimated together, by the ensemble's pseudo-labels, the members'
    scores moved up to 0.08 from those, and validation sensitivity fell to 0.932 at sensitivity:0.95)."""
    from .bundle import decision_of
    models = []
    for model, checkpoint, pseudo in zip(bundle.models, bundle.checkpoints, member_pseudo):
        rate = decision_of(checkpoint.get("decision_adapted") or checkpoint).calibration.prior
        models.append(adapt_batch_norm(replace(bundle, models=[model]), pixels_uint8, pseudo, rate).models[0])
    return replace(bundle, models=models)
