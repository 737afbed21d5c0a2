"""Export a checkpoint to ONNX or TorchScript as a self-describing model.

The exported graph takes ``image``: float32 (batch, channels, height, width) with pixels scaled to [0, 1]
(after the checkpoint's intensity standardisation) and returns ``probability`` (batch,), calibrated with
the run's calibration and averaged over the horizontal flip when the run uses test-time augmentation, and
``logit`` (batch,), the raw score before calibration: the served forward (``ServedModel``) that ``Predictor``
runs, with the calibration folded into the graph. The batch axis is dynamic. Input size, channels, normalisation,
threshold and class names travel in the metadata (ONNX ``metadata_props``; TorchScript ``metadata.json``), with the
checkpoint's intended use and population, and ``out_of_distribution``: the graph computes no out-of-distribution
flag, which pneumonia-cnn's own commands give with the checkpoint. Exporting a checkpoint whose decision was never
fitted (a run's last.pt, an imported Keras model: threshold 0.5, no calibration) warns in one line.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..calibration import Calibration, is_operating_point
from ..checkpoint import build_model, load_checkpoint
from ..data.intensity import INTENSITY_RECIPES
from ..errors import PneumoniaCNNError
from ..fileio import atomic_path, display_path
from ..inference.bundle import decision_of
from ..inference.engines import ServedModel
from ..ood import training_population

log = logging.getLogger("pneumonia_cnn")


class ProbabilityModel(nn.Module):
    """The served forward, then the checkpoint's calibration: (probability, raw logit)."""

    def __init__(self, model: nn.Module, calibration: Calibration, tta: bool = False):
        super().__init__()
        self.served = ServedModel(model, tta)
        self.scale, self.bias = float(calibration.scale), float(calibration.bias)

    def forward(self, image):
        logits = self.served(image)[0]
        return torch.sigmoid(logits * self.scale + self.bias), logits


FLOAT_OUTPUT = "probability of class_names[1] (PNEUMONIA)"
# the int8 graph is the served one (``ServedModel``, as --engine onnx-int8 runs it), not ``ProbabilityModel``:
# its outputs are the raw score and the OOD taps, so its metadata says how to turn the score into the decision
INT8_OUTPUT = ("logit: the raw score of class_names[1] (PNEUMONIA), averaged over the horizontal flip when the "
               "run uses test-time augmentation, before calibration: probability = sigmoid(logit * "
               "calibration.scale + calibration.bias), then compared with threshold; tap0, tap1, ...: the "
               "out-of-distribution detector's features of the unflipped image")


# float32 steps the exported threshold sits below the checkpoint's: the graph's float32 sigmoid (or a consumer's, on
# the int8 graph's logit) lands within about one step of the float64 probability ``predict`` compares
THRESHOLD_FLOAT32_STEPS = 2


def exported_threshold(checkpoint: dict) -> dict:
    """The threshold an exported graph's float32 probability is compared with. An operating point is a validation
    image's probability: the checkpoint's rounded down to float32, then a few float32 steps lower, so that the
    image on it keeps ``predict``'s label (the graph gave it 0.93118167 against 0.9311816870, and NORMAL); only a
    probability within ~1e-7 below moves to positive. ``threshold_exact`` keeps the checkpoint's value."""
    exact = float(checkpoint.get("threshold", 0.5))
    if not is_operating_point(decision_of(checkpoint).policy):
        return {"threshold": exact}
    value = np.float32(exact)
    if float(value) > exact:
        value = np.nextafter(value, np.float32(-np.inf))
    for _ in range(THRESHOLD_FLOAT32_STEPS):
        value = np.nextafter(value, np.float32(-np.inf))
    return {"threshold": float(value), "threshold_exact": exact}


def export_metadata(checkpoint: dict, channels: int | None = None, output: str = FLOAT_OUTPUT) -> dict:
    """What an exported graph carries about its input, decision and intended use. ``channels`` and ``output``:
    those of the graph written when they are not the checkpoint's (the int8 served graph takes one gray channel)."""
    pre = dict(checkpoint["preprocessing"], **({} if channels is None else {"channels": channels}))
    return {"producer": "pneumonia-cnn", "model": checkpoint["model"]["name"], "run_id": checkpoint.get("run_id", ""),
            "input_size": pre["size"], "channels": pre.get("channels", 3),
            "normalisation": "pixels / 255 (0..1) after intensity standardisation; gray repeated to RGB if 3 channels",
            "intensity": pre.get("intensity", "none"), "interpolation": pre.get("interpolation", "bilinear"),
            "preprocessing_steps": preprocessing_steps(pre),
            **exported_threshold(checkpoint), "threshold_policy": decision_of(checkpoint).policy,
            # the comparison, which the threshold alone does not say (a probability equal to it is PNEUMONIA)
            "label_rule": f"{checkpoint.get('class_names', ['NORMAL', 'PNEUMONIA'])[-1]} when probability >= "
                          "threshold, else the first class",
            "calibration": decision_of(checkpoint).calibration.to_dict(),
            "decision_fitted_on": decision_fitted_on(checkpoint),
            "class_names": checkpoint.get("class_names", ["NORMAL", "PNEUMONIA"]),
            "output": output, **intended_use_metadata(checkpoint)}


