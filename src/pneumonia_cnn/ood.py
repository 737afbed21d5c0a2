"""Knowing when not to answer: an out-of-distribution (OOD) score fitted on the training images, and input
checks that need no model (not an X-ray, wrong DICOM modality/body part/view, age outside the range).

Features come from *taps*: ``(module_name, reduction_name)`` pairs. A tap reduces the output of one named
module of the network (or, for the module name ``"input"``, the network's input image) with a pure torch
function of ``REDUCTIONS`` that exports to ONNX, so that the served engine computes the logit and every tap
in one forward pass (``TappedModel``). The detector then scores those features with numpy.

The detector of new checkpoints (``METHOD``, ``default_recipe``) combines k-NN distances to the training
images in three views (Fisher's method on their p-values): what the network makes of the image (its last feature layer) and two
views that need no network, the image's coarse layout (where lungs, heart, diaphragm and shoulders lie:
a child's thorax is proportioned and framed differently from an adult's) and where its fine detail lies
(ribs, vessels, borders). The README's section "Intended use and out-of-distribution warnings" has the
measured comparison with the alternatives. The threshold is a distribution-free bound on a quantile of the
validation images' scores (``conservative_quantile``). Checkpoints written before taps hold a multi-layer
Mahalanobis detector (Lee et al., 2018); ``OODDetector.from_state`` still loads and scores it.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NOT_XRAY = "not an X-ray"
AGE_OUTSIDE = "patient age"
INPUT_TAP = "input"  # a tap on the network's input image (B, 1, H, W) in [0, 1], not on a module
FLAG_MEANING = "outside the training population ({population}): the probability is not reliable"
DEFAULT_POPULATION = "children 1–5 years, one hospital"


# ------------------------------------------------------------------ reductions: (B, C, H, W) or (B, F) -> (B, D)
def _mean_std(x: torch.Tensor) -> torch.Tensor:
    # mean and spread of each channel: the spread catches textures the mean misses (unbiased std, as the
    # detectors stored in older checkpoints were fitted with)
    x = x.float()
    if x.dim() == 2:
        return x
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _mean(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x if x.dim() == 2 else x.mean(dim=(2, 3))


def _gram(order: int):
    def reduce(x: torch.Tensor) -> torch.Tensor:
        """Row sums of the order-p Gram matrix of the channels (Sastry and Oore, 2020), per pixel."""
        flat = torch.flatten(x.float(), 2)
        powered = flat.pow(order)
        gram = torch.matmul(powered, powered.transpose(1, 2)) / flat.shape[2]
        return (torch.sign(gram) * gram.abs().pow(1.0 / order)).sum(dim=2)
    return reduce


def _block_means(x: torch.Tensor, cells: int) -> torch.Tensor:
    """Mean of each block of a cells x cells grid over the whole map, flattened. A map whose sides are not a
    multiple of ``cells`` is first resized (bilinear) up to the next multiple; a map smaller than ``cells``
    keeps its own pixels."""
    cells = min(cells, int(x.shape[2]), int(x.shape[3]))
    height, width = -(-int(x.shape[2]) // cells), -(-int(x.shape[3]) // cells)  # ceiling division
    x = x.float()
    if (height * cells, width * cells) != (int(x.shape[2]), int(x.shape[3])):
        x = F.interpolate(x, size=(height * cells, width * cells), mode="bilinear", align_corners=False)
    return torch.flatten(F.avg_pool2d(x, (height, width)), 1)


def _gradient(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:, :-1] - x[:, :, :-1, :-1]).abs() + (x[:, :, :-1, 1:] - x[:, :, :-1, :-1]).abs()


def _thumbnail(x: torch.Tensor) -> torch.Tensor:
    """The image at 8 x 8: where the lungs, mediastinum, diaphragm and shoulders lie, the thorax's shape."""
    return _block_means(x, 8)


def _edge_map(x: torch.Tensor) -> torch.Tensor:
    """Where the fine detail is: 24 x 24 block means of the gradient magnitude, standardised per image (the
    pattern of ribs, vessels and borders relative to the image, whatever the exposure and sharpness)."""
    blocks = _block_means(_gradient(x.float()), 24)
    centred = blocks - blocks.mean(dim=1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-6)


