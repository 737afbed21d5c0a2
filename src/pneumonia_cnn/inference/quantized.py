"""The int8 engine: the served graph (``ServedModel``: flips, channels, OOD taps) quantised by ONNX Runtime.

Static quantisation needs calibration images, and they must be the checkpoint's own validation images (the
images its decision was fitted on, never test images), so the quantised graph is built once, by
``pneumonia-cnn export CKPT --format onnx-int8 --data ROOT`` (``quantize.py``), and kept in the cache under a
key of the weights and the served graph's options; ``--engine onnx-int8`` finds it there. The decision
(calibration, threshold) and the OOD detector were fitted on float32 scores: an int8 run says so.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import PneumoniaCNNError
from .sessions import run_sessions, served_key

log = logging.getLogger(__name__)
INT8_NOTE = ("int8 engine: scores come from an int8-quantised graph; the decision (calibration, threshold) and "
             "the OOD detector were fitted on float32 scores")
# ONNX Runtime would otherwise move the stem's quantisation above its max-pool, which then runs as a slow
# uint8 pooling in NCHW order instead of the float NCHWc one
KEEP_FLOAT_STEM = ["QDQPropagationTransformer"]


def store_path(key: str, cache_dir=None) -> Path:
    from ..data.cache import default_cache_dir
    return Path(cache_dir or default_cache_dir()) / "int8" / f"{key}.onnx"


def int8_session(path):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=KEEP_FLOAT_STEM)


class Int8Engine:
    """The quantised served graphs that ``export --format onnx-int8`` built for these weights, run by ONNX
    Runtime on the CPU: gray (B, 1, H, W) input, the same outputs as ``OnnxEngine``."""
    name = "onnx-int8"
    precision = "int8"

    def __init__(self, models, size, tta: bool, taps=(), cache_dir=None):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise PneumoniaCNNError("--engine onnx-int8 needs onnxruntime (pip install 'pneumonia-cnn[export]')") \
                from None
        self.sessions = []
        for index, model in enumerate(models):
            path = store_path(served_key(model, size, tta, taps if index == 0 else ()), cache_dir)
            if not path.is_file():
                raise PneumoniaCNNError("--engine onnx-int8: no int8 model for these weights yet; build it once "
                                        "from the checkpoint's validation images: pneumonia-cnn export CHECKPOINT "
                                        "--format onnx-int8 --data ROOT --out model.int8.onnx")
            self.sessions.append(int8_session(path))
        log.warning(INT8_NOTE)

    def run(self, pixels_uint8: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return run_sessions(self.sessions, pixels_uint8)