NOT_A_MEDICAL_DEVICE = "not a medical device: for research and education; never the sole basis of a clinical decision"


def intended_use_metadata(checkpoint: dict) -> dict:
    """The checkpoint's intended use (its model card's, without the training machine's paths), whether it is a
    medical device, and that the graph flags nothing out of distribution: an integrator running it gets a
    probability for an adult's X-ray, a lateral view or a photograph, with no word that it means nothing there."""
    use = checkpoint.get("intended_use") if isinstance(checkpoint.get("intended_use"), dict) else {}
    trained_on = use.get("trained_on") if isinstance(use.get("trained_on"), dict) else None
    stated = {"task": use.get("task", "not recorded in the checkpoint"),
              "population": use.get("population", "not recorded in the checkpoint"),
              "age_range_years": use.get("age_range_years"),
              "trained_on": None if trained_on is None else {k: v for k, v in trained_on.items() if k != "source"}}
    checks = ("not an X-ray, too small, a DICOM of another body part, view or modality, an age outside the "
              "intended range")
    flagged = (f"its out-of-distribution detector and the input checks ({checks})" if checkpoint.get("ood") else
               f"the input checks alone ({checks}); this checkpoint has no fitted out-of-distribution detector")
    metadata = {"intended_use": stated,
                "out_of_distribution": (
                    f"not computed: this graph gives a probability for every image and no out-of-distribution flag, "
                    f"so an image outside the intended population ({training_population(use or None)}), such as an "
                    f"adult's X-ray, another view or modality, or no X-ray at all, gets a probability without a "
                    f"warning; pneumonia-cnn's own commands (predict, serve) with the checkpoint it was exported from "
                    f"(run {checkpoint.get('run_id', '?')}) flag such images, by {flagged}")}
    if use.get("not_a_medical_device"):
        metadata["medical_device"] = NOT_A_MEDICAL_DEVICE
    return metadata


def decision_fitted_on(checkpoint: dict) -> str:
    """The images the threshold and calibration were fitted on, or that they were fitted on none."""
    fit = checkpoint.get("decision_fit") if isinstance(checkpoint.get("decision_fit"), dict) else None
    if fit is None and never_fitted(checkpoint):
        return f"none: {unfitted_decision(checkpoint)}, fitted on no images"
    if fit is None:  # an earlier version's checkpoint, or an adapted one: fitted, on images it does not name
        return (f"not recorded: {unfitted_decision(checkpoint)} by the policy {checkpoint.get('threshold_policy')}, "
                f"fitted on images this checkpoint does not name")
    fixed = fit.get("threshold_fixed")
    text = f"{fit['images']} {fit.get('split', 'val')} images" if fit.get("images") else "recorded in the checkpoint"
    return text + (f"; the threshold fixed since at {fixed} by --threshold, not fitted" if fixed is not None else "")


def never_fitted(checkpoint: dict) -> bool:
    """No record of a fit, and the decision is the unfitted one: threshold 0.5 by policy, no calibration (a
    checkpoint of an earlier version, or an adapted one, has no record but a fitted policy and calibration)."""
    if isinstance(checkpoint.get("decision_fit"), dict):
        return False
    return (decision_of(checkpoint).calibration.method == "none"
            and str(checkpoint.get("threshold_policy", "0.5")) == "0.5")


def unfitted_decision(checkpoint: dict) -> str:
    decision = decision_of(checkpoint)
    calibration = "no calibration" if decision.calibration.method == "none" else \
        f"{decision.calibration.method} calibration"
    return f"threshold {decision.threshold:g}, {calibration}"


def warn_without_fitted_decision(checkpoint: dict) -> None:
    """One line on stderr when the checkpoint's decision was never fitted (no ``decision_fit``: a run's last.pt,
    a best.pt whose run did not finish, an imported Keras model): the graph carries threshold 0.5 and no
    calibration, which an integrator would take for the run's fitted decision."""
    if not never_fitted(checkpoint):
        return
    where = display_path(checkpoint.get("path", "?"))
    if checkpoint.get("imported") or (checkpoint.get("config") or {}).get("imported_from"):
        why = "an imported model's, never fitted here"
        instead = (f"fit one on labelled validation images first (pneumonia-cnn evaluate --checkpoint {where} --data "
                   f"ROOT --threshold youden --calibration platt --save-as fitted.pt) and export fitted.pt")
    else:
        why = "saved before its run's end-of-run steps fitted one"
        instead = ("export the run's best.pt after its training has finished (pneumonia-cnn train --resume RUN "
                   "finishes a stopped run)")
    log.warning("warning: %s: no fitted decision (%s: %s), so the exported graph carries none; %s", where,
                unfitted_decision(checkpoint), why, instead)


