"""The int8 engine: the served graph (``ServedModel``: flips, channels, OOD taps) quantised by ONNX Runtime.

Static quantisation needs calibration images, and they must be the checkpoint's own validation images (the
images its decision was fitted on, never test images), so the quantised graph is built once, by
``pneumonia-cnn export CKPT --format onnx-int8 --data ROOT`` (``quantize.py``), and kept in the cache under a
key of the weights and the served graph's options; ``--engine onnx-int8`` finds it there. The decision
(calibration, threshold) and the OOD detector were fitted on float32 scores: an int8 run says so.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from ..errors import PneumoniaCNNError
from ..fileio import display_path
from . import graph_cache
from .sessions import run_sessions, runtime, served_key, session_options

log = logging.getLogger(__name__)
INT8_NOTE = ("int8 engine: scores come from an int8-quantised graph; the decision (calibration, threshold) and "
             "the OOD detector were fitted on float32 scores")
# ONNX Runtime would otherwise move the stem's quantisation above its max-pool, which then runs as a slow
# uint8 pooling in NCHW order instead of the float NCHWc one
KEEP_FLOAT_STEM = ["QDQPropagationTransformer"]


def store_path(key: str, cache_dir=None) -> Path:
    from ..data.cache import default_cache_dir
    return Path(cache_dir or default_cache_dir()) / "int8" / f"{key}.onnx"


def int8_session(graph: bytes):
    import onnxruntime
    return onnxruntime.InferenceSession(graph, session_options(onnxruntime), providers=["CPUExecutionProvider"],
                                        disabled_optimizers=KEEP_FLOAT_STEM)


BUILD = ("pneumonia-cnn export CHECKPOINT --format onnx-int8 --data ROOT --out model.int8.onnx (ROOT/val: the "
         "checkpoint's validation images)")


def load_cached(path: Path, engine: str, load, signature=None, expected=None):
    """``load(the graph's bytes)``, or one line naming the damaged cached graph (cut short by a full disk, a copy,
    a crash; or a readable graph that is not this model's, which failed on the first image with ONNX Runtime's "Got
    invalid dimensions for input: image"; or one whose bytes do not match the checksum written beside it when it
    was built: ``graph_cache``) and how to build it again; never rebuilt here: that needs the
    checkpoint's validation images. ``signature(loaded)`` gives its inputs and outputs as ``graph_signature``
    does, compared with ``expected`` (``served_signature``)."""
    # one read of its bytes, loaded from memory and checked against the checksum: a flipped bit loads as any other
    # (see graph_cache), a graph without its checksum (built by an earlier version) is refused since nothing
    # tells it from a damaged one, and checking one read while loading another let a rebuild between the two
    # pass for damage
    payload, unverified = graph_cache.read_verified(path, "built")  # why these very bytes fail their checksum
    if payload is None:  # gone since int8_paths saw it, or no regular file
        why = unverified or "it cannot be read"
    else:
        try:
            loaded = load(payload)
        except Exception:  # ONNX Runtime's InvalidProtobuf, OpenVINO's RuntimeError: several lines of C++ context
            why = "it cannot be read"
        else:  # what it is first (another model's graph says more than "no checksum"), then its checksum
            why = foreign(signature(loaded) if signature is not None else expected, expected) or unverified
    if why is not None:
        raise PneumoniaCNNError(f"--engine {engine}: the cached int8 model {display_path(path)} is damaged "
                                f"({why}); build it again: {BUILD}") from None
    return loaded


def foreign(found, expected) -> str | None:
    """Why a graph whose inputs and outputs are ``found`` is not the served graph of ``expected`` (both as
    ``served_signature`` gives them), or None."""
    return None if found == expected else (f"not this model's graph: it takes {_shown(found[0])} and gives "
                                           f"{', '.join(found[1]) or 'nothing'}, where the model takes "
                                           f"{_shown(expected[0])} and gives {', '.join(expected[1])}")


def served_signature(size, taps: int) -> tuple[list, list[str]]:
    """The inputs ((name, dims, element type); None for a dimension of any size) and output names of a served
    graph (``engines.export_onnx_bytes``) at ``size`` with ``taps`` taps."""
    return [("image", (None, 1, *size), "float32")], ["logit", *(f"tap{i}" for i in range(taps))]


def _onnxruntime_signature(session) -> tuple[list, list[str]]:
    types = {"tensor(float)": "float32"}
    return ([(i.name, tuple(d if isinstance(d, int) else None for d in i.shape), types.get(i.type, i.type))
             for i in session.get_inputs()], [o.name for o in session.get_outputs()])


def _openvino_signature(compiled) -> tuple[list, list[str]]:
    """As ``_onnxruntime_signature``; a port has several names (the ONNX one among them), the first batch
    dimension is dynamic, and f32 is float32."""
    def name(port, wanted):
        return wanted if wanted in port.get_names() else port.get_any_name()
    inputs = [(name(p, "image"), tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape()),
               {"f32": "float32"}.get(p.get_element_type().get_type_name(), p.get_element_type().get_type_name()))
              for p in compiled.inputs]
    wanted = ["logit", *(f"tap{i}" for i in range(len(compiled.outputs) - 1))]
    return inputs, [name(p, w) for p, w in zip(compiled.outputs, wanted)]


def _shown(inputs) -> str:
    return "; ".join(f"{name} [{', '.join('batch' if d is None else str(d) for d in dims)}] {kind}"
                     for name, dims, kind in inputs) or "no input"


def load_members(models, size, tta: bool, taps, engine: str, cache_dir, load, signature) -> list:
    """Each member's cached int8 graph, loaded and checked against the served graph it stands for."""
    paths = int8_paths(models, size, tta, taps, engine, cache_dir)
    return [load_cached(path, engine, load, signature, served_signature(size, len(taps) if index == 0 else 0))
            for index, path in enumerate(paths)]