REDUCTIONS = {
    "mean_std": _mean_std,
    "mean": _mean,
    "flatten": lambda x: torch.flatten(x.float(), 1),
    "gram1": _gram(1), "gram2": _gram(2), "gram3": _gram(3),
    "thumbnail8": _thumbnail,
    "edge_map24": _edge_map,
}


# ------------------------------------------------------------------ taps: features in the same forward pass
def default_taps(model: nn.Module) -> list[tuple[str, str]]:
    """The taps a new detector needs (``default_recipe``'s, in order), known before fitting."""
    return list(dict.fromkeys(tap for _, tap, _ in default_recipe(model)))


def penultimate_layer(model: nn.Module) -> str:
    """The module whose output, pooled, is the head's input: the last declared feature layer."""
    layers = getattr(model, "feature_layers", None)
    if layers:
        return layers[-1]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]


class TappedModel(nn.Module):
    """``forward(x) -> (logits, [tap outputs in taps order])``.

    The hooks are registered once and write into storage local to the calling thread and to the call, so
    concurrent forwards on one wrapper (a server's threads) never see each other's activations; a forward of
    the bare model outside the wrapper is not captured. Exports to ONNX (opset 17) with the taps as outputs.
    """

    def __init__(self, model: nn.Module, taps):
        super().__init__()
        self.model = model
        self.taps = [(str(module), str(reduction)) for module, reduction in taps]
        modules = dict(model.named_modules())
        for module, reduction in self.taps:
            if reduction not in REDUCTIONS:
                raise ValueError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
            if module != INPUT_TAP and module not in modules:
                raise ValueError(f"the model has no module {module!r} to tap")
        self.train(model.training)  # the wrapper's mode is the model's (a later .train()/.eval() sets both)
        self._local = threading.local()
        self._handles = [modules[name].register_forward_hook(self._hook(name))
                         for name in dict.fromkeys(m for m, _ in self.taps if m != INPUT_TAP)]

    def _hook(self, name: str):
        def capture(module, inputs, output):
            store = getattr(self._local, "store", None)
            if store is None:  # a forward that is not ours (another caller of the bare model)
                return
            if name in store:
                raise RuntimeError(f"module {name!r} runs more than once per forward: tap another module")
            # reduce now: a later in-place operation (ReLU(inplace=True)) may overwrite the activation
            store[name] = {r: REDUCTIONS[r](output) for m, r in self.taps if m == name}
        return capture

    def forward(self, x: torch.Tensor):
        store = {INPUT_TAP: {r: REDUCTIONS[r](x) for m, r in self.taps if m == INPUT_TAP}}
        self._local.store = store
        try:
            logits = self.model(x)
        finally:
            self._local.store = None
        return logits, [store[module][reduction] for module, reduction in self.taps]

    def remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def extract(model: nn.Module, pixels_uint8, taps, device="cpu", batch_size: int = 64
            ) -> tuple[list[np.ndarray], np.ndarray]:
    """(features per tap, logits) of preprocessed uint8 images (N, H, W), in batches, in eval mode."""
    from .data.loader import to_model_input
    tapped = TappedModel(model, taps)
    outputs, logits = [[] for _ in tapped.taps], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(pixels_uint8), batch_size):
                batch = torch.from_numpy(np.array(pixels_uint8[start:start + batch_size]))
                batch_logits, features = tapped(to_model_input(batch, device))
                logits.append(batch_logits.float().reshape(len(batch)).cpu().numpy())
                for store, value in zip(outputs, features):
                    store.append(value.cpu().numpy().astype(np.float64))
    finally:
        tapped.remove_hooks()
        model.train(was_training)
    return [np.concatenate(o) for o in outputs], np.concatenate(logits).astype(np.float64)


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
    def fit(cls, features: np.ndarray, labels=None) -> "GaussianScore":
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
    def from_state(cls, state: dict) -> "GaussianScore":
        return cls(state["means"], state["precision"])


