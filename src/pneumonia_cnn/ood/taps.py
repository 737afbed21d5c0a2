"""Features for the detector from the same forward pass: reductions of a layer's output (torch ops that
export to ONNX) and the thread-safe ``TappedModel``."""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_TAP = "input"  # a tap on the network's input image (B, 1, H, W) in [0, 1], not on a module


# ------------------------------------------------------------------ reductions: (B, C, H, W) or (B, F) -> (B, D)
def _mean_std(x: torch.Tensor) -> torch.Tensor:
    # mean and spread of each channel: the spread catches textures the mean misses (unbiased std, as the
    # detectors stored in older checkpoints were fitted with)
    x = x.float()
    if x.dim() == 2:
        return x
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _mean(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x if x.dim() == 2 else x.mean(dim=(2, 3))


def _gram(order: int):
    def reduce(x: torch.Tensor) -> torch.Tensor:
        """Row sums of the order-p Gram matrix of the channels (Sastry and Oore, 2020), per pixel."""
        flat = torch.flatten(x.float(), 2)
        powered = flat.pow(order)
        gram = torch.matmul(powered, powered.transpose(1, 2)) / flat.shape[2]
        return (torch.sign(gram) * gram.abs().pow(1.0 / order)).sum(dim=2)
    return reduce


def _block_means(x: torch.Tensor, cells: int) -> torch.Tensor:
    """Mean of each block of a cells x cells grid over the whole map, flattened. A map whose sides are not a
    multiple of ``cells`` is first resized (bilinear) up to the next multiple; a map smaller than ``cells``
    keeps its own pixels."""
    cells = min(cells, int(x.shape[2]), int(x.shape[3]))
    height, width = -(-int(x.shape[2]) // cells), -(-int(x.shape[3]) // cells)  # ceiling division
    x = x.float()
    if (height * cells, width * cells) != (int(x.shape[2]), int(x.shape[3])):
        x = F.interpolate(x, size=(height * cells, width * cells), mode="bilinear", align_corners=False)
    return torch.flatten(F.avg_pool2d(x, (height, width)), 1)


def _gradient(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:, :-1] - x[:, :, :-1, :-1]).abs() + (x[:, :, :-1, 1:] - x[:, :, :-1, :-1]).abs()


def _thumbnail(x: torch.Tensor) -> torch.Tensor:
    """The image at 8 x 8: where the lungs, mediastinum, diaphragm and shoulders lie, the thorax's shape."""
    return _block_means(x, 8)


def _edge_map(x: torch.Tensor) -> torch.Tensor:
    """Where the fine detail is: 24 x 24 block means of the gradient magnitude, standardised per image (the
    pattern of ribs, vessels and borders relative to the image, whatever the exposure and sharpness)."""
    blocks = _block_means(_gradient(x.float()), 24)
    centred = blocks - blocks.mean(dim=1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-6)


def _coarse_thumbnail(x: torch.Tensor) -> torch.Tensor:
    """The image at 4 x 4: the thorax's proportions and where it sits in the frame, little else."""
    return _block_means(x, 4)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """One channel: the mean of the channels (an image of one channel is itself, with no copy)."""
    x = x.float()
    return x if int(x.shape[1]) == 1 else x.mean(dim=1, keepdim=True)


def _halved(x: torch.Tensor) -> torch.Tensor:
    """Means of 2 x 2 pixels, ``avg_pool2d(x, 2)`` bit for bit: eager torch sums the four strided views faster
    than its pooling of one channel on CPU, while ONNX Runtime runs an exported AveragePool far faster than
    strided Slices, so the export keeps the pooling."""
    if torch.onnx.is_in_onnx_export():
        return F.avg_pool2d(x, 2)
    x = x[:, :, : int(x.shape[2]) // 2 * 2, : int(x.shape[3]) // 2 * 2]
    return (x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 0::2] + x[:, :, 1::2, 1::2]) * 0.25


def _half_resolution(x: torch.Tensor) -> torch.Tensor:
    """The gray image at half resolution, which the orientations and the content box read; a map under 16
    pixels keeps its own."""
    x = _gray(x)
    return _halved(x) if min(x.shape[2:]) >= 16 else x


ORIENTATIONS = 8


def _orientation_histogram(x: torch.Tensor, halve: bool = True) -> torch.Tensor:
    """How the edges run in each block of a 4 x 4 grid (a coarse histogram of oriented gradients, Dalal and
    Triggs 2005): the slope of the ribs, the clavicles and the thorax's outline change with age. Gradients of
    the image at half resolution (the bones' edges are wide), taken at every other pixel (a block still
    counts hundreds: a quarter of the work); each block's 8 bins sum to 1, so exposure and sharpness do not
    count. Orientations are binned by the doubled angle (an edge and its reverse fall together) as the
    nearest of 8 directions by dot product, which exports to ONNX without atan2. The bins' edges are turned
    1/16 of a bin off the axes and diagonals, where many pixels' gradients point exactly, so that rounding
    (torch's or ONNX Runtime's) never decides their bin. ``halve=False``: ``x`` is at half resolution already."""
    x = F.pad(_half_resolution(x) if halve else _gray(x), (1, 1, 1, 1), mode="replicate")
    dx = x[:, :, 1:-1:2, 2::2] - x[:, :, 1:-1:2, :-2:2]
    dy = x[:, :, 2::2, 1:-1:2] - x[:, :, :-2:2, 1:-1:2]
    bins = torch.arange(ORIENTATIONS, dtype=torch.float32, device=x.device)
    angles = (bins + 0.5 + 1 / 16) * (2 * torch.pi / ORIENTATIONS)
    cos, sin = torch.cos(angles).view(1, -1, 1, 1), torch.sin(angles).view(1, -1, 1, 1)
    alignment = (dx * dx - dy * dy) * cos + (2 * dx * dy) * sin  # |g|^2 cos(2 theta - angle) per direction
    magnitude = torch.sqrt(dx * dx + dy * dy)
    blocks = _block_means(magnitude * (alignment >= alignment.amax(dim=1, keepdim=True)), 4)
    blocks = blocks.reshape(-1, ORIENTATIONS, int(blocks.shape[1]) // ORIENTATIONS)
    return torch.flatten(blocks / (blocks.sum(dim=1, keepdim=True) + 1e-6), 1)


# A margin row or column (a black band, a shutter, a border): its mean is within this share of the profile's
# range above the darkest row or column. At most MARGIN_CAP of each side is cut, so that a dark half of an
# image (a lung whited out on one side reads the other way, but an unusual exposure may not) stays in view.
MARGIN_DARKNESS, MARGIN_CAP = 0.12, 0.3


def _content_span(profile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) of each (B, L) profile's content as fractions of L: the dark margins at both ends cut."""
    length = int(profile.shape[1])
    low, high = profile.amin(dim=1, keepdim=True), profile.amax(dim=1, keepdim=True)
    inside = (profile > low + MARGIN_DARKNESS * (high - low)).float()
    first = torch.argmax(inside, dim=1).float()  # a uniform profile has no inside: the whole length is kept
    last = (length - 1) - torch.argmax(torch.flip(inside, dims=[1]), dim=1).float()
    first = torch.clamp(first, max=MARGIN_CAP * length)
    last = torch.clamp(last, min=(1 - MARGIN_CAP) * length - 1)
    return first / length, (last + 1) / length


def _content_box(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H/2, W/2), or (B, 1, H, W) for maps under 16 pixels: the image inside its dark margins, averaged
    over 2 x 2 pixels and resampled bilinearly, so that the picture is the same whether the film came with black
    side bands, a border or a shifted frame, or without (many training children have dark side bands and few
    adults do: views of the whole frame read bands as youth). The margins are read from the row and column
    means of the image averaged again over 2 x 2."""
    return _box_of_half(_half_resolution(x))


def _box_of_half(x: torch.Tensor) -> torch.Tensor:
    """``_content_box`` of the image at half resolution already (``_half_resolution``)."""
    coarse = _halved(x) if min(x.shape[2:]) >= 16 else x
    left, right = _content_span(coarse.mean(dim=2)[:, 0])
    top, bottom = _content_span(coarse.mean(dim=3)[:, 0])
    return _resample(_resample(x, top, bottom, dim=2), left, right, dim=3)


def _resample(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` (B, 1, H, W) along ``dim`` (2 or 3) at the centres of L equal parts of each image's span [start,
    end) (fractions of its length L): ``grid_sample(mode="bilinear", padding_mode="border")``'s sampling, built
    of gathers and products, which ONNX Runtime runs faster than its GridSample and OpenVINO keeps in float32
    (matrix products of interpolation weights it runs in bf16 on CPUs that have it)."""
    rows = x[:, 0] if dim == 2 else x[:, 0].transpose(1, 2)  # (B, L, M): the resampled axis second
    length, across = int(rows.shape[1]), int(rows.shape[2])
    steps = (torch.arange(length, dtype=torch.float32, device=x.device) + 0.5) / length
    source = (start[:, None] + (end - start)[:, None] * steps[None]) * length - 0.5  # pixel centres at integers
    source = torch.clamp(source, 0.0, length - 1.0)
    below = torch.floor(source)
    above = torch.clamp(below + 1, max=length - 1.0)
    # whole rows gathered from the batch's rows in one list (a Gather of B x L indices, not one per pixel)
    first_row = (torch.cumsum(torch.ones_like(start), dim=0) - 1)[:, None] * length
    flat = rows.reshape(-1, across)

    def take(index: torch.Tensor) -> torch.Tensor:
        return flat[(index + first_row).long().reshape(-1)].reshape(-1, length, across)
    weight = (source - below)[:, :, None]
    out = take(below) * (1 - weight) + take(above) * weight
    return (out if dim == 2 else out.transpose(1, 2))[:, None]


def _standardised_thumbnail(box: torch.Tensor) -> torch.Tensor:
    """4 x 4 block means, standardised per image: histogram equalisation gives the content other grey levels
    when bands take part of the histogram, so only the pattern is compared."""
    blocks = _block_means(box, 4)
    centred = blocks - blocks.mean(dim=1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-6)


# views of the content box (``_content_box``), which the input taps compute once for all of them
CONTENT_BOX_VIEWS = {"thumbnail4_content": _standardised_thumbnail,
                     "orientations4_content": lambda box: _orientation_histogram(box, halve=False)}


def _of_content_box(view):
    """A content-box view as a reduction of the image (``reduce_input`` shares one box between them)."""
    return lambda x: view(_content_box(x))


REDUCTIONS = {
    "mean_std": _mean_std,
    "mean": _mean,
    "flatten": lambda x: torch.flatten(x.float(), 1),
    "gram1": _gram(1), "gram2": _gram(2), "gram3": _gram(3),
    "thumbnail8": _thumbnail,
    "edge_map24": _edge_map,
    "thumbnail4": _coarse_thumbnail,
    "orientations4": _orientation_histogram,
    **{name: _of_content_box(view) for name, view in CONTENT_BOX_VIEWS.items()},
}
# reductions of a feature map's pixels: a (B, F) output (a dense layer's) has none
MAP_REDUCTIONS = {"gram1", "gram2", "gram3", "thumbnail8", "edge_map24", "thumbnail4", "orientations4",
                  "thumbnail4_content", "orientations4_content"}


def reduce_tap(module: str, reduction: str, output: torch.Tensor) -> torch.Tensor:
    if reduction in MAP_REDUCTIONS and output.dim() != 4:
        raise ValueError(f"reduction {reduction!r} needs a (batch, channels, height, width) map; {module!r} "
                         f"outputs {tuple(output.shape)}: tap a convolutional layer")
    return REDUCTIONS[reduction](output)


# the input's views that read the image at half resolution (``_half_resolution``)
HALF_RESOLUTION_VIEWS = {"orientations4", *CONTENT_BOX_VIEWS}


def reduce_input(reductions: list[str], image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input taps' reductions; the image at half resolution and its content box are computed once for all
    the views that read them."""
    half = _half_resolution(image) if any(r in HALF_RESOLUTION_VIEWS for r in reductions) else None
    box = _box_of_half(half) if any(r in CONTENT_BOX_VIEWS for r in reductions) else None

    def reduce(reduction: str) -> torch.Tensor:
        if reduction in CONTENT_BOX_VIEWS:
            return CONTENT_BOX_VIEWS[reduction](box)
        if reduction == "orientations4":
            return _orientation_histogram(half, halve=False)
        return reduce_tap(INPUT_TAP, reduction, image)
    return {r: reduce(r) for r in reductions}


# ------------------------------------------------------------------ taps: features in the same forward pass
def penultimate_layer(model: nn.Module) -> str:
    """The module whose output, pooled, is the head's input: the last declared feature layer."""
    layers = getattr(model, "feature_layers", None)
    if layers:
        return layers[-1]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]


class TappedModel(nn.Module):
    """``forward(x) -> (logits, [tap outputs in taps order])``.

    The hooks are registered once and write into storage local to the calling thread and to the call, so
    concurrent forwards on one wrapper (a server's threads) never see each other's activations; a forward of
    the bare model outside the wrapper is not captured. Exports to ONNX (opset 17) with the taps as outputs.
    """

    def __init__(self, model: nn.Module, taps):
        super().__init__()
        self.model = model
        self.taps = [(str(module), str(reduction)) for module, reduction in taps]
        modules = dict(model.named_modules())
        for module, reduction in self.taps:
            if reduction not in REDUCTIONS:
                raise ValueError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
            if module != INPUT_TAP and module not in modules:
                raise ValueError(f"the model has no module {module!r} to tap")
        self.train(model.training)  # the wrapper's mode is the model's (a later .train()/.eval() sets both)
        self._local = threading.local()
        self._handles = [modules[name].register_forward_hook(self._hook(name))
                         for name in dict.fromkeys(m for m, _ in self.taps if m != INPUT_TAP)]

    def _hook(self, name: str):
        def capture(module, inputs, output):
            store = getattr(self._local, "store", None)
            if store is None:  # a forward that is not ours (another caller of the bare model)
                return
            if name in store:
                raise RuntimeError(f"module {name!r} runs more than once per forward: tap another module")
            # reduce now: a later in-place operation (ReLU(inplace=True)) may overwrite the activation
            store[name] = {r: reduce_tap(name, r, output) for m, r in self.taps if m == name}
        return capture

    def forward(self, x: torch.Tensor, tap_input: torch.Tensor | None = None):
        """``tap_input``: what the input taps read instead of ``x`` (the served model's unflipped images, the
        only ones whose features are kept, while ``x`` also holds their mirror images)."""
        image = x if tap_input is None else tap_input
        store = {INPUT_TAP: reduce_input([r for m, r in self.taps if m == INPUT_TAP], image)}
        self._local.store = store
        try:
            logits = self.model(x)
        finally:
            self._local.store = None
        return logits, [store[module][reduction] for module, reduction in self.taps]

    def remove_hooks(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def extract(model: nn.Module, pixels_uint8, taps, device="cpu", batch_size: int = 64
            ) -> tuple[list[np.ndarray], np.ndarray]:
    """(features per tap, logits) of preprocessed uint8 images (N, H, W), in batches, in eval mode."""
    from ..data.loader import to_model_input
    tapped = TappedModel(model, taps)
    outputs, logits = [[] for _ in tapped.taps], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(pixels_uint8), batch_size):
                batch = torch.from_numpy(np.array(pixels_uint8[start:start + batch_size]))
                batch_logits, features = tapped(to_model_input(batch, device))
                logits.append(batch_logits.float().reshape(len(batch)).cpu().numpy())
                for store, value in zip(outputs, features):
                    store.append(value.cpu().numpy().astype(np.float64))
    finally:
        tapped.remove_hooks()
        model.train(was_training)
    return [np.concatenate(o) for o in outputs], np.concatenate(logits).astype(np.float64)
