"""Building the int8 served graph (``export --format onnx-int8``): calibration on the checkpoint's own
validation images, ONNX Runtime static quantisation (QDQ: int8 weights per channel, uint8 activations, the
form ONNX Runtime runs with VNNI instructions on x86), written to a file and to the cache that
``--engine onnx-int8`` (``quantized.Int8Engine``) reads."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import PneumoniaCNNError
from ..fileio import atomic_path, display_path
from . import graph_cache
from .bundle import load_bundle
from .engines import ServedModel, export_onnx_bytes
from .quantized import store_path
from .sessions import served_key

log = logging.getLogger(__name__)
CALIBRATION_BATCH = 32
# the network's arithmetic only: the OOD taps' reductions (mean, spread, concatenation, the slice that keeps
# the unflipped half) stay float32, since one uint8 scale over a concatenated feature vector would erase it
QUANTIZED_OPS = ["Conv", "Relu", "Gemm", "MatMul", "Add", "MaxPool", "GlobalAveragePool"]


class CalibrationImages:
    """ONNX Runtime's ``CalibrationDataReader``: batches of gray (B, 1, H, W) float32 in [0, 1]."""

    def __init__(self, pixels_uint8: np.ndarray, input_name: str = "image"):
        self.batches = iter([np.asarray(pixels_uint8[i:i + CALIBRATION_BATCH], dtype=np.float32)[:, None] / 255.0
                             for i in range(0, len(pixels_uint8), CALIBRATION_BATCH)])
        self.input_name = input_name

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def image_stem(path) -> list[str]:
    """The nodes from the image to the second convolution (the stem: first convolution, ReLU, pooling) stay
    float32: with one or three (repeated gray) input channels an int8 convolution gains nothing, and the
    quantise/dequantise and layout changes around it would cost more than the stem itself."""
    import onnx
    stem, convolutions = [], 0
    for node in onnx.load(str(path)).graph.node:
        convolutions += node.op_type == "Conv"
        if convolutions > 1:
            break
        stem.append(node.name)
    return stem


def tap_only_nodes(path) -> list[str]:
    """The nodes the logit does not need: the OOD taps' reductions. They stay float32 whatever their operator
    (``QUANTIZED_OPS`` names an Add the network has, but a tap's Add quantised to uint8 moved the orientations'
    bins), so the flag from an int8 graph is the float graph's."""
    import onnx
    graph = onnx.load(str(path)).graph
    producer = {output: index for index, node in enumerate(graph.node) for output in node.output}
    if "logit" not in producer:  # every node would look tap-only, and nothing be quantised
        raise ValueError(f"{path}: no node gives the output 'logit'")
    needed, pending = set(), ["logit"]
    while pending:
        index = producer.get(pending.pop())
        if index is not None and index not in needed:
            needed.add(index)
            pending.extend(graph.node[index].input)
    return [node.name for index, node in enumerate(graph.node) if index not in needed]


def float_nodes(path) -> list[str]:
    return image_stem(path) + tap_only_nodes(path)


