"""What the ONNX Runtime engines share (float32 in ``engines``, int8 in ``quantized``): the key that names one
served graph in the cache, the sessions' options, and running a member's sessions on a batch."""
from __future__ import annotations

import hashlib
import importlib
import json
import os

import numpy as np
import torch

from ..errors import PneumoniaCNNError


def served_key(model: torch.nn.Module, size, tta: bool, taps) -> str:
    """What identifies one served graph (float32 or int8): the weights, the input size, test-time flips and the taps."""
    digest = hashlib.sha256(json.dumps({"size": list(size), "tta": bool(tta), "taps": [list(t) for t in taps],
                                        "kwargs": getattr(model, "model_kwargs", {})}, sort_keys=True).encode())
    return add_weights(digest, model).hexdigest()[:24]


def add_weights(digest, model: torch.nn.Module):
    """``digest`` updated with the model's weights, name by name: the same weights give the same digest."""
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest


def runtime(engine: str, module: str, extra: str):
    """The engine's runtime module, or a one-line error naming what to install. Ctrl-C while a C extension
    initialises reaches Python as ImportError("initialization failed") caused by it: it stays an interrupt,
    not "not installed" (auto then scored with torch, and the interrupted command went on)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if isinstance(error.__cause__, KeyboardInterrupt):  # SIGTERM's Terminated stays one (it read as Ctrl-C:
            raise type(error.__cause__)() from None  # "interrupted", exit 130, not 143)
        raise PneumoniaCNNError(f"--engine {engine} needs {module} (pip install 'pneumonia-cnn[{extra}]')") from None


# ONNX Runtime's idle threads spin (busy-wait) by default: right for a batch job that has the cores to itself, but
# in a server they take the cores from the Grad-CAM, decoding and event-loop threads (docs/hospital.md, "Sharing
# the cores")
IDLE_THREADS = "PNEUMONIA_CNN_IDLE_THREADS"


def session_options(onnxruntime):
    """Options of every ONNX Runtime session: ``PNEUMONIA_CNN_IDLE_THREADS=sleep`` (``serve`` and ``listen`` set
    it unless given) makes idle threads sleep; ``spin`` (the default) is ONNX Runtime's own behaviour."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if idle_threads() == "spin" else "0")
    return options


def idle_threads() -> str:
    """``PNEUMONIA_CNN_IDLE_THREADS``: spin (the default) or sleep; another value is a one-line error."""
    idle = os.environ.get(IDLE_THREADS, "spin").strip().lower()
    if idle not in ("spin", "sleep"):
        raise PneumoniaCNNError(f"{IDLE_THREADS}={os.environ[IDLE_THREADS]!r}: use spin or sleep")
    return idle


def run_sessions(sessions, pixels_uint8: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """ONNX Runtime sessions of served graphs (gray (B, 1, H, W) in [0, 1]) on uint8 pixels: the members'
    logits (members, B) and the first member's tap features."""
    x = (np.asarray(pixels_uint8, dtype=np.float32) / np.float32(255.0))[:, None]
    member_logits, features = [], []
    for index, session in enumerate(sessions):
        logits, *tapped = session.run(None, {"image": x})
        member_logits.append(logits)
        if index == 0:
            features = [np.asarray(f, dtype=np.float64) for f in tapped]
    return np.stack(member_logits).astype(np.float64), features
