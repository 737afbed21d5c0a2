"""Engines: the served network behind one call, ``engine.run(pixels) -> (member logits, tap features)``.

``ServedModel`` is the definition of "as served": gray input in [0, 1], repeated to RGB for 3-channel models,
the mirror image averaged in when the run uses test-time flips, and the out-of-distribution detector's taps
read in the same forward pass. The torch engine runs it as a module; the ONNX Runtime engine runs its export,
so both compute the same graph.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..data.loader import to_model_input
from ..device import autocast, autocast_dtype, full_float32
from ..errors import PneumoniaCNNError
from ..fileio import display_path
from ..ood import TappedModel
from . import graph_cache
from .sessions import run_sessions, runtime, served_key, session_options

log = logging.getLogger(__name__)


class ServedModel(nn.Module):
    """(B, 1 or C, H, W) in [0, 1] -> (logits (B,), *tap features (B, D)); features of the unflipped image.

    Gray input stays gray: 3-channel models take it through their first convolution's summed kernel, which
    equals repeating the channel, and the OOD detector's input taps see the image it was fitted on."""

    def __init__(self, model: nn.Module, tta: bool = False, taps=()):
        super().__init__()
        # a private copy: the taps' hooks never touch a model that anything else runs
        self.tapped = TappedModel(copy.deepcopy(model), taps)
        self.tta, self.taps = bool(tta), self.tapped.taps

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        if not self.tta:
            logits, features = self.tapped(x)
            return (logits.float(), *features)
        batch = x.shape[0]
        # the input taps read the unflipped images only: their features of the mirror images were discarded
        both, features = self.tapped(torch.cat([x, torch.flip(x, dims=[3])]), tap_input=x)
        logits = (both[:batch].float() + both[batch:].float()) / 2
        return (logits, *[f[:batch] for f in features])


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
        with torch.inference_mode(), full_float32(self.device), autocast(self.device, self.amp_dtype):
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

    def __init__(self, models, size, tta: bool, taps=(), cache: bool = True):
        onnxruntime = runtime("onnx", "onnxruntime", "export")
        options = session_options(onnxruntime)
        self.sessions = [served_session(onnxruntime, options, ServedModel(model, tta, taps if i == 0 else ()).eval(),
                                        size, cache) for i, model in enumerate(models)]

    def run(self, pixels_uint8: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return run_sessions(self.sessions, pixels_uint8)


@functools.lru_cache(maxsize=1)
def graph_code_fingerprint() -> str:
    """The source that decides what an exported graph computes (models, taps, the served wrapper): a graph
    cached by another version of it is never reused."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted([*(package / "models").glob("*.py"), *(package / "ood").glob("*.py"), Path(__file__)]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


NOT_USED = "%s: the cached ONNX graph is not used (%s); exported again"


def served_session(onnxruntime, options, served: ServedModel, size, cache: bool = True):
    """An ONNX Runtime session of the served graph: the cached one when its checksum matches and ONNX Runtime
    loads it as this graph (the input and outputs of ``served``), else the graph exported again and re-cached,
    with a warning naming the cached file and why (a foreign graph with its own checksum had failed on the
    first image in a traceback)."""
    from .quantized import _onnxruntime_signature, foreign, served_signature
    graph, cached = cached_graph(served, size, cache=cache)
    if cached is not None:
        try:
            session = _session(onnxruntime, options, graph)
            why = foreign(_onnxruntime_signature(session), served_signature(size, len(served.taps)))
        except Exception:  # ONNX Runtime raises its own types
            why = "ONNX Runtime cannot load it"
        if why is None:
            return session
        log.warning(NOT_USED, display_path(cached), why)
        graph, _ = cached_graph(served, size, refresh=True, cache=cache)
    return _session(onnxruntime, options, graph)


def _session(onnxruntime, options, graph: bytes):
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def cached_graph(served: ServedModel, size, refresh: bool = False, cache: bool = True) -> tuple[bytes, Path | None]:
    """The served graph in ONNX and the cached file it was read from (None: exported now). From the cache when
    these weights and options were exported before: the export (about 0.3 s, and 0.2 s more to import ``onnx``)
    is most of a one-image ``predict``'s own time. Keyed by the weights, the served options, the torch version
    and the code, and used only when its checksum matches (``graph_cache``): otherwise exported again, with a
    warning naming the file and why. An unwritable cache, or none (``cache=False``: weights used once, such as
    a batch's AdaBN statistics), just means exporting."""
    from ..data.cache import default_cache_dir
    folder = default_cache_dir() / "onnx"
    if not cache or not folder.is_absolute():  # no home folder: never a cache relative to the working folder
        return export_onnx_bytes(served, size), None
    key = served_key(served.tapped.model, size, served.tta, served.taps)
    path = folder / f"{key}-{graph_code_fingerprint()}-opset17.onnx"
    if not refresh:
        graph, why = graph_cache.read_verified(path)
        if graph is not None and why is None:
            return graph, path
        if why is not None:
            log.warning(NOT_USED, display_path(path), why)
    graph = export_onnx_bytes(served, size)
    try:
        graph_cache.store(path, graph)
    except OSError as error:
        log.debug("ONNX graph not cached (%s): %s", path, error)
    return graph, None


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
    from importlib.util import find_spec  # found, not imported: importing onnx alone takes 0.2 s
    return find_spec("onnx") is not None and find_spec("onnxruntime") is not None


INT8_ENGINES = ("onnx-int8", "openvino-int8")
ENGINES = ("auto", "torch", "onnx", *INT8_ENGINES)


def choose_engine(name: str, device: torch.device, amp: str) -> str:
    """``auto``: ONNX Runtime on CPUs in float32 (the fastest float32 path there), torch otherwise. Whatever the
    number of images: one engine gives the same probabilities everywhere (``predict``, ``serve``, ``pacs``)."""
    if name not in ENGINES:
        raise PneumoniaCNNError(f"--engine {name}: choose {', '.join(ENGINES)}")
    wants_amp = autocast_dtype(device, amp) is not None
    exported = name.startswith(("onnx", "openvino"))
    if exported and wants_amp:
        raise PneumoniaCNNError(f"--amp {amp} runs on the torch engine (the exported engines run float32 or int8); "
                                f"use --engine torch or auto")
    if exported and device.type != "cpu":
        raise PneumoniaCNNError(f"--engine {name} runs on the CPU; use --device cpu, or --engine torch on {device}")
    if name == "auto":
        return "onnx" if device.type == "cpu" and not wants_amp and onnxruntime_available() else "torch"
    return name


def make_engine(models, size, tta: bool, taps, device: torch.device, engine: str = "auto", amp: str = "off",
                cache: bool = True):
    kind = choose_engine(engine, device, amp)
    if kind == "onnx":
        try:
            return OnnxEngine(models, size, tta, taps, cache)
        except PneumoniaCNNError as error:  # installed but unusable: auto falls back, an explicit choice fails
            if engine != "auto":
                raise
            log.warning("ONNX Runtime unusable (%s): scoring with the torch engine", error)
    if kind == "onnx-int8":  # built beforehand by export --format onnx-int8 (quantize.py)
        from .quantized import Int8Engine
        return Int8Engine(models, size, tta, taps)
    if kind == "openvino-int8":  # the same int8 graph, run by OpenVINO
        from .quantized import OpenVinoInt8Engine
        return OpenVinoInt8Engine(models, size, tta, taps)
    return TorchEngine(models, device, tta, taps, amp)
