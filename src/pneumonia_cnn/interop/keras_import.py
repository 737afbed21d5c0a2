"""Import the tutorial's trained Keras model into our ``seed`` model, reading arrays only (h5py, no TensorFlow).

Accepts the legacy full-model HDF5 (``.h5``), the Keras 3 archive (``.keras``, a zip holding
``config.json`` and ``model.weights.h5``) and weights-only files (``.weights.h5``, which carry no input
size: pass ``size``). Keras stores Conv2D kernels as (kh, kw, in, out), Dense kernels as (in, out), and
flattens NHWC feature maps, so the first Dense layer's rows are reordered from (h, w, c) to (c, h, w).
Nothing in the file is executed: only numeric datasets and the JSON config are read. Each layer is checked
against the tutorial's (filters, units, inputs, float weights) and a misfit is named by its Keras layer in one
line. The checkpoint records where the model came from (the file's name and SHA-256) and what it lacks: no
training data, no fitted decision (the tutorial's threshold 0.5, no calibration), no out-of-distribution detector.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import check_out_name, save_checkpoint
from ..errors import PneumoniaCNNError
from ..fileio import display_path, printable
from ..models import count_parameters, create_model

# what ``--out`` may be named: the suffixes by which predict and the other commands take an argument for a model
# the tutorial's layers in order: what each is called in a message, and its filters or units
TUTORIAL_LAYERS = (("the tutorial's first Conv2D", 32), ("the tutorial's second Conv2D", 64),
                   ("the tutorial's third Conv2D", 128), ("the tutorial's first Dense layer", 128),
                   ("the tutorial's final layer", 1))


# the tutorial's layers as their config states them, with the settings the import assumes; a file whose config
# says otherwise (a linear output trained from logits, tanh, average pooling, a dilation) is refused: its weights
# fit our layers' shapes, and were imported as the tutorial's with other probabilities than Keras gives
_CONV = {"kernel_size": [3, 3], "strides": [1, 1], "padding": "valid", "activation": "relu", "dilation_rate": [1, 1],
         "use_bias": True, "groups": 1, "data_format": "channels_last"}
_POOL = {"pool_size": [2, 2], "strides": [2, 2], "padding": "valid", "data_format": "channels_last"}
TUTORIAL_CONFIG = (("Conv2D", dict(_CONV, filters=32)), ("MaxPooling2D", _POOL), ("Conv2D", dict(_CONV, filters=64)),
                   ("MaxPooling2D", _POOL), ("Conv2D", dict(_CONV, filters=128)), ("MaxPooling2D", _POOL),
                   ("Flatten", {"data_format": "channels_last"}),
                   ("Dense", {"units": 128, "activation": "relu", "use_bias": True}),
                   ("Dense", {"units": 1, "activation": "sigmoid", "use_bias": True}))
PASSED_THROUGH = ("InputLayer", "Dropout")  # nothing at inference


def check_tutorial_config(config: dict, where: str) -> None:
    """Refuse, in one line, a model whose config (when the file has one) is not the tutorial's layer by layer."""
    layers = config.get("config") if isinstance(config, dict) else None
    layers = layers.get("layers") if isinstance(layers, dict) else layers
    if not isinstance(layers, list):
        return  # a weights-only file: only the arrays' shapes can be checked
    kept = [layer for layer in layers if isinstance(layer, dict) and layer.get("class_name") not in PASSED_THROUGH]
    found, expected = [str(layer.get("class_name")) for layer in kept], [name for name, _ in TUTORIAL_CONFIG]
    if found != expected:
        raise PneumoniaCNNError(f"{where}: its layers are {', '.join(found) or 'none'}, not the tutorial's "
                                f"{', '.join(expected)}")
    for layer, (kind, settings) in zip(kept, TUTORIAL_CONFIG):
        written = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        for key, value in settings.items():
            stated = _setting(written.get(key, "linear" if key == "activation" else None))  # Keras' own default
            if stated is not None and stated != value:  # another setting not stated: Keras' default, the tutorial's
                raise PneumoniaCNNError(f"{where}: layer {printable(str(written.get('name', kind)))} ({kind}) has "
                                        f"{key} {stated!r}, not the tutorial's {value!r}")


def _setting(value):
    """A config value as the tutorial's are written: tuples as lists, a serialised activation by its name."""
    if isinstance(value, dict):  # Keras 3 may serialise a function: {"class_name": "function", "config": "relu"}
        value = value.get("config") if isinstance(value.get("config"), str) else value.get("class_name")
    return list(value) if isinstance(value, tuple) else value