def quantize_served(model: torch.nn.Module, size, tta: bool, taps, calibration_pixels: np.ndarray) -> bytes:
    """The served graph exported to ONNX, optimised (batch norm folded) and statically quantised (QDQ)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    served = ServedModel(model, tta, taps).eval()
    # gray goes straight into the first convolution (``InputConv2d`` sums its kernel over the RGB channels: the
    # same function): ONNX Runtime runs a one-channel convolution faster than three repeated channels
    served.channels = 1
    folder = Path(tempfile.mkdtemp(prefix="pcnn-int8-"))
    try:
        (folder / "float.onnx").write_bytes(export_onnx_bytes(served, size))
        quant_pre_process(str(folder / "float.onnx"), str(folder / "prepared.onnx"), skip_symbolic_shape=True)
        relu_before_max_pool(folder / "prepared.onnx")
        quantize_static(str(folder / "prepared.onnx"), str(folder / "int8.onnx"), CalibrationImages(calibration_pixels),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=float_nodes(folder / "prepared.onnx"))
        return (folder / "int8.onnx").read_bytes()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def relu_before_max_pool(path) -> int:
    """Rewrite each max-pool followed by a ReLU (its only reader) as the ReLU followed by the pool, in the ONNX
    file at ``path``; returns how many. The same function (ReLU is monotone, so it commutes with a maximum), but
    in this order ONNX Runtime fuses the ReLU into the int8 convolution and pools the uint8 values in NHWC; in
    the other, the quantiser gives the pool's input and output different scales, so every pool is dequantised,
    pooled in float and quantised again, with layout conversions around it (the seed model's order, faster in
    training)."""
    import onnx
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    order, moved, swapped = [], set(), set()
    for node in graph.node:
        if id(node) in moved:
            continue
        after = readers.get(node.output[0], []) if node.op_type == "MaxPool" and len(node.output) == 1 else []
        if len(after) == 1 and after[0].op_type == "Relu" and node.output[0] not in outputs:
            relu, pooled = after[0], node.output[0]
            relu.input[0], relu.output[0], node.input[0], node.output[0] = node.input[0], pooled, pooled, relu.output[0]
            order += [relu, node]
            moved.add(id(relu))
            swapped.add(pooled)
        else:
            order.append(node)
    if swapped:
        kept = [info for info in graph.value_info if info.name not in swapped]  # their shapes are now the ReLU's
        nodes = [onnx.NodeProto() for _ in order]
        for copy, node in zip(nodes, order):
            copy.CopyFrom(node)
        del graph.node[:], graph.value_info[:]
        graph.node.extend(nodes), graph.value_info.extend(kept)
        onnx.save(graph_model, str(path))
    return len(swapped)


MIN_CALIBRATION_IMAGES = 100  # a validation split of fewer is taken whole


def validation_pixels(checkpoint: dict, data_root) -> tuple[np.ndarray, int, bool]:
    """The checkpoint's validation images read from ``data_root`` with its preprocessing, how many distinct
    images they are, and whether they were checked against the stored fingerprints. Only the folder's images
    among those its decision was fitted on are used: a run trained with ``--limit-images`` drew part of the
    split, and the whole split holds its images and others (said in a warning). Refused when the folder holds
    none of them, or fewer than ``MIN_CALIBRATION_IMAGES`` (all of them when it has fewer): the activation
    ranges come from them, and a few images (one per class) gave an int8 graph twice as far from float32
    (largest probability shift on the shared test split 0.083, against 0.031 calibrated on all 559). An adapted
    checkpoint also records the site images it was tuned on, which its source's validation split does not hold:
    that split is enough."""
    from ..data.cache import build_or_load
    from ..data.dataset import load_split
    images = load_split(data_root, "val")
    folder = display_path(Path(data_root) / "val")
    stored = set(((checkpoint.get("reference") or {}).get("val") or {}).get("fingerprints") or [])
    if stored:
        images, count = own_validation_images(images, stored, folder)
    else:
        log.warning("the checkpoint stores no validation fingerprints: cannot check that %s is its validation "
                    "split", folder)
    pre = checkpoint["preprocessing"]
    cached = build_or_load(images, tuple(pre["size"]), pre.get("interpolation", "bilinear"),
                           pre.get("intensity", "none"))
    return np.asarray(cached.images), count if stored else len(cached), bool(stored)


def own_validation_images(images, stored: set, folder: str):
    """The images of ``images`` whose fingerprint is in ``stored`` and how many distinct ones they are, or a
    one-line refusal saying how many of the checkpoint's validation images the folder holds, and how many others."""
    from ..data.fingerprint import file_fingerprints
    fingerprints = file_fingerprints(images.paths)
    own = [index for index, fingerprint in enumerate(fingerprints) if fingerprint in stored]
    given, others = {fingerprints[index] for index in own}, len(set(fingerprints) - stored)
    if not given:
        raise PneumoniaCNNError(f"{folder}: not the validation images this checkpoint's decision was fitted on "
                                f"(none of its {others} distinct images is among the {len(stored)} it stores); "
                                f"calibrate on the run's own validation split")
    also = f" (and {others} other images, not used)" if others else ""
    if len(given) < min(len(stored), MIN_CALIBRATION_IMAGES):
        raise PneumoniaCNNError(f"{folder}: holds {len(given)} of the {len(stored)} validation images this "
                                f"checkpoint's decision was fitted on{also}; calibrate on the run's own validation "
                                f"split (at least {MIN_CALIBRATION_IMAGES} of its images, all when it has fewer)")
    if others:  # the rest of the split (--limit-images), or images of another split: never calibrated on
        held = "all it stores" if len(given) == len(stored) else f"of the {len(stored)} it stores"
        log.warning("%s: calibrating on the %d validation images of this checkpoint found there (%s); the %d other "
                    "images there are not among them and are left out", folder, len(given), held, others)
    return images.subset(own), len(given)