def int8_paths(models, size, tta: bool, taps, engine: str, cache_dir=None) -> list[Path]:
    """The cached int8 graph of each member (the first keeps the taps), or a one-line error naming the fix."""
    paths = [store_path(served_key(model, size, tta, taps if index == 0 else ()), cache_dir)
             for index, model in enumerate(models)]
    if not all(path.is_file() for path in paths):
        raise PneumoniaCNNError(f"--engine {engine}: no int8 model for these weights yet; build it once: {BUILD}")
    return paths


class Int8Engine:
    """The quantised served graphs that ``export --format onnx-int8`` built for these weights, run by ONNX
    Runtime on the CPU: gray (B, 1, H, W) input, the same outputs as ``OnnxEngine``."""
    name = "onnx-int8"
    precision = "int8"

    def __init__(self, models, size, tta: bool, taps=(), cache_dir=None):
        runtime(self.name, "onnxruntime", "export")
        self.sessions = load_members(models, size, tta, taps, self.name, cache_dir, int8_session,
                                     _onnxruntime_signature)
        log.warning(INT8_NOTE)

    def run(self, pixels_uint8: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return run_sessions(self.sessions, pixels_uint8)


class OpenVinoInt8Engine:
    """The same cached int8 graphs, run by OpenVINO's CPU plugin, which executes the QDQ pairs as int8
    (VNNI/AMX) and the layers left in float at its default precision (on CPUs with bf16 instructions, bf16 for
    some of them: the OOD taps matched float32 ONNX to 2e-7 on the built-in model). One inference request per
    thread: a compiled model is shared, a request is not."""
    name = "openvino-int8"
    precision = "int8"

    def __init__(self, models, size, tta: bool, taps=(), cache_dir=None):
        import torch
        core = runtime(self.name, "openvino", "openvino").Core()
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}

        def compiled(graph: bytes):
            return core.compile_model(core.read_model(graph), "CPU", config)
        self.compiled = load_members(models, size, tta, taps, self.name, cache_dir, compiled, _openvino_signature)
        self._local = threading.local()
        log.warning(INT8_NOTE)

    def _requests(self):
        if getattr(self._local, "requests", None) is None:
            self._local.requests = [compiled.create_infer_request() for compiled in self.compiled]
        return self._local.requests

    def run(self, pixels_uint8: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        x = (np.asarray(pixels_uint8, dtype=np.float32) / np.float32(255.0))[:, None]
        member_logits, features = [], []
        for index, (compiled, request) in enumerate(zip(self.compiled, self._requests())):
            results = request.infer({0: x})
            logits, *tapped = [np.array(results[output]) for output in compiled.outputs]
            member_logits.append(logits.reshape(len(x)))
            if index == 0:
                features = [np.asarray(f, dtype=np.float64) for f in tapped]
        return np.stack(member_logits).astype(np.float64), features
