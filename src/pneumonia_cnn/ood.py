"""Knowing when not to answer: an out-of-distribution score fitted on the training features, and
input checks that need no model (not an X-ray, wrong DICOM modality/body part/view, age outside range).

The score follows Lee et al. (NeurIPS 2018): class-conditional Gaussians with a shared covariance on the
globally pooled features of several layers; each layer's Mahalanobis distance to the nearest class is
standardised on images held out of the fit, and the layers are averaged. The threshold is a stated
quantile of the held-out scores, so about (1 - quantile) of in-distribution images are flagged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

NOT_XRAY = "not an X-ray"


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def layer_features(model: nn.Module, pixels_uint8, device, layers, batch_size: int = 64) -> list[np.ndarray]:
    """Globally average-pooled activations of ``layers`` for preprocessed uint8 images (N, H, W)."""
    from .data.loader import to_model_input
    captured: dict[str, torch.Tensor] = {}
    handles = [_module(model, name).register_forward_hook(
        lambda m, i, o, n=name: captured.__setitem__(n, o)) for name in layers]
    outputs = {name: [] for name in layers}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(pixels_uint8), batch_size):
                batch = torch.from_numpy(np.array(pixels_uint8[start:start + batch_size]))
                model(to_model_input(batch, device))
                for name in layers:
                    value = captured[name].float()
                    if value.dim() == 4:
                        # mean and spread of each channel: spread catches textures the mean misses
                        value = torch.cat([value.mean(dim=(2, 3)), value.std(dim=(2, 3))], dim=1)
                    outputs[name].append(value.cpu().numpy().astype(np.float64))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [np.concatenate(outputs[name]) for name in layers]


def feature_layer_names(model: nn.Module) -> list[str]:
    declared = getattr(model, "feature_layers", None)
    if declared:
        return list(declared)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-3:]


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
    def __init__(self, layers, means, precisions, centres, scales, threshold, quantile):
        self.layers, self.means, self.precisions = list(layers), means, precisions
        self.centres, self.scales = centres, scales
        self.threshold, self.quantile = float(threshold), float(quantile)

    @staticmethod
    def _fit_layer(features: np.ndarray, labels: np.ndarray):
        classes = sorted(set(labels.tolist()))
        means = np.stack([features[labels == c].mean(0) for c in classes])
        centred = np.concatenate([features[labels == c] - means[i] for i, c in enumerate(classes)])
        covariance = centred.T @ centred / max(len(centred) - 1, 1)
        # shrinkage keeps the inverse stable when features outnumber images
        shrink = 0.1
        covariance = (1 - shrink) * covariance + shrink * np.eye(len(covariance)) * np.trace(covariance) / len(covariance)
        return means, np.linalg.pinv(covariance)

    @staticmethod
    def _distance(features, means, precision):
        distances = []
        for mean in means:
            delta = features - mean
            distances.append(np.einsum("ij,jk,ik->i", delta, precision, delta))
        return np.sqrt(np.maximum(np.min(np.stack(distances), axis=0), 0))

    @classmethod
    def fit(cls, model, pixels_uint8, labels, device, quantile: float = 0.975, holdout: float = 0.2,
            seed: int = 0, max_images: int = 3000, held_out_pixels=None) -> "OODDetector":
        """Gaussians on ``pixels_uint8``; scale and threshold on ``held_out_pixels`` (the validation images:
        in distribution and never trained on, so their scores are what a new in-distribution X-ray gets),
        else on a ``holdout`` part of the training images kept out of the fit."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(labels))[:max_images]
        layers = feature_layer_names(model)
        if held_out_pixels is not None and len(held_out_pixels) >= 20:
            fit_part = np.sort(order)
            held_images = np.asarray(held_out_pixels)[np.sort(rng.permutation(len(held_out_pixels))[:max_images])]
        else:
            cut = max(1, int(len(order) * holdout))
            fit_part = np.sort(order[cut:])
            held_images = pixels_uint8[np.sort(order[:cut])]
        fit_features = layer_features(model, pixels_uint8[fit_part], device, layers)
        held_features = layer_features(model, held_images, device, layers)
        means, precisions, centres, scales, held_scores = [], [], [], [], []
        for features, held_layer in zip(fit_features, held_features):
            m, p = cls._fit_layer(features, np.asarray(labels)[fit_part])
            distance = cls._distance(held_layer, m, p)
            means.append(m), precisions.append(p)
            centres.append(float(np.median(distance)))
            scales.append(float(np.percentile(distance, 75) - np.percentile(distance, 25)) or 1.0)
            held_scores.append((distance - centres[-1]) / scales[-1])
        threshold = conservative_quantile(np.mean(held_scores, axis=0), quantile)
        return cls(layers, means, precisions, centres, scales, threshold, quantile)

    @classmethod
    def fit_features(cls, layers, fit_features, labels, held_features, quantile: float = 0.975) -> "OODDetector":
        """Gaussians on ``fit_features`` (one array per layer); scale and threshold on ``held_features``."""
        means, precisions, centres, scales, held_scores = [], [], [], [], []
        for features, held_layer in zip(fit_features, held_features):
            m, p = cls._fit_layer(features, np.asarray(labels))
            distance = cls._distance(held_layer, m, p)
            means.append(m), precisions.append(p)
            centres.append(float(np.median(distance)))
            scales.append(float(np.percentile(distance, 75) - np.percentile(distance, 25)) or 1.0)
            held_scores.append((distance - centres[-1]) / scales[-1])
        threshold = conservative_quantile(np.mean(held_scores, axis=0), quantile)
        return cls(layers, means, precisions, centres, scales, threshold, quantile)

    def score_features(self, features, logits=None, pixels=None) -> np.ndarray:
        per_layer = [(self._distance(f, m, p) - c) / s for f, m, p, c, s in
                     zip(features, self.means, self.precisions, self.centres, self.scales)]
        return np.mean(per_layer, axis=0)

    def score(self, model, pixels_uint8, device) -> np.ndarray:
        features = layer_features(model, pixels_uint8, device, self.layers)
        per_layer = [(self._distance(f, m, p) - c) / s for f, m, p, c, s in
                     zip(features, self.means, self.precisions, self.centres, self.scales)]
        return np.mean(per_layer, axis=0)

    def state(self) -> dict:
        return {"layers": self.layers, "means": [torch.from_numpy(m) for m in self.means],
                "precisions": [torch.from_numpy(p) for p in self.precisions], "centres": self.centres,
                "scales": self.scales, "threshold": self.threshold, "quantile": self.quantile}

    @classmethod
    def from_state(cls, state: dict) -> "OODDetector":
        return cls(state["layers"], [m.numpy() for m in state["means"]], [p.numpy() for p in state["precisions"]],
                   state["centres"], state["scales"], state["threshold"], state["quantile"])


