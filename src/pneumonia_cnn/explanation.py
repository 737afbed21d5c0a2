"""Grad-CAM (Selvaraju et al., 2017): which regions of the X-ray raised the pneumonia score.

The map is the ReLU of the feature maps of one convolutional layer (the model's last by default) weighted
by the spatial mean of the score's gradient, upsampled to the input size and scaled to [0, 1].
"""
from __future__ import annotations

import hashlib
import io
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.loader import to_model_input
from .device import full_float32
from .errors import ImageReadError, PneumoniaCNNError
from .fileio import WRITE_FAILURES, atomic_path, display_path, write_bytes
from .models import last_conv_layer_name
from .signals import signals_deferred


def grad_cam(model: torch.nn.Module, pixels_uint8: np.ndarray, device, layer: str | None = None) -> np.ndarray:
    """``pixels_uint8`` (H, W) preprocessed -> map (H, W) in [0, 1]. In full float32 on a GPU, as scoring is
    (the same image's map would otherwise depend on whether a scoring batch was running meanwhile). Only the
    layer's gradient is computed: no parameter gradients are made or kept (they held about 3 MB per served
    model)."""
    with full_float32(torch.device(device)):
        return _grad_cam(model, pixels_uint8, device, layer)


def _grad_cam(model: torch.nn.Module, pixels_uint8: np.ndarray, device, layer: str | None) -> np.ndarray:
    layer = layer or last_conv_layer_name(model)
    modules = dict(model.named_modules())
    if layer not in modules:
        raise PneumoniaCNNError(f"--layer {layer}: no such layer; convolution layers are "
                                f"{', '.join(n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d))}")
    captured = {}
    handle = modules[layer].register_forward_hook(lambda _module, _inputs, output: captured.update(activation=output))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # an input that requires a gradient: the layer's output then has one even where its weights are frozen
            x = to_model_input(torch.from_numpy(np.array(pixels_uint8))[None], device).requires_grad_(True)
            score = model(x)
            activation = captured.get("activation")
            if activation is None:
                raise PneumoniaCNNError(f"--layer {layer}: the model's forward pass does not run it")
            if not isinstance(activation, torch.Tensor) or activation.dim() != 4:
                raise PneumoniaCNNError(f"--layer {layer}: output is not a feature map "
                                        f"(shape {tuple(getattr(activation, 'shape', ()))})")
            # the gradient of the score with respect to the layer's output only: the backward pass stops there
            # instead of running on to every parameter of the layers before it
            gradient, = torch.autograd.grad(score.sum(), activation, allow_unused=True)
            if gradient is None:
                raise PneumoniaCNNError(f"--layer {layer}: the score does not depend on its output")
    finally:
        handle.remove()
        model.train(was_training)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    cam = _on_input(cam, model, layer, x, pixels_uint8.shape)[0, 0].cpu().numpy()
    cam -= cam.min()
    return (cam / cam.max()).astype(np.float32) if cam.max() > 0 else cam.astype(np.float32)


# The centres depend only on the model's weights, the layer and the input's shape, and the models explained are
# served copies whose weights do not change: worked out once per model, they cost a third of a map on a CPU.
_centres_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _on_input(cam, model, layer: str, x, size):
    """The map at the input's size. A model of padded convolutions keeps its map on the input's grid (the ResNets,
    DenseNet, MobileNet, seed_bn): it is resized as Grad-CAM's authors and pytorch-grad-cam resize it; one whose
    unpadded convolutions shrink and shift the map (the tutorial's seed model) has each cell placed at its
    measured centre. Measured on a ResNet, whose border cuts its corner cells' fields, the centres moved inward and
    its map was drawn over rows 10-156 of 192, shifted up and left, leaving a finding at a lung base unmarked.
    Chosen by the layers, not the sizes (a side that divides the input's can be a coincidence: seed at 80)."""
    if not _shrinks(model):
        return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    return _to_input_grid(cam, _known_cell_centres(model, layer, x), size)


def _shrinks(model) -> bool:
    """Whether a convolution wider than one pixel runs unpadded: its output is smaller than its input."""
    return any(isinstance(module, torch.nn.Conv2d) and max(module.kernel_size) > 1
               and module.padding in (0, (0, 0), "valid") for module in model.modules())


