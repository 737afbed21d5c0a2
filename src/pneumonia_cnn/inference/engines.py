"""Engines: the served network behind one call, ``engine.run(pixels) -> (member logits, tap features)``.

``ServedModel`` is the definition of "as served": gray input in [0, 1], repeated to RGB for 3-channel models,
the mirror image averaged in when the run uses test-time flips, and the out-of-distribution detector's taps
read in the same forward pass. The torch engine runs it as a module; the ONNX Runtime engine runs its export,
so both compute the same graph.
"""
from __future__ import annotations

import copy
import io
import threading
import warnings

import numpy as np
import torch
import torch.nn as nn

from ..data.loader import to_model_input
from ..device import autocast, autocast_dtype
from ..errors import PneumoniaCNNError
from ..ood import REDUCTIONS


class ServedModel(nn.Module):
    """(B, 1 or C, H, W) in [0, 1] -> (logits (B,), *tap features (B, D)); features of the unflipped image."""

    def __init__(self, model: nn.Module, tta: bool = False, taps=()):
        super().__init__()
        model = copy.deepcopy(model)  # the hooks below stay on this private copy, never on a shared model
        self.model, self.tta, self.taps = model, bool(tta), [tuple(t) for t in taps]
        self.channels = int(getattr(model, "model_kwargs", {}).get("in_channels", 3))
        self._captured = threading.local()  # per thread: concurrent forwards never see each other's taps
        modules = dict(model.named_modules())
        missing = [name for name, _ in self.taps if name not in modules]
        if missing:
            raise PneumoniaCNNError(f"out-of-distribution taps name layers the model lacks: {', '.join(missing)}")
        for index, (name, reduction) in enumerate(self.taps):
            modules[name].register_forward_hook(self._keeper(index, reduction))

    def _keeper(self, index: int, reduction: str):
        def keep(_module, _inputs, output):
            store = getattr(self._captured, "store", None)
            if store is not None and index not in store:  # the first (unflipped) pass only
                store[index] = REDUCTIONS[reduction](output.float())
        return keep

    def forward(self, x):
        if self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        self._captured.store = {}
        try:
            if self.tta:
                batch = x.shape[0]
                both = self.model(torch.cat([x, torch.flip(x, dims=[3])])).float()
                logits = (both[:batch] + both[batch:]) / 2
                features = [self._captured.store[i][:batch] for i in range(len(self.taps))]
            else:
                logits = self.model(x).float()
                features = [self._captured.store[i] for i in range(len(self.taps))]
        finally:
            self._captured.store = None
        return (logits, *features)


class TorchEngine:
    """The served models as torch modules on ``device``, optionally under autocast."""
    name = "torch"

    def __init__(self, models, device, tta: bool, taps=(), amp: str = "off"):
        self.device = torch.device(device)
        self.amp_dtype = autocast_dtype(self.device, amp)
        self.precision = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32"
        self.served = [ServedModel(m, tta, taps if i == 0 else ()).to(self.device).eval()
                       for i, m in enumerate(models)]
        self.served = [s.to(memory_format=torch.channels_last) for s in self.served]

    def run(self, pixels_uint8: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        x = to_model_input(torch.from_numpy(np.array(pixels_uint8)), self.device)  # a copy: the cache is read-only
        member_logits, features = [], []
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            for index, served in enumerate(self.served):
                logits, *tapped = served(x)
                member_logits.append(logits.float().cpu().numpy())
                if index == 0:
                    features = [f.float().cpu().numpy().astype(np.float64) for f in tapped]
        return np.stack(member_logits).astype(np.float64), features


class OnnxEngine:
    """The served models exported to ONNX in memory and run by ONNX Runtime (CPU), gray (B, 1, H, W) input."""
    name = "onnx"
    precision = "float32"

    def __init__(self, models, size, tta: bool, taps=()):
        try:
            import onnxruntime
        except ImportError:
            raise PneumoniaCNNError("--engine onnx needs onnxruntime (pip install 'pneumonia-cnn[export]')") from None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.sessions = []
        for index, model in enumerate(models):
            served = ServedModel(model, tta, taps if index == 0 else ()).eval()
            self.sessions.append(onnxruntime.InferenceSession(export_onnx_bytes(served, size), options,
                                                              providers=["CPUExecutionProvider"]))

    def run(self, pixels_uint8: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        x = (np.asarray(pixels_uint8, dtype=np.float32) / np.float32(255.0))[:, None]
        member_logits, features = [], []
        for index, session in enumerate(self.sessions):
            logits, *tapped = session.run(None, {"image": x})
            member_logits.append(logits)
            if index == 0:
                features = [np.asarray(f, dtype=np.float64) for f in tapped]
        return np.stack(member_logits).astype(np.float64), features


def export_onnx_bytes(served: ServedModel, size, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    names = ["logit"] + [f"tap{i}" for i in range(len(served.taps))]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(served, (torch.rand(2, channels, *size),), buffer, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=names,
                          dynamic_axes={name: {0: "batch"} for name in ["image"] + names})
    return buffer.getvalue()


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


ENGINES = ("auto", "torch", "onnx", "onnx-int8")


def choose_engine(name: str, device: torch.device, amp: str) -> str:
    """``auto``: ONNX Runtime on CPUs in float32 (the fastest float32 path there), torch otherwise."""
    if name not in ENGINES:
        raise PneumoniaCNNError(f"--engine {name}: choose {', '.join(ENGINES)}")
    wants_amp = autocast_dtype(device, amp) is not None
    if name.startswith("onnx") and wants_amp:
        raise PneumoniaCNNError(f"--amp {amp} runs on the torch engine (ONNX Runtime runs float32 or int8 here); "
                                f"use --engine torch or auto")
    if name.startswith("onnx") and device.type != "cpu":
        raise PneumoniaCNNError(f"--engine {name} runs on the CPU; use --device cpu, or --engine torch on {device}")
    if name == "auto":
        return "onnx" if device.type == "cpu" and not wants_amp and onnxruntime_available() else "torch"
    return name


def make_engine(models, size, tta: bool, taps, device: torch.device, engine: str = "auto", amp: str = "off"):
    kind = choose_engine(engine, device, amp)
    if kind == "onnx":
        return OnnxEngine(models, size, tta, taps)
    if kind == "onnx-int8":  # built beforehand by export --format onnx-int8 (quantize.py)
        from .quantized import Int8Engine
        return Int8Engine(models, size, tta, taps)
    return TorchEngine(models, device, tta, taps, amp)