class NeighbourScore:
    """Distance to the k-th nearest training image in L2-normalised features (Sun et al., 2022)."""
    kind = "knn"

    def __init__(self, reference, k: int):
        from sklearn.neighbors import NearestNeighbors
        self.reference, self.k = _as_array(reference).astype(np.float32), int(k)
        # brute force: one matrix product, faster than trees in these dimensions (tens to hundreds)
        self.index = NearestNeighbors(n_neighbors=self.k, algorithm="brute").fit(self.reference)

    @staticmethod
    def normalise(features: np.ndarray) -> np.ndarray:
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 10) -> "NeighbourScore":
        return cls(cls.normalise(features), k)

    def score(self, features: np.ndarray) -> np.ndarray:
        distances, _ = self.index.kneighbors(self.normalise(features).astype(np.float32))
        return distances[:, -1].astype(np.float64)

    def state(self) -> dict:
        return {"reference": torch.from_numpy(self.reference), "k": self.k}

    @classmethod
    def from_state(cls, state: dict) -> "NeighbourScore":
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
            ("knn", (INPUT_TAP, "thumbnail8"), {"k": 10}),
            ("knn", (INPUT_TAP, "edge_map24"), {"k": 10})]


METHOD = ("k-NN distances (Sun et al., 2022) to the training images in three L2-normalised views (the last "
          "feature layer's channel means and spreads, the 8 x 8 thumbnail, the 24 x 24 edge map), combined by "
          "Fisher's method over their p-values among the training images' cross-fitted distances")


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