def _known_cell_centres(model, layer: str, x) -> tuple[float, float, float, float]:
    known = _centres_of.setdefault(model, {})
    key = (layer, tuple(x.shape), x.dtype, str(x.device))
    if key not in known:
        known[key] = _cell_centres(model, dict(model.named_modules())[layer], x)
    return known[key]


def _cell_centres(model, module, x) -> tuple[float, float, float, float]:
    """Input coordinates of the receptive-field centres of the first and last cells of ``module``'s map:
    (row0, row_step, col0, col_step). Valid convolutions and pooling shift and shrink the area a map
    covers, so plain upsampling would stretch it; measuring the centres by gradient works for any model."""
    captured = {}
    handle = module.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    # A fixed probe: the centres depend a little on which ReLUs it opens, and the same image must always get
    # the same map (a random probe gave a slightly different map on every call).
    probe = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(x).requires_grad_(True)
    try:
        with torch.enable_grad():
            model(probe)
            out = captured["out"]
            height, width = out.shape[2], out.shape[3]
            centres = []
            for row, col in ((0, 0), (height - 1, width - 1)):
                grad, = torch.autograd.grad(out[0, :, row, col].abs().sum(), probe, retain_graph=True)
                weight = grad[0].abs().sum(0)
                total = weight.sum().clamp(min=1e-12)
                rows = torch.arange(weight.shape[0], dtype=weight.dtype, device=weight.device)
                cols = torch.arange(weight.shape[1], dtype=weight.dtype, device=weight.device)
                centres.append((float((weight.sum(1) * rows).sum() / total),
                                float((weight.sum(0) * cols).sum() / total)))
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    (r0, c0), (r1, c1) = centres
    return r0, (r1 - r0) / max(height - 1, 1), c0, (c1 - c0) / max(width - 1, 1)