def _datasets(group) -> list[tuple[str, np.ndarray]]:
    """Every numeric array under ``group`` (its path there, whose first part is the Keras layer's name), with the
    dtype it is stored in: an integer weight is refused when it is used, not cast on the way in."""
    import h5py
    found = []

    def visit(name, item):
        if isinstance(item, h5py.Dataset) and item.ndim >= 1 and item.dtype.kind in "biufc":
            found.append((name, np.asarray(item[()])))
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


def _read_archive(path: Path, data: bytes):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        if "model.weights.h5" not in names:  # a PyTorch checkpoint is a zip archive too
            torch_file = any(name.endswith("/data.pkl") for name in names)
            raise PneumoniaCNNError(f"{display_path(path)}: not a Keras model (a zip archive without "
                                    f"model.weights.h5{': a PyTorch checkpoint' if torch_file else ''})")
        config = json.loads(archive.read("config.json")) if "config.json" in names else {}
        check_tutorial_config(config, display_path(path))
        weights = io.BytesIO(archive.read("model.weights.h5"))
    import h5py
    with h5py.File(weights, "r") as handle:
        arrays = _datasets(handle["layers"] if "layers" in handle else handle)
    return arrays, _input_shape_from_config(config)


def _read_hdf5(path: Path, data: bytes):
    import h5py
    with h5py.File(io.BytesIO(data), "r") as handle:
        shape = None
        if "model_config" in handle.attrs:
            raw = handle.attrs["model_config"]
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            check_tutorial_config(config, display_path(path))
            shape = _input_shape_from_config(config)
        group = handle["model_weights"] if "model_weights" in handle else handle["layers"] \
            if "layers" in handle else handle
        arrays = _datasets(group)
        if group.name == "/model_weights" and "layer_names" in group.attrs:
            order = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["layer_names"]]
            arrays.sort(key=lambda item: order.index(item[0].split("/")[0]) if item[0].split("/")[0] in order
                        else len(order))
    return arrays, shape


