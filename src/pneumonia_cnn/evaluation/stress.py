"""Robustness suite: the model's scores under a fixed, seeded panel of acquisition-like shifts.

Shifts act on the raw gray image at the model's input size, *before* the checkpoint's intensity
standardisation, as a different X-ray machine or exposure would; the standardisation then runs as usual.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..data.cache import build_or_load
from ..data.dataset import evaluated_name, load_split
from ..data.intensity import standardise_intensity
from ..fileio import write_json_atomic
from ..inference import Predictor
from ..metrics import point_metrics
from .metrics import FEW_PER_CLASS


def _float(gray):
    return gray.astype(np.float32) / 255.0


def _uint8(values):
    return np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)


def gamma(gray, g):
    return _uint8(_float(gray) ** g)


def contrast(gray, factor):
    x = _float(gray)
    return _uint8((x - x.mean()) * factor + x.mean())


def blur(gray, sigma):
    return _uint8(ndimage.gaussian_filter(_float(gray), sigma, mode="nearest"))


def noise(gray, std, seed):
    rng = np.random.default_rng(seed)
    return _uint8(_float(gray) + rng.normal(0, std, gray.shape))


def jpeg(gray, quality):
    buffer = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), dtype=np.uint8)


def down_up(gray, factor):
    height, width = gray.shape
    small = Image.fromarray(gray, mode="L").resize((max(1, int(width * factor)), max(1, int(height * factor))),
                                                   Image.BILINEAR)
    return np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.uint8)


def border_crop(gray, fraction):
    """Cut ``fraction`` of the height and width from every side, then resize back (a tighter collimation)."""
    height, width = gray.shape
    dy, dx = int(round(height * fraction)), int(round(width * fraction))
    crop = gray[dy:height - dy, dx:width - dx]
    return np.asarray(Image.fromarray(crop, mode="L").resize((width, height), Image.BILINEAR), dtype=np.uint8)


def rotate(gray, degrees):
    return _uint8(ndimage.rotate(_float(gray), degrees, reshape=False, order=1, mode="nearest"))


SHIFT_PANEL = {
    "gamma 0.6": lambda g, i: gamma(g, 0.6),
    "gamma 1.6": lambda g, i: gamma(g, 1.6),
    "contrast x0.7": lambda g, i: contrast(g, 0.7),
    "contrast x1.3": lambda g, i: contrast(g, 1.3),
    "blur sigma 1": lambda g, i: blur(g, 1.0),
    "blur sigma 2": lambda g, i: blur(g, 2.0),
    "noise std 0.05": lambda g, i: noise(g, 0.05, 1000 + i),
    "jpeg q30": lambda g, i: jpeg(g, 30),
    "down-up x0.5": lambda g, i: down_up(g, 0.5),
    "border crop 10%": lambda g, i: border_crop(g, 0.10),
    "rotate 5deg": lambda g, i: rotate(g, 5.0),
}


def _scores(labels, probabilities, threshold):
    metrics = point_metrics(labels, probabilities, threshold)
    return {key: (None if not np.isfinite(metrics[key]) else metrics[key])
            for key in ("roc_auc", "sensitivity", "specificity", "accuracy")}


def stress_test(checkpoint, data, split="test", device="auto", cache_dir=None, out=None, shifts=None) -> dict:
    predictor = Predictor(checkpoint, device)
    images = load_split(data, split, class_names=predictor.class_names)
    pre = predictor.bundle.preprocessing
    raw = build_or_load(images, pre.size, pre.interpolation, "none", cache_dir=cache_dir)
    intensity = pre.intensity
    labels = raw.labels
    raw_images = np.asarray(raw.images)

    def run(transform):
        shifted = np.stack([standardise_intensity(transform(g, i) if transform else g, intensity)
                            for i, g in enumerate(raw_images)])
        return _scores(labels, predictor.predict_arrays(shifted), predictor.threshold)

    baseline = run(None)
    rows = []
    for name, transform in (shifts or SHIFT_PANEL).items():
        scores = run(transform)
        scores["shift"] = name
        for key in ("roc_auc", "sensitivity", "specificity"):
            if scores[key] is not None and baseline[key] is not None:
                scores[f"delta_{key}"] = scores[key] - baseline[key]
        rows.append(scores)
    lowered = [r for r in rows if r.get("delta_roc_auc") is not None and r["delta_roc_auc"] < 0]
    worst = min(lowered, key=lambda r: r["roc_auc"]) if lowered else None  # null when none lowered it, as the table
    result = {"checkpoint": str(predictor.checkpoints[0]["path"]), "data": str(data), "split": split,
              "n_images": int(len(labels)), "threshold": predictor.threshold, "baseline": baseline, "shifts": rows,
              "worst_roc_auc": worst and {"shift": worst["shift"], "roc_auc": worst["roc_auc"]},
              "largest_sensitivity_drop": _largest_drop(rows, "sensitivity"),
              "largest_specificity_drop": _largest_drop(rows, "specificity"),
              "notes": stress_notes(labels, predictor.class_names)}
    if out:
        write_json_atomic(Path(out), result)
    return result


def _largest_drop(rows, metric: str) -> float | None:
    """The most negative change of ``metric`` over the shifts, 0.0 when none fell (the table's "none": a rise had
    been stored as the "largest drop"); None when no shift has one (a split without the class it needs)."""
    changes = [r[f"delta_{metric}"] for r in rows if f"delta_{metric}" in r]
    return min(min(changes), 0.0) if changes else None


def stress_notes(labels, class_names) -> list[str]:
    """As ``evaluate`` notes it: a split of one class has no ROC AUC and one recall undefined; with fewer than
    FEW_PER_CLASS images of a class, each change moves in steps of 1/n of that class (one image of ten: 0.1)."""
    labels = np.asarray(labels).astype(int)
    counts = [int((labels == c).sum()) for c in (0, 1)]
    notes = []
    if len(labels) and min(counts) == 0:
        here, other = (1, 0) if counts[1] else (0, 1)
        notes.append(f"ROC AUC needs both classes: this split has only {class_names[here]} ({counts[here]} "
                     f"image{'s' if counts[here] != 1 else ''}); {'specificity' if here == 1 else 'sensitivity'} is "
                     f"undefined too (no {class_names[other]} image), so neither is measured under any shift")
    if len(labels) and min(c for c in counts if c) < FEW_PER_CLASS:
        which = ", ".join(f"{name} {c}" for name, c in zip(class_names, counts) if c)
        notes.append(f"changes unreliable: fewer than {FEW_PER_CLASS} images of a class (images per class: {which}; "
                     f"{len(labels)} image{'s' if len(labels) != 1 else ''} in all); one image's call moves a "
                     f"sensitivity or specificity by 1/n of its class")
    return notes


VALUE_WIDTH, CHANGE_WIDTH = 13, 9  # "  sensitivity" over "       0.9876", then " (+0.012)" or as many spaces


def format_stress(result: dict) -> str:
    def cell(value, delta=None):
        if value is None:
            return f"{'-':>{VALUE_WIDTH}}{'':{CHANGE_WIDTH}}"
        return f"{value:{VALUE_WIDTH}.4f}" + (f"{f' ({delta:+.3f})':<{CHANGE_WIDTH}}" if delta is not None
                                              else " " * CHANGE_WIDTH)
    head = "".join(f"{name:>{VALUE_WIDTH}}{' (change)':<{CHANGE_WIDTH}}"
                   for name in ("ROC AUC", "sensitivity", "specificity"))
    lines = [f"stress test on {evaluated_name(result.get('data', ''), result['split'])} ({result['n_images']} "
             f"images), threshold {result['threshold']:.3f}",
             f"{'shift':<18}{head}"]
    base = result["baseline"]
    lines.append(f"{'none':<18}{cell(base['roc_auc'])}{cell(base['sensitivity'])}{cell(base['specificity'])}")
    for row in result["shifts"]:
        lines.append(f"{row['shift']:<18}{cell(row['roc_auc'], row.get('delta_roc_auc'))}"
                     f"{cell(row['sensitivity'], row.get('delta_sensitivity'))}"
                     f"{cell(row['specificity'], row.get('delta_specificity'))}")
    worst = result["worst_roc_auc"]
    if result["shifts"]:  # a one-class split too: its defined drop was never printed, its undefined one unnamed
        lowered = worst is not None and (base["roc_auc"] is None or worst["roc_auc"] < base["roc_auc"])
        drops = [f"{name} undefined" if value is None else f"{name} {value:+.3f}" if value < 0 else
                 f"{name} none"  # a rise is no drop ("+0.000" read as one)
                 for name, value in (("sensitivity", result["largest_sensitivity_drop"]),
                                     ("specificity", result["largest_specificity_drop"]))]
        lines.append((f"worst case: {worst['shift']} (ROC AUC {worst['roc_auc']:.4f})" if lowered else
                      "no shift lowered the ROC AUC" if base["roc_auc"] is not None else "ROC AUC undefined")
                     + f"; largest drops: {', '.join(drops)}")
    lines += [f"note: {note}" for note in result.get("notes", [])]
    return "\n".join(line.rstrip() for line in lines)