def _to_input_grid(cam, centres, size):
    """Bilinear interpolation of cell values placed at their true input coordinates, falling to zero one
    cell beyond the outermost centres (pixels no cell is centred on get no credit of their own)."""
    r0, r_step, c0, c_step = centres
    height, width = cam.shape[2], cam.shape[3]
    rows = torch.arange(size[0], dtype=torch.float32)
    cols = torch.arange(size[1], dtype=torch.float32)
    u = (rows - r0) / (r_step if r_step else 1.0)
    v = (cols - c0) / (c_step if c_step else 1.0)
    grid_y = (2 * u / max(height - 1, 1) - 1) if height > 1 else torch.zeros_like(u)
    grid_x = (2 * v / max(width - 1, 1) - 1) if width > 1 else torch.zeros_like(v)
    grid = torch.stack(torch.meshgrid(grid_y, grid_x, indexing="ij")[::-1], dim=-1)[None].to(cam.device)
    return F.grid_sample(cam, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: the X-ray in gray with the heat map (jet) blended on top."""
    from matplotlib import colormaps
    heat = colormaps["jet"](cam)[..., :3]
    base = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return (np.clip((1 - alpha) * base + alpha * heat, 0, 1) * 255).astype(np.uint8)


# the PNG text chunk that identifies the image an overlay was made of, by its content fingerprint (not its path,
# which may name the patient, and which a moved folder changes): a later explain into the same folder replaces an
# overlay of the same image, never one of another image of the same name
SOURCE_KEY = "pneumonia-cnn source"
# and the SHA-256 of the raw map written beside it: the .npy holds no record of its own, and one explain did not
# write (a user's, of the same name) had been replaced because the overlay beside it was explain's
MAP_KEY = "pneumonia-cnn map"


def overlay_png(gray: np.ndarray, cam: np.ndarray, source=None, compress_level: int = 6,
                map_digest: str | None = None) -> bytes:
    """The overlay as PNG bytes; ``source``: the image's content fingerprint, recorded in the file
    (``overlay_source``); ``compress_level``: zlib's, 6 (PNG's usual) for files, lower where time counts more
    than bytes; ``map_digest``: the SHA-256 of the map written beside it, recorded too."""
    import io

    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    if source is not None:
        info.add_text(SOURCE_KEY, source)
    if map_digest is not None:
        info.add_text(MAP_KEY, map_digest)
    buffer = io.BytesIO()
    Image.fromarray(overlay(gray, cam)).save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def overlay_source(png) -> str | None:
    """The content fingerprint of the image an overlay explain wrote was made of; None: no such record."""
    return _overlay_record(png, SOURCE_KEY)


def _overlay_record(png, key: str) -> str | None:
    """The text ``key`` recorded in the overlay ``png``; None: no such record, or no regular file (opening a
    named pipe would wait for a writer)."""
    from PIL import Image
    if not os.path.isfile(png):
        return None
    try:
        with Image.open(png) as image:
            text = image.info.get(key)
    except Exception:  # not a picture, or a damaged one: not an overlay explain wrote
        return None
    return text if isinstance(text, str) else None


def _map_digest(npy) -> str | None:
    """The SHA-256 of the map ``npy``; None where it is no regular file, or too big for any map explain writes."""
    try:
        if not os.path.isfile(npy) or os.path.getsize(npy) > 1 << 30:
            return None
        digest = hashlib.sha256()
        with open(npy, "rb") as handle:  # hashlib.file_digest is Python 3.11's
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def output_stems(paths) -> list[str]:
    """One distinct output name per image: its stem, or where stems repeat (``a/x.jpeg`` and ``b/x.jpeg``,
    ``x.jpeg`` and ``x.png``) its folder and full name (``a_x.jpeg``), numbered if even those repeat."""
    stems = [Path(p).stem for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    names, taken = [], set()
    for path, stem in zip(paths, stems):
        name = f"{Path(path).parent.name}_{Path(path).name}" if stem in repeated else stem
        unique, number = name, 2
        while unique in taken:
            unique, number = f"{name}-{number}", number + 1
        taken.add(unique)
        names.append(unique)
    return names


def refuse_overwriting_inputs(paths, outputs) -> None:
    """Before any work: an overlay whose name is one of the images read (``explain DIR --out DIR`` run again, an
    image called ``x_gradcam.png`` beside ``x.jpeg``) would replace that image."""
    inputs = {}
    for path in map(Path, paths):  # each file once, by identity: a link or another spelling is the same file
        try:
            found = path.stat()
        except OSError:
            continue
        inputs.setdefault((found.st_dev, found.st_ino), path)
    for output in outputs:
        try:
            found = output.stat()
        except OSError:
            continue
        clash = inputs.get((found.st_dev, found.st_ino))
        if clash is not None:
            raise PneumoniaCNNError(f"{display_path(output)}: the overlay would overwrite {display_path(clash)}, "
                                    f"which explain reads; choose another --out")


def refuse_replacing_another(path, png: Path) -> None:
    """Before any work: an overlay (or map) already in ``--out`` is replaced only when it was made of this same
    image (its recorded source): ``x.jpeg`` of another folder explained into the same ``--out`` on another day
    had silently replaced the first one's maps. A file with no record (made otherwise, or by an earlier version)
    is kept too: nothing done is lost."""
    kept = _kept_output(path, png)
    if kept is not None:
        named, held = kept
        verb = "is" if held == "a folder" else "holds"
        raise PneumoniaCNNError(f"{display_path(named)}: {verb} {held}; the overlay of {display_path(path)} would "
                                f"replace it; give another --out, or remove it")


_NOT_WRITTEN = "a file this version of explain did not write (an earlier version's overlay, or another program's)"


def _kept_output(path, png: Path) -> tuple[Path, str] | None:
    """The first of ``png`` and its map that explain may not replace, and what it holds; None: neither. The map is
    replaced only when it is the one written with this image's overlay (the SHA-256 the overlay records): a
    user's own ``x_gradcam.npy`` had been replaced because the overlay beside it was explain's."""
    npy = png.with_suffix(".npy")
    for place in (png, npy):  # "holds a file explain did not write" named a folder there as a file
        if place.is_dir() and not place.is_symlink():
            return place, "a folder"
    if os.path.lexists(png):
        source = overlay_source(png)
        if source is None:
            return png, _NOT_WRITTEN
        if source != _fingerprint(path):
            return png, "the overlay of another image"
    if os.path.lexists(npy):
        recorded = _overlay_record(png, MAP_KEY) if os.path.lexists(png) else None
        if recorded is None or recorded != _map_digest(npy):
            return npy, _NOT_WRITTEN
    return None


def planned_overlays(paths, out_dir) -> list[Path]:
    """Each image's overlay ``<name>_gradcam.png`` (its raw map the ``.npy`` beside it), ``<name>`` the image's
    stem made distinct where two share one (``output_stems``); refused, before any work, where one would replace
    an image read or another image's overlay."""
    overlays = [Path(out_dir) / f"{stem}_gradcam.png" for stem in output_stems(paths)]
    refuse_overwriting_inputs(paths, [file for png in overlays for file in (png, png.with_suffix(".npy"))])
    for path, png in zip(paths, overlays):
        refuse_replacing_another(path, png)
    return overlays


