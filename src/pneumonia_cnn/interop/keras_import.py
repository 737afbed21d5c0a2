"""Import the tutorial's trained Keras model into our ``seed`` model, reading arrays only (h5py, no TensorFlow).

Accepts the legacy full-model HDF5 (``.h5``), the Keras 3 archive (``.keras``, a zip holding
``config.json`` and ``model.weights.h5``) and weights-only files (``.weights.h5``, which carry no input
size: pass ``size``). Keras stores Conv2D kernels as (kh, kw, in, out), Dense kernels as (in, out), and
flattens NHWC feature maps, so the first Dense layer's rows are reordered from (h, w, c) to (c, h, w).
Nothing in the file is executed: only numeric datasets and the JSON config are read.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import save_checkpoint
from ..errors import PneumoniaCNNError
from ..fileio import display_path, printable
from ..models import count_parameters, create_model


def _datasets(group) -> list[tuple[str, np.ndarray]]:
    import h5py
    found = []

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and item.ndim >= 1:
            found.append((name, np.asarray(item[()], dtype=np.float32)))
    group.visititems(visit)
    return found


def _input_shape_from_config(config: dict):
    layers = config.get("config", {}).get("layers", []) if isinstance(config.get("config"), dict) else []
    for layer in layers:
        cfg = layer.get("config", {})
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if shape and len(shape) == 4:
            return int(shape[1]), int(shape[2]), int(shape[3])
    build = config.get("build_config", {}).get("input_shape")
    if build and len(build) == 4:
        return int(build[1]), int(build[2]), int(build[3])
    return None


def read_keras_file(path) -> tuple[list[np.ndarray], tuple[int, int, int] | None]:
    """All numeric arrays of the model's layers, and the input shape (H, W, C) when the file says it."""
    import h5py
    path = Path(path)
    if not path.is_file():
        raise PneumoniaCNNError(f"{display_path(path)}: file not found")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if "model.weights.h5" not in names:
                    raise PneumoniaCNNError(f"{display_path(path)}: .keras archive without model.weights.h5")
                config = json.loads(archive.read("config.json")) if "config.json" in names else {}
                weights = io.BytesIO(archive.read("model.weights.h5"))
            with h5py.File(weights, "r") as handle:
                arrays = _datasets(handle["layers"] if "layers" in handle else handle)
            return [a for _, a in arrays], _input_shape_from_config(config)
        with h5py.File(path, "r") as handle:
            shape = None
            if "model_config" in handle.attrs:
                raw = handle.attrs["model_config"]
                shape = _input_shape_from_config(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
            group = handle["model_weights"] if "model_weights" in handle else handle["layers"] \
                if "layers" in handle else handle
            arrays = _datasets(group)
            if group.name == "/model_weights" and "layer_names" in group.attrs:
                order = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["layer_names"]]
                arrays.sort(key=lambda item: order.index(item[0].split("/")[0]) if item[0].split("/")[0] in order
                            else len(order))
            return [a for _, a in arrays], shape
    except PneumoniaCNNError:
        raise
    except (OSError, KeyError, ValueError, TypeError, AttributeError, IndexError, zipfile.BadZipFile) as error:
        raise PneumoniaCNNError(f"{display_path(path)}: not a readable Keras model "
                                f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


def _pair_layers(arrays: list[np.ndarray], path):
    """Group (kernel, bias) pairs and order them by how their shapes chain."""
    kernels = [a for a in arrays if a.ndim in (2, 4)]
    biases = [a for a in arrays if a.ndim == 1]
    convs = [k for k in kernels if k.ndim == 4]
    denses = [k for k in kernels if k.ndim == 2]
    if len(convs) != 3 or len(denses) != 2:
        raise PneumoniaCNNError(f"{display_path(path)}: expected the tutorial's 3 Conv2D and 2 Dense layers, found "
                                f"{len(convs)} Conv2D and {len(denses)} Dense kernels")
    def the(found, what):
        if found is None:
            raise PneumoniaCNNError(f"{display_path(path)}: not the tutorial's layers: no {what}")
        return found
    ordered_convs = [the(next((c for c in convs if c.shape[3] == 32), None), "Conv2D with 32 filters")]
    for _ in range(2):
        previous = ordered_convs[-1]
        ordered_convs.append(the(next((c for c in convs if c.shape[2] == previous.shape[3] and c is not previous),
                                      None), f"Conv2D taking the {previous.shape[3]} channels of the one before"))
    if any(c.shape[:2] != (3, 3) for c in ordered_convs):
        raise PneumoniaCNNError(f"{display_path(path)}: not the tutorial's layers: its Conv2D kernels are "
                                f"{', '.join('x'.join(map(str, c.shape[:2])) for c in ordered_convs)}, not 3x3")
    dense1 = the(next((d for d in denses if d.shape[1] == 128), None), "Dense layer of 128 units")
    dense2 = next(d for d in denses if d is not dense1)

    def bias_for(length, used):
        for i, b in enumerate(biases):
            if len(b) == length and i not in used:
                used.add(i)
                return b
        raise PneumoniaCNNError(f"{display_path(path)}: missing a bias of length {length}")
    used: set[int] = set()
    layers = [(k, bias_for(k.shape[-1], used)) for k in ordered_convs + [dense1, dense2]]
    return layers


def keras_to_state_dict(arrays, height: int, width: int, source=None) -> dict:
    """Our ``seed`` model's weights from the Keras layers; ``source``, the file they came from, names it in the
    error a wrong input size gives."""
    (c1, b1), (c2, b2), (c3, b3), (d1, e1), (d2, e2) = arrays
    final_h, final_w = height, width
    for _ in range(3):
        final_h, final_w = (final_h - 2) // 2, (final_w - 2) // 2
    if d1.shape[0] != 128 * final_h * final_w:
        named = f"{display_path(source)}: " if source is not None else ""
        raise PneumoniaCNNError(f"{named}input {height}x{width} gives {128 * final_h * final_w} features but the Dense "
                                f"layer expects {d1.shape[0]}: wrong --size")
    dense = d1.reshape(final_h, final_w, 128, -1).transpose(2, 0, 1, 3).reshape(d1.shape[0], -1)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return {"conv1.weight": t(c1.transpose(3, 2, 0, 1)), "conv1.bias": t(b1),
            "conv2.weight": t(c2.transpose(3, 2, 0, 1)), "conv2.bias": t(b2),
            "conv3.weight": t(c3.transpose(3, 2, 0, 1)), "conv3.bias": t(b3),
            "fc1.weight": t(dense.T), "fc1.bias": t(e1), "fc2.weight": t(d2.T), "fc2.bias": t(e2)}


def import_keras(path, out=None, size=None) -> tuple[torch.nn.Module, dict]:
    """Build our ``seed`` model from a Keras file; save a checkpoint to ``out`` when given.

    ``size`` is (height, width) or an int; required for weights-only files, checked against the others.
    """
    arrays, shape = read_keras_file(path)
    if not all(np.isfinite(a).all() for a in arrays):  # a NaN model labels every image NORMAL
        raise PneumoniaCNNError(f"{display_path(path)}: its weights hold NaN or infinite values (a model that "
                                f"diverged in training, or a damaged file)")
    layers = _pair_layers(arrays, path)
    channels = layers[0][0].shape[2]
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if shape and (shape[0], shape[1]) != (height, width):
            raise PneumoniaCNNError(f"{display_path(path)}: the file says input {shape[0]}x{shape[1]}, not "
                                    f"{height}x{width}")
    elif shape:
        height, width = shape[0], shape[1]
    else:
        raise PneumoniaCNNError(f"{display_path(path)}: a weights-only file does not record the input size; "
                                f"pass --size (e.g. --size 224 or --size 96x80)")
    state = keras_to_state_dict(layers, height, width, source=path)
    model = create_model("seed", in_channels=int(channels), image_size=(height, width))
    model.load_state_dict(state)
    model.eval()
    payload = {
        "model": {"name": "seed", "kwargs": model.model_kwargs},
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "preprocessing": {"size": [height, width], "channels": int(channels), "rescale": 1 / 255,
                          "interpolation": "nearest", "intensity": "none",
                          "color": "grayscale read, repeated to RGB" if channels == 3 else "grayscale"},
        "class_names": ["NORMAL", "PNEUMONIA"], "threshold": 0.5, "temperature": 1.0, "tta": False,
        "config": {"preset": "tutorial", "imported_from": str(path)}, "history": [],
        "run_id": f"keras-{printable(Path(path).name)}", "epoch": None, "parameters": count_parameters(model)[0],
        "intended_use": {"task": "binary: NORMAL vs PNEUMONIA on a frontal chest radiograph",
                         "population": "as the Keras model's training data (the tutorial: Kaggle pediatric set)",
                         "not_a_medical_device": True},
    }
    if out:
        save_checkpoint(payload, out)
    return model, payload
