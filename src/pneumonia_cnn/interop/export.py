"""Export a checkpoint to ONNX or TorchScript as a self-describing model.

The exported graph takes ``image``: float32 (batch, channels, height, width) with pixels scaled to [0, 1]
(after the checkpoint's intensity standardisation) and returns ``probability`` (batch,), calibrated with
the run's temperature and averaged over the horizontal flip when the run uses test-time augmentation:
exactly what ``Predictor`` computes. The batch axis is dynamic. Input size, channels, normalisation,
threshold and class names travel in the metadata (ONNX ``metadata_props``; TorchScript ``metadata.json``).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import build_model, load_checkpoint
from ..errors import PneumoniaCNNError
from ..fileio import atomic_path


class ProbabilityModel(nn.Module):
    def __init__(self, model: nn.Module, temperature: float = 1.0, tta: bool = False):
        super().__init__()
        self.model, self.temperature, self.tta = model, float(temperature), bool(tta)

    def forward(self, image):
        logits = self.model(image)
        if self.tta:
            logits = (logits + self.model(torch.flip(image, dims=[3]))) / 2
        return torch.sigmoid(logits / self.temperature)


def export_metadata(checkpoint: dict) -> dict:
    pre = checkpoint["preprocessing"]
    return {"producer": "pneumonia-cnn", "model": checkpoint["model"]["name"], "run_id": checkpoint.get("run_id", ""),
            "input_size": pre["size"], "channels": pre.get("channels", 3),
            "normalisation": "pixels / 255 (0..1) after intensity standardisation; gray repeated to RGB if 3 channels",
            "intensity": pre.get("intensity", "none"), "interpolation": pre.get("interpolation", "bilinear"),
            "threshold": float(checkpoint.get("threshold", 0.5)), "temperature": float(checkpoint.get("temperature", 1.0)),
            "class_names": checkpoint.get("class_names", ["NORMAL", "PNEUMONIA"]),
            "output": "probability of class_names[1] (PNEUMONIA)"}


def export_model(checkpoint_path, fmt: str, out) -> Path:
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint).eval()
    wrapper = ProbabilityModel(model, checkpoint.get("temperature", 1.0), checkpoint.get("tta", False)).eval()
    metadata = export_metadata(checkpoint)
    height, width = metadata["input_size"]
    example = torch.rand(2, metadata["channels"], height, width)
    out = Path(out)
    if fmt == "onnx":
        import onnx
        with atomic_path(out) as temporary, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), str(temporary), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["probability"],
                              dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}})
            proto = onnx.load(str(temporary))
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, json.dumps(value) if not isinstance(value, str) else value
            onnx.checker.check_model(proto)
            onnx.save(proto, str(temporary))
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, example)
        with atomic_path(out) as temporary:
            torch.jit.save(traced, str(temporary), _extra_files={"metadata.json": json.dumps(metadata)})
    else:
        raise PneumoniaCNNError(f"unknown export format {fmt!r}: onnx or torchscript")
    return out