def write_overlay(png: Path, gray: np.ndarray, cam: np.ndarray, source) -> None:
    """The overlay and its raw map, each written atomically; the map is renamed into place only once the
    overlay is (the inner write ends first), so a failure leaves the previous pair, or none, never half. A
    failure is an ``OutputError`` naming the file that failed, with the reason (numpy's own write of the map
    said "36864 requested and 9184 written" on a full disk)."""
    buffer = io.BytesIO()
    np.save(buffer, cam)
    npy = png.with_suffix(".npy")
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()  # recorded in the overlay: the map is explain's
    picture_bytes = overlay_png(gray, cam, _fingerprint(source), map_digest=digest)
    # Ctrl-C or SIGTERM between the two renames left the new overlay beside the old map, which the overlay's digest
    # then disowned: every later explain into this folder refused its own map. Held for the two writes (ms).
    with signals_deferred(), atomic_path(npy) as raw, atomic_path(png) as picture:
        write_bytes(raw, buffer.getvalue(), npy)
        write_bytes(picture, picture_bytes, png)


def _fingerprint(path) -> str | None:
    from .data.fingerprint import file_fingerprint
    try:
        return file_fingerprint(path)
    except OSError:  # unreadable now: it was read to be explained, so this is a race; nothing to match
        return None


def explain_each(predictor, paths, out_dir, layer: str | None = None) -> Iterator[dict]:
    """Grad-CAM of each image written to ``out_dir`` (``planned_overlays``, checked now, before any work), with
    predict's answer for it: one result per image as it is done, so a caller shows each at once (Ctrl-C keeps
    what was shown). An image that cannot be read, or whose overlay cannot be written, is its own result with
    ``error``; the others go on. A full, read-only or failing file system (``WRITE_FAILURES``) ends it with the
    ``OutputError`` naming the file ("maps/x_gradcam.npy: No space left on device")."""
    overlays = planned_overlays(paths, out_dir)  # the folder is made by the first overlay written: none, none made
    return _explained(predictor, paths, overlays, layer)


def _explained(predictor, paths, overlays, layer):
    model = predictor.bundle.explain_model().to(predictor.device)
    for path, png in zip(paths, overlays):
        try:
            gray, meta = predictor.preprocess_path(path)
        except ImageReadError as error:
            yield {"path": str(path), "error": error.reason}
            continue
        cam = grad_cam(model, gray, predictor.device, layer)
        entry = predictor.assess(gray[None], [meta])[0][0]  # predict's answer: probability, label, OOD flag
        try:
            write_overlay(png, gray, cam, path)
        except OSError as error:  # this image's only (a name too long for the system): the others go on
            if error.errno in WRITE_FAILURES:  # a full, read-only or failing file system, or a file size limit:
                # every other overlay would fail too, so explain stops there: "PATH: reason", once
                raise
            yield {"path": str(path), "error": f"overlay not written: {display_path(png)} "
                                               f"({error.strerror or error})"}
            continue
        yield {"path": str(path), "probability": entry["probability"], "label": entry["label"],
               "threshold": entry["threshold"], "prevalence": entry["prevalence"],
               "prevalence_source": entry["prevalence_source"],
               "engine": entry["engine"], "precision": entry["precision"],
               "in_distribution": entry["in_distribution"], "warnings": entry["warnings"], "overlay": str(png),
               "map": str(png.with_suffix(".npy")), "layer": layer or last_conv_layer_name(model)}


def explain(predictor, paths, out_dir, layer: str | None = None) -> list[dict]:
    """``explain_each``'s results as a list."""
    return list(explain_each(predictor, paths, out_dir, layer))