def onnx_metadata_props(metadata: dict) -> dict[str, str]:
    """``metadata`` as ONNX ``metadata_props`` (text only): text as it is, anything else as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def int8_metadata(checkpoint: dict) -> dict[str, str]:
    """The float export's metadata, for the int8 served graph: one gray channel in, the raw score out."""
    return onnx_metadata_props(export_metadata(checkpoint, channels=1, output=INT8_OUTPUT))


def export_int8_model(checkpoint_path, data_root, out) -> dict:
    """``export --format onnx-int8``: ``quantize.export_int8``, with the float export's metadata in ``out``."""
    from ..inference.quantize import export_int8
    warn_without_fitted_decision(load_checkpoint(checkpoint_path))
    return export_int8(checkpoint_path, data_root, out, describe=int8_metadata)


# how each file becomes 8-bit gray (data/readers.py, data/image.py, data/dicom.py), by Pillow mode: it said
# "convert('L')" for every image, which clips a 16-bit PNG to white and a float TIFF to nearly black
DECODING = ("images: the first frame, by Pillow mode: 16-bit modes ('I;16', 'I;16B', ...): (510 * x + L) // (2 * "
            "L) in integers (x * 255 / L rounded), L = 255 when the image's largest value is at most 255, 4095 "
            "when at most 4095 (12-bit data), else 65535 (x / 257); 16-bit colour and gray+alpha PNGs and 16-bit "
            "colour TIFFs from all 16 bits of their samples: gray = (R * 19595 + G * 38470 + B * 7471 + 32768) >> "
            "16, alpha over black as (gray * alpha + 32767) // 65535, then the 16-bit rule above; 'I' (32-bit "
            "integer; unsigned when the TIFF's SampleFormat says so, which Pillow reads as signed) and 'F' "
            "(float): min-max (below); 'RGBA', 'LA', 'PA', and 'P' with transparency: Image.alpha_composite over "
            "opaque black, then convert('L'); 'CMYK': convert('RGB') then convert('L'); any other mode: "
            "convert('L'); DICOM: pydicom apply_modality_lut then apply_voi_lut (first window; a LUT that cannot "
            "be applied, or whose result is not finite or is one value, is skipped: a failed rescale skips the "
            "window too), then min-max unless already uint8, MONOCHROME1 inverted (255 - x); an image's EXIF "
            "orientation applied to the 8-bit gray result, as Pillow's ImageOps.exif_transpose does; min-max: "
            "over the finite values, round((x - min) * (255 / (max - min))) in float64 with numpy's round (half "
            "to even), NaN and -inf taken as min, +inf as max, all 0 when max == min")


def preprocessing_steps(pre: dict) -> str:
    """The input path in the order it runs, with each step's implementation: what another runtime must do to
    give the exported graph the pixels it was fitted on."""
    height, width = pre["size"]
    intensity = pre.get("intensity", "none")
    return (f"1. decode to 8-bit gray ({DECODING}); 2. resize to {width}x{height} (width x height) with "
            f"Pillow Image.resize({pre.get('interpolation', 'bilinear')}); 3. intensity '{intensity}': "
            f"{INTENSITY_RECIPES.get(intensity, intensity)}; 4. float32 = uint8 / 255, shape (batch, "
            f"{pre.get('channels', 3)}, {height}, {width})")


def export_model(checkpoint_path, fmt: str, out) -> Path:
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint).eval()
    warn_without_fitted_decision(checkpoint)
    wrapper = ProbabilityModel(model, decision_of(checkpoint).calibration, checkpoint.get("tta", False)).eval()
    metadata = export_metadata(checkpoint)
    height, width = metadata["input_size"]
    example = torch.rand(2, metadata["channels"], height, width)
    out = Path(out)
    if fmt == "onnx":
        import onnx
        # written through memory: torch's writers take only paths that are UTF-8 text, and a folder or name with
        # another byte ended in a 4,000-line traceback; Python's own writes take any name
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["probability", "logit"],
                              dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"},
                                            "logit": {0: "batch"}})
        proto = onnx.load_from_string(buffer.getvalue())
        for key, value in onnx_metadata_props(metadata).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        with atomic_path(out) as temporary:
            temporary.write_bytes(proto.SerializeToString())
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, example)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"metadata.json": json.dumps(metadata)})
        with atomic_path(out) as temporary:
            temporary.write_bytes(buffer.getvalue())
    else:
        raise PneumoniaCNNError(f"unknown export format {fmt!r}: onnx or torchscript")
    return out