def image_statistics(gray: np.ndarray) -> dict:
    values = gray.astype(np.float32)
    std = float(values.std())
    smooth = (values[1:-1, 1:-1] * 4 - values[:-2, 1:-1] - values[2:, 1:-1] - values[1:-1, :-2] - values[1:-1, 2:])
    roughness = float(np.abs(smooth).mean() / (std + 1e-6))
    return {"std": std, "roughness": roughness}


def _age_years(text: str | None):
    if not text:
        return None
    text = text.strip().upper()
    try:
        if text[-1] in "DWMY":
            return float(text[:-1]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        return None


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
    age = _age_years(tags.get("PatientAge"))
    age_range = (intended_use or {}).get("age_range_years")
    if age is not None and age_range and not (age_range[0] <= age <= age_range[1]):
        warnings.append(f"patient age {age:g} years is outside the training population "
                        f"({age_range[0]:g}-{age_range[1]:g} years)")
    return warnings


def _mean_std(activation: torch.Tensor) -> torch.Tensor:
    """Channel means and spreads of a feature map (spread catches textures the mean misses); vectors as is."""
    if activation.dim() == 4:
        return torch.cat([activation.mean(dim=(2, 3)), activation.std(dim=(2, 3))], dim=1)
    return activation.flatten(1)


# reductions of a tapped layer's output to one vector per image: torch ops that export to ONNX
REDUCTIONS = {"mean_std": _mean_std}


def detector_taps(detector: "OODDetector") -> list[tuple[str, str]]:
    return [(layer, "mean_std") for layer in detector.layers]


def flag_reasons(warnings: list[str]) -> list[str]:
    """The input-check warnings that set the out-of-distribution flag by themselves."""
    return [w for w in warnings if w.startswith(NOT_XRAY)]


def default_taps(model: nn.Module) -> list[tuple[str, str]]:
    """The layers (and their reduction) a new detector is fitted on."""
    return [(layer, "mean_std") for layer in feature_layer_names(model)]