def read_keras_file(path) -> tuple[list[tuple[str, np.ndarray]], tuple[int, int, int] | None, str]:
    """The numeric arrays of the model's layers, each with its path in the file; the input shape (H, W, C) when
    the file says it; and the SHA-256 of the bytes read (read once: the digest is that of what was imported)."""
    path = Path(path)
    if not path.is_file():
        raise PneumoniaCNNError(f"{display_path(path)}: {'not a regular file' if path.exists() else 'file not found'}")
    try:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        arrays, shape = _read_archive(path, data) if zipfile.is_zipfile(io.BytesIO(data)) else _read_hdf5(path, data)
        return arrays, shape, digest
    except PneumoniaCNNError:
        raise
    except (OSError, KeyError, ValueError, TypeError, AttributeError, IndexError, zipfile.BadZipFile) as error:
        raise PneumoniaCNNError(f"{display_path(path)}: not a readable Keras model "
                                f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None


def _layer(name: str) -> str:
    """The Keras layer a dataset belongs to: the first part of its path (``dense_1/vars/1``, ``dense_1/sequential/
    dense_1/bias``)."""
    return printable(name.split("/")[0])


def _pair_layers(named: list[tuple[str, np.ndarray]], path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The tutorial's five layers as (Keras layer, kernel, bias), ordered by how their shapes chain."""
    where = display_path(path)
    kernels = [(name, a) for name, a in named if a.ndim in (2, 4)]
    convs = [k for k in kernels if k[1].ndim == 4]
    denses = [k for k in kernels if k[1].ndim == 2]
    if len(convs) != 3 or len(denses) != 2:
        raise PneumoniaCNNError(f"{where}: expected the tutorial's 3 Conv2D and 2 Dense layers, found "
                                f"{len(convs)} Conv2D and {len(denses)} Dense kernels")

    def the(found, what):
        if found is None:
            raise PneumoniaCNNError(f"{where}: not the tutorial's layers: no {what}")
        return found
    ordered = [the(next((c for c in convs if c[1].shape[3] == 32), None), "Conv2D with 32 filters")]
    for _ in range(2):
        previous = ordered[-1][1]
        ordered.append(the(next((c for c in convs if c[1].shape[2] == previous.shape[3]
                                 and not any(c is o for o in ordered)), None),
                           f"Conv2D taking the {previous.shape[3]} channels of the one before"))
    if any(c.shape[:2] != (3, 3) for _, c in ordered):
        raise PneumoniaCNNError(f"{where}: not the tutorial's layers: its Conv2D kernels are "
                                f"{', '.join('x'.join(map(str, c.shape[:2])) for _, c in ordered)}, not 3x3")
    # the first Dense layer takes the flattened feature map, the most inputs (a tie: the first in the file)
    layers = ordered + sorted(denses, key=lambda d: -d[1].shape[0])
    _check_layer_shapes(layers, where)
    used: set[int] = set()
    return [(_layer(name), kernel, _bias_for(name, kernel, named, used, where)) for name, kernel in layers]


def _check_layer_shapes(layers: list[tuple[str, np.ndarray]], where: str) -> None:
    """Each layer's inputs, filters and units as the tutorial's: a misfit named by its Keras layer (it was
    load_state_dict's traceback, "size mismatch for fc2.weight")."""
    channels = layers[0][1].shape[2]
    if channels not in (1, 3):
        raise PneumoniaCNNError(f"{where}: not the tutorial's layers: {_layer(layers[0][0])} takes {channels} "
                                f"channels, where the tutorial's first Conv2D takes 3 (RGB) or 1 (gray)")
    for (name, kernel), (what, wanted) in zip(layers, TUTORIAL_LAYERS):
        have = kernel.shape[-1]
        if have != wanted:
            kind = ("filter" if kernel.ndim == 4 else "unit") + ("s" if have != 1 else "")
            raise PneumoniaCNNError(f"{where}: not the tutorial's layers: {_layer(name)} has {have} {kind}, where "
                                    f"{what} has {wanted}")
    (_, first), (final_name, final) = layers[3], layers[4]
    if final.shape[0] != first.shape[1]:
        raise PneumoniaCNNError(f"{where}: not the tutorial's layers: {_layer(final_name)} takes {final.shape[0]} "
                                f"inputs, where the tutorial's final layer takes the {first.shape[1]} units of the "
                                f"Dense layer before")


def _bias_for(name: str, kernel: np.ndarray, named, used: set[int], where: str) -> np.ndarray:
    """The kernel's bias: the 1-D array of its length in its own layer; in a file whose biases lie outside the
    kernels' layers, an unused one of that length there."""
    length, layer = kernel.shape[-1], name.split("/")[0]
    kernel_layers = {n.split("/")[0] for n, a in named if a.ndim in (2, 4)}
    free = [i for i, (n, a) in enumerate(named) if a.ndim == 1 and i not in used]
    own = [i for i in free if named[i][0].split("/")[0] == layer]
    fits = [i for i in own if len(named[i][1]) == length] or \
        [i for i in free if len(named[i][1]) == length and named[i][0].split("/")[0] not in kernel_layers]
    if not fits and own:
        outputs = f"{length} output" + ("s" if length != 1 else "")
        raise PneumoniaCNNError(f"{where}: not the tutorial's layers: {_layer(name)}'s bias has "
                                f"{len(named[own[0]][1])} values, where its kernel has {outputs}")
    if not fits:
        raise PneumoniaCNNError(f"{where}: missing a bias of length {length} for {_layer(name)}")
    used.add(fits[0])
    return named[fits[0]][1]


def _check_floats(layers, where: str) -> None:
    """Float weights only, as a checkpoint's are checked: integers were cast silently (an int64 bias of 0 and 1
    is no trained model's, and cast it moves every probability)."""
    for layer, kernel, bias in layers:
        for role, array in (("kernel", kernel), ("bias", bias)):
            if array.dtype.kind != "f":
                raise PneumoniaCNNError(f"{where}: weights do not fit model seed ({layer}'s {role} holds "
                                        f"{array.dtype} values, the model float32)")


def keras_to_state_dict(arrays, height: int, width: int, source=None) -> dict:
    """Our ``seed`` model's weights (float32) from the Keras layers' (kernel, bias) pairs; ``source``, the file
    they came from, names it in the error a wrong input size gives."""
    (c1, b1), (c2, b2), (c3, b3), (d1, e1), (d2, e2) = arrays
    final_h, final_w = height, width
    for _ in range(3):
        final_h, final_w = (final_h - 2) // 2, (final_w - 2) // 2
    if d1.shape[0] != 128 * final_h * final_w:
        named = f"{display_path(source)}: " if source is not None else ""
        raise PneumoniaCNNError(f"{named}input {height}x{width} gives {128 * final_h * final_w} features but the Dense "
                                f"layer expects {d1.shape[0]}: wrong --size")
    dense = d1.reshape(final_h, final_w, 128, -1).transpose(2, 0, 1, 3).reshape(d1.shape[0], -1)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return {"conv1.weight": t(c1.transpose(3, 2, 0, 1)), "conv1.bias": t(b1),
            "conv2.weight": t(c2.transpose(3, 2, 0, 1)), "conv2.bias": t(b2),
            "conv3.weight": t(c3.transpose(3, 2, 0, 1)), "conv3.bias": t(b3),
            "fc1.weight": t(dense.T), "fc1.bias": t(e1), "fc2.weight": t(d2.T), "fc2.bias": t(e2)}


def import_keras(path, out=None, size=None) -> tuple[torch.nn.Module, dict]:
    """Build our ``seed`` model from a Keras file; save a checkpoint to ``out`` when given.

    ``size`` is (height, width) or an int; required for weights-only files, checked against the others.
    """
    from ..models.registry import state_dict_misfit
    if out is not None:
        check_out_name(out, "import-keras")
    where = display_path(path)
    named, shape, digest = read_keras_file(path)
    if not all(np.isfinite(a).all() for _, a in named):  # a NaN model labels every image NORMAL
        raise PneumoniaCNNError(f"{where}: its weights hold NaN or infinite values (a model that "
                                f"diverged in training, or a damaged file)")
    layers = _pair_layers(named, path)
    _check_floats(layers, where)
    channels = layers[0][1].shape[2]
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if shape and (shape[0], shape[1]) != (height, width):
            raise PneumoniaCNNError(f"{where}: the file says input {shape[0]}x{shape[1]}, not {height}x{width}")
    elif shape:
        height, width = shape[0], shape[1]
    else:
        raise PneumoniaCNNError(f"{where}: a weights-only file does not record the input size; "
                                f"pass --size (e.g. --size 224 or --size 96x80)")
    state = keras_to_state_dict([(kernel, bias) for _, kernel, bias in layers], height, width, source=path)
    model = create_model("seed", in_channels=int(channels), image_size=(height, width))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # the checks above name the layer; anything they miss, in one line
        raise PneumoniaCNNError(f"{where}: weights do not fit model seed ({state_dict_misfit(error)})") from None
    model.eval()
    payload = imported_payload(model, path, digest, (height, width), int(channels))
    if out:
        save_checkpoint(payload, out)
    return model, payload


def imported_payload(model, path, digest: str, size: tuple[int, int], channels: int) -> dict:
    """The checkpoint of an imported model, saying what it is: imported from this Keras file (its SHA-256),
    trained elsewhere with no training data recorded, the tutorial's threshold 0.5 fitted on no images, no
    calibration, no out-of-distribution detector (``imported``; ``info`` and the outputs read the rest)."""
    name = printable(Path(path).name)
    height, width = size
    return {
        "model": {"name": "seed", "kwargs": model.model_kwargs},
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "preprocessing": {"size": [height, width], "channels": channels, "rescale": 1 / 255,
                          "interpolation": "nearest", "intensity": "none",
                          "color": "grayscale read, repeated to RGB" if channels == 3 else "grayscale"},
        "class_names": ["NORMAL", "PNEUMONIA"], "threshold": 0.5, "threshold_policy": "0.5",
        "calibration": {"method": "none", "scale": 1.0, "bias": 0.0, "prior": None}, "tta": False,
        "config": {"preset": "tutorial", "imported_from": str(path)}, "history": [],
        "run_id": f"keras-{name}", "epoch": None, "parameters": count_parameters(model)[0],
        "imported": {"from": "keras", "file": name, "path": printable(path), "sha256": digest,
                     "trained": "elsewhere, in Keras: no training data, epochs or history recorded",
                     "decision": "none fitted: the tutorial's threshold 0.5 on the sigmoid, no calibration",
                     "ood": "no out-of-distribution detector: only the input checks that need no model flag"},
        "intended_use": {"task": "binary: NORMAL vs PNEUMONIA on a frontal chest radiograph",
                         "population": "the Keras model's training data, not recorded; the tutorial trains on the "
                                       "Kaggle pediatric set, children 1–5 years from one hospital",
                         "trained_on": {"data": "not recorded: trained elsewhere, in Keras",
                                        "imported_from": name, "sha256": digest, "input_size": [height, width]},
                         "not_a_medical_device": True},
    }