def calibration_record(path) -> tuple[int, bool] | None:
    """How many distinct images the int8 graph at ``path`` was calibrated on and whether they were checked
    against its checkpoint's fingerprints (its metadata); None: no such graph, a damaged one, or one written
    before the count was recorded."""
    import onnx
    try:
        props = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
        return int(props["calibration_images"]), props.get("calibration_checked", "1") == "1"
    except Exception:  # absent, cut short, not ONNX, no count: nothing worth keeping over a new graph
        return None


def calibration_count(path) -> int | None:
    record = calibration_record(path)
    return None if record is None else record[0]


def with_count(payload: bytes, count: int, checked: bool = True) -> bytes:
    return with_props(payload, {"calibration_images": str(count), "calibration_checked": "1" if checked else "0"})


def with_props(payload: bytes, props: dict[str, str]) -> bytes:
    """The ONNX model ``payload`` with ``props`` added to its ``metadata_props``."""
    import onnx
    graph = onnx.load_from_string(payload)
    for key, value in props.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    return graph.SerializeToString()


def keeps_cached(before: tuple[int, bool] | None, count: int, checked: bool) -> bool:
    """Whether the cached graph stays: one calibrated on a checked split beats an unchecked one, then more
    distinct images beat fewer."""
    return before is not None and (before[1], before[0]) > (checked, count)


def export_int8(checkpoint_path, data_root, out, cache_dir=None, describe=None) -> dict:
    """Build the int8 served graph of one checkpoint, write it to ``out`` and to the cache; returns a summary.
    The cache, which every later ``--engine onnx-int8`` and ``openvino-int8`` run reads, is never replaced by a
    graph calibrated on fewer images than the one it holds (possible only for a checkpoint with no stored
    fingerprints, whose validation split cannot be checked): then only ``out`` is written (``cache_replaced``).
    ``describe(checkpoint)``: metadata (key -> text) for ``out`` alone: the cache is keyed by the weights, which
    checkpoints with another threshold or calibration share, so their decision does not belong in it."""
    bundle = load_bundle(checkpoint_path)
    if len(bundle.models) != 1:
        raise PneumoniaCNNError("export --format onnx-int8 takes one checkpoint")
    pixels, count, checked = validation_pixels(bundle.checkpoints[0], data_root)
    size, model = bundle.preprocessing.size, bundle.models[0]
    payload = with_count(quantize_served(model, size, bundle.tta, bundle.taps, pixels), count, checked)
    stored = store_path(served_key(model, size, bundle.tta, bundle.taps), cache_dir)
    # a cached graph that fails its checksum (or has none: built by an earlier version) is replaced whatever it
    # says of its calibration: kept, it would go on being refused with the advice to run this very command
    before = calibration_record(stored) if graph_cache.problem(stored) is None else None
    keep = keeps_cached(before, count, checked)
    if keep:
        log.warning("%s: the cached int8 model, calibrated on %d images%s, is kept (these are %d%s); --engine "
                    "onnx-int8 and openvino-int8 go on using it", display_path(stored), before[0],
                    "" if before[1] else " unchecked", count, "" if checked else ", unchecked")
    exported = with_props(payload, describe(bundle.checkpoints[0])) if describe else payload
    with atomic_path(Path(out)) as temporary:
        Path(temporary).write_bytes(exported)
    if not keep:
        graph_cache.store(stored, payload)  # with its checksum, which --engine onnx-int8 checks
    return {"out": str(out), "cached": str(stored), "cache_replaced": not keep, "calibration_images": count,
            "tta": bundle.tta, "taps": len(bundle.taps)}