class OODDetector:
    """Components' evidence summed; an image scoring above ``threshold`` is flagged.

    Each component is a fitted scorer (``SCORERS``) of one tap's features. New detectors turn a component's
    score into an empirical p-value among the training images' cross-fitted scores and sum -2 log p (Fisher's method): one view that finds the image far outside counts fully, which an
    average would dilute. Detectors stored before taps average standardised scores (``combine="mean"``).
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
            recipe=None, **legacy_kwargs) -> "OODDetector":
        """Fit on ``fit``, a dict of numpy arrays: ``features`` (a list, one (N, D) array per tap of
        ``default_taps(model)``, or of ``recipe``'s taps), ``logits`` (N,), ``pixels`` (N, H, W) and ``labels``
        (N,); the threshold is ``conservative_quantile`` of the scores of ``held_out`` (the same keys but
        labels: the validation images, in distribution and never trained on) at ``quantile``.

        Each scorer is fitted on all of ``fit``; its calibration scores are cross-fitted (``FOLDS`` seeded
        folds, each scored by a scorer fitted on the others), so every training image calibrates and the
        held-out images only set the threshold, which keeps its bound. The older call ``fit(model, pixels, labels, device, ...,
        held_out_pixels=...)`` is still accepted: it extracts the features itself."""
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
                       held_out_pixels=None, **_) -> "OODDetector":
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
        return np.asarray(scores) > self.threshold

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
    def from_state(cls, state: dict) -> "OODDetector":
        if "version" not in state:
            return cls._from_legacy_state(state)
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
                   state.get("method", METHOD), state.get("combine", "fisher"))

    @classmethod
    def _from_legacy_state(cls, state: dict) -> "OODDetector":
        """The detector of checkpoints written before taps: per layer, a Gaussian on the channel means and
        standard deviations with its own centre and scale, the layers averaged."""
        components = [{"kind": "gaussian", "tap": index, "scorer": GaussianScore(means, precision),
                       "centre": float(centre), "scale": float(scale)}
                      for index, (means, precision, centre, scale) in
                      enumerate(zip(state["means"], state["precisions"], state["centres"], state["scales"]))]
        return cls([(layer, "mean_std") for layer in state["layers"]], components, state["threshold"],
                   state["quantile"], "multi-layer Mahalanobis (Lee et al., 2018), as fitted before taps", "mean")

    def describe(self) -> str:
        """One line for the model card."""
        return (f"{self.method}; taps {', '.join(f'{m}:{r}' for m, r in self.taps)}; an image scoring above "
                f"{self.threshold:.3f} (a 90%-confidence upper bound of the {self.quantile:.1%} quantile of "
                f"validation images) is flagged")


# ------------------------------------------------------------------ checks that need no model
def image_statistics(gray: np.ndarray) -> dict:
    values = gray.astype(np.float32)
    std = float(values.std())
    smooth = (values[1:-1, 1:-1] * 4 - values[:-2, 1:-1] - values[2:, 1:-1] - values[1:-1, :-2] - values[1:-1, 2:])
    roughness = float(np.abs(smooth).mean() / (std + 1e-6))
    return {"std": std, "roughness": roughness}


def _age_years(text: str | None):
    """DICOM Age String (``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``) in years; None when absent or unreadable."""
    if not text:
        return None
    text = text.strip().upper()
    try:
        if text[-1] in "DWMY":
            return float(text[:-1]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        return None


def _date(text: str | None):
    from datetime import datetime
    try:
        return datetime.strptime((text or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def patient_age_years(tags: dict):
    """PatientAge, else the years from PatientBirthDate to StudyDate (or AcquisitionDate); None if unknown."""
    age = _age_years(tags.get("PatientAge"))
    if age is not None:
        return age
    born = _date(tags.get("PatientBirthDate"))
    taken = _date(tags.get("StudyDate")) or _date(tags.get("AcquisitionDate"))
    if born is None or taken is None or taken < born:
        return None
    return (taken - born).days / 365.25


def input_warnings(gray: np.ndarray, meta=None, intended_use: dict | None = None) -> list[str]:
    """Checks that need no model: blank, noise, colour photographs; DICOM modality, body part, view, age."""
    warnings = []
    stats = image_statistics(gray)
    if stats["std"] < 3:
        warnings.append(f"{NOT_XRAY}: the image is blank (almost uniform)")
    elif stats["roughness"] > 1.2:
        warnings.append(f"{NOT_XRAY}: the image looks like noise, not anatomy")
    if meta is not None and getattr(meta, "saturation", 0) > 0.15:
        warnings.append(f"{NOT_XRAY}: the image is in colour (X-rays are grayscale)")
    tags = getattr(meta, "tags", {}) or {}
    modality = tags.get("Modality")
    if modality and modality.upper() not in ("CR", "DX", "DR"):
        warnings.append(f"DICOM modality {modality} is not a radiograph (CR/DX)")
    body = tags.get("BodyPartExamined")
    if body and "CHEST" not in body.upper() and "THORAX" not in body.upper():
        warnings.append(f"DICOM body part {body} is not the chest")
    view = tags.get("ViewPosition")
    if view and view.upper() not in ("PA", "AP"):
        warnings.append(f"DICOM view {view} is not a frontal (PA/AP) view")
    age = patient_age_years(tags)
    age_range = (intended_use or {}).get("age_range_years")
    if age is not None and age_range and not (age_range[0] <= age <= age_range[1]):
        warnings.append(f"{AGE_OUTSIDE} {age:.3g} years is outside the training population "
                        f"({age_range[0]:g}-{age_range[1]:g} years)")
    return warnings


def flag_reasons(gray: np.ndarray, meta=None, intended_use: dict | None = None) -> list[str]:
    """The input warnings that set the out-of-distribution flag whatever the score: the image is not an
    X-ray, or its DICOM puts the patient's age outside the training population's range."""
    return [w for w in input_warnings(gray, meta, intended_use) if w.startswith((NOT_XRAY, AGE_OUTSIDE))]


def training_population(intended_use: dict | None = None) -> str:
    """The population in a few words, from the checkpoint's intended use (the Kaggle set's by default)."""
    use = intended_use or {}
    ages = use.get("age_range_years")
    if not ages:
        stated = str(use.get("population", ""))
        return DEFAULT_POPULATION if not use else stated if stated and not stated.startswith("not stated") \
            else "the training images' population, not stated"
    who = "children" if float(ages[1]) < 18 else "patients"
    import re
    sites = re.findall(r"\b(centers?|centres?|hospitals?)\b", str(use.get("population", "")).lower())
    one_site = len(sites) == 1 and not sites[0].endswith("s")
    return f"{who} {float(ages[0]):g}–{float(ages[1]):g} years" + (", one hospital" if one_site else "")


def flag_message(intended_use: dict | None = None) -> str:
    """What the flag means, as the outputs say it."""
    return FLAG_MEANING.format(population=training_population(intended_use))
