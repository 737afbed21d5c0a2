"""Grad-CAM (Selvaraju et al., 2017): which regions of the X-ray raised the pneumonia score.

The map is the ReLU of the feature maps of one convolutional layer (the model's last by default) weighted
by the spatial mean of the score's gradient, upsampled to the input size and scaled to [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.loader import to_model_input
from .errors import ImageReadError, PneumoniaCNNError
from .fileio import atomic_path
from .models import last_conv_layer_name


def grad_cam(model: torch.nn.Module, pixels_uint8: np.ndarray, device, layer: str | None = None) -> np.ndarray:
    """``pixels_uint8`` (H, W) preprocessed -> map (H, W) in [0, 1]."""
    layer = layer or last_conv_layer_name(model)
    modules = dict(model.named_modules())
    if layer not in modules:
        raise PneumoniaCNNError(f"--layer {layer}: no such layer; convolution layers are "
                                f"{', '.join(n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d))}")
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["activation"] = output
    handle = modules[layer].register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = to_model_input(torch.from_numpy(np.array(pixels_uint8))[None], device)
            score = model(x)
            model.zero_grad(set_to_none=True)
            score.sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    activation = captured["activation"]
    if activation.dim() != 4:
        raise PneumoniaCNNError(f"--layer {layer}: output is not a feature map (shape {tuple(activation.shape)})")
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    cam = _to_input_grid(cam, _cell_centres(model, modules[layer], x), pixels_uint8.shape)[0, 0].cpu().numpy()
    cam -= cam.min()
    return (cam / cam.max()).astype(np.float32) if cam.max() > 0 else cam.astype(np.float32)


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


def overlay_png(gray: np.ndarray, cam: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(overlay(gray, cam)).save(buffer, format="PNG")
    return buffer.getvalue()


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
            raise PneumoniaCNNError(f"{output}: the overlay would overwrite {clash}, which explain reads; "
                                    f"choose another --out")


def explain(predictor, paths, out_dir, layer: str | None = None) -> list[dict]:
    """Write ``<name>_gradcam.png`` (overlay) and ``<name>_gradcam.npy`` (raw map) per image; ``<name>`` is
    the image's stem, made distinct where two images share one (``output_stems``)."""
    out_dir = Path(out_dir)
    stems = output_stems(paths)
    refuse_overwriting_inputs(paths, [out_dir / f"{stem}_gradcam.{kind}" for stem in stems for kind in ("png", "npy")])
    out_dir.mkdir(parents=True, exist_ok=True)
    model = predictor.bundle.explain_model().to(predictor.device)
    results = []
    for path, stem in zip(paths, stems):
        try:
            gray, meta = predictor.preprocess_path(path)
        except ImageReadError as error:
            results.append({"path": str(path), "error": error.reason})
            continue
        cam = grad_cam(model, gray, predictor.device, layer)
        entry = predictor.assess(gray[None], [meta])[0][0]  # predict's answer: probability, label, OOD flag
        with atomic_path(out_dir / f"{stem}_gradcam.png") as temporary:
            temporary.write_bytes(overlay_png(gray, cam))
        with atomic_path(out_dir / f"{stem}_gradcam.npy") as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, cam)
        results.append({"path": str(path), "probability": entry["probability"], "label": entry["label"],
                        "in_distribution": entry["in_distribution"], "warnings": entry["warnings"],
                        "overlay": str(out_dir / f"{stem}_gradcam.png"), "map": str(out_dir / f"{stem}_gradcam.npy"),
                        "layer": layer or last_conv_layer_name(model)})
    return results
