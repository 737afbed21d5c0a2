"""Augmentation of whole batches as tensors, on the training device.

Geometry follows Keras ``ImageDataGenerator.apply_transform`` exactly: for output pixel (row, col) the
input is sampled at ``M @ (row, col, 1)`` with M = rotation · shift · shear · zoom about Keras' centre
(size/2 + 0.5), bilinear (order 1), edges filled with the nearest pixel; the horizontal flip comes last.
Keras draws the shear *angle in degrees* from ±shear_range, so the tutorial's ``shear_range=0.2`` is a
shear of at most 0.2° – it barely changes an image. ``zoom_range=0.2`` draws zx and zy independently
from [0.8, 1.2]; zx > 1 shows more of the image (zooms out), as in Keras.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    shear: float = 0.0          # degrees, Keras shear_range
    zoom: float = 0.0           # Keras zoom_range: zx, zy ~ U[1 - zoom, 1 + zoom] independently
    scale: float = 0.0          # random resized crop: both axes scaled by one s ~ U[1 - scale, 1 + scale]
    flip: bool = False          # horizontal flip with probability 0.5
    rotation: float = 0.0       # degrees, U[-rotation, rotation]
    translate: float = 0.0      # fraction of height/width, U[-t, t]
    brightness: float = 0.0     # add U[-b, b] (images in [0, 1])
    contrast: float = 0.0       # scale about the image mean by U[1 - c, 1 + c]
    gamma: float = 0.0          # x ** exp(U[-g, g])
    blur_sigma: float = 0.0     # Gaussian blur with sigma ~ U[0, blur_sigma] ...
    blur_p: float = 0.0         # ... applied with this probability
    noise: float = 0.0          # additive Gaussian noise, std ~ U[0, noise]
    jpeg_quality: int = 0       # re-compress as JPEG at quality ~ U[jpeg_quality, 95] (CPU, per image) ...
    jpeg_p: float = 0.0         # ... with this probability

    @classmethod
    def from_dict(cls, values: dict | None) -> AugmentConfig:
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown augmentation option(s): {', '.join(sorted(unknown))}")
        for name, value in values.items():
            _check_option(name, value)
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def geometric(self) -> bool:
        return bool(self.shear or self.zoom or self.scale or self.flip or self.rotation or self.translate)


AUGMENT_RANGES = {  # (low, high) of each number: outside them an option means nothing, or breaks the image
    "shear": (0, 90), "zoom": (0, 1), "scale": (0, 1), "rotation": (0, 180), "translate": (0, 1),
    "brightness": (0, 1), "contrast": (0, 1), "gamma": (0, 5), "blur_sigma": (0, 50), "blur_p": (0, 1),
    "noise": (0, 1), "jpeg_quality": (0, 95), "jpeg_p": (0, 1)}


def _check_option(name: str, value) -> None:
    if name == "flip":
        if not isinstance(value, bool):
            raise ValueError(f"flip: expected true or false, got {value!r}")
        return
    low, high = AUGMENT_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}: expected a number from {low} to {high}, got {value!r}")
    if name == "jpeg_quality" and value != int(value):
        raise ValueError(f"jpeg_quality: expected a whole number, got {value!r}")


def keras_transform_matrices(batch: int, height: int, width: int, config: AugmentConfig,
                             generator: torch.Generator) -> torch.Tensor:
    """Per-sample 3x3 matrices mapping output (row, col, 1) to input (row, col, 1), Keras' composition."""
    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)

    zeros, ones = torch.zeros(batch, dtype=torch.float64), torch.ones(batch, dtype=torch.float64)
    theta = torch.deg2rad(uniform(-config.rotation, config.rotation)) if config.rotation else zeros
    tx = uniform(-config.translate, config.translate) * height if config.translate else zeros
    ty = uniform(-config.translate, config.translate) * width if config.translate else zeros
    shear = torch.deg2rad(uniform(-config.shear, config.shear)) if config.shear else zeros
    zx = uniform(1 - config.zoom, 1 + config.zoom) if config.zoom else ones
    zy = uniform(1 - config.zoom, 1 + config.zoom) if config.zoom else ones
    if config.scale:  # isotropic: a tighter or wider collimation keeps the aspect ratio
        s = uniform(1 - config.scale, 1 + config.scale)
        zx, zy = zx * s, zy * s
    flip = (torch.rand(batch, generator=generator) < 0.5) if config.flip else torch.zeros(batch, dtype=torch.bool)
    return compose_keras_matrix(theta, tx, ty, shear, zx, zy, flip, height, width)


def compose_keras_matrix(theta, tx, ty, shear, zx, zy, flip, height, width) -> torch.Tensor:
    batch = theta.shape[0]

    zero, one = torch.zeros_like(theta), torch.ones_like(theta)

    def matrix(a, b, c, d, e, f):  # one stack, not seven index writes: a batch's matrices cost ~1 ms less
        return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=1).view(batch, 3, 3).to(torch.float64)

    rotation = matrix(torch.cos(theta), -torch.sin(theta), zero, torch.sin(theta), torch.cos(theta), zero)
    shift = matrix(one, zero, tx, zero, one, ty)
    shearing = matrix(one, -torch.sin(shear), zero, zero, torch.cos(shear), zero)
    zooming = matrix(zx, zero, zero, zero, zy, zero)
    transform = rotation @ shift @ shearing @ zooming
    o_row, o_col = height / 2 + 0.5, width / 2 + 0.5
    to_centre = matrix(one, zero, one * o_row, zero, one, one * o_col)
    from_centre = matrix(one, zero, -one * o_row, zero, one, -one * o_col)
    transform = to_centre @ transform @ from_centre
    flipping = matrix(one, zero, zero, zero, torch.where(flip, -one, one),
                      torch.where(flip, one * (width - 1), zero))
    return transform @ flipping


def warp(images: torch.Tensor, matrices: torch.Tensor, size=None) -> torch.Tensor:
    """Sample ``images`` (B, C, H, W) at ``matrices`` @ (row, col, 1), bilinear, nearest-edge fill; with
    ``size`` (h, w) the output covers the same field of view at that resolution (warp and resize in one pass)."""
    batch, _, height, width = images.shape
    # pixel p <-> normalised u = 2p/(n-1) - 1 (align_corners=True); grid_sample wants (x=col, y=row)
    scale = torch.diag(torch.tensor([(height - 1) / 2, (width - 1) / 2, 1.0], dtype=torch.float64))
    shift = torch.tensor([[1.0, 0, 1], [0, 1.0, 1], [0, 0, 1]], dtype=torch.float64)
    to_pixels = scale @ shift  # u -> p
    to_normalised = torch.linalg.inv(to_pixels)
    normalised = to_normalised @ matrices @ to_pixels  # (row, col) order
    swap = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    theta = to_device((swap @ normalised @ swap)[:, :2, :].to(torch.float32), images.device)
    grid = affine_grid(theta, size or images.shape[2:])
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def affine_grid(theta: torch.Tensor, size) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, *size), align_corners=True)``, the same values computed in the same order,
    ``(x * a + y * b) + c``: torch's CPU version is a batched product with an inner dimension of 3, which
    the matrix library runs several times slower than two broadcast sums (README, "Speed")."""
    height, width = (int(v) for v in size)
    xs = _base_coordinates(width, theta).view(1, 1, width, 1)
    ys = _base_coordinates(height, theta).view(1, height, 1, 1)
    batch = theta.shape[0]
    column, row, offset = (theta[:, :, index].reshape(batch, 1, 1, 2) for index in range(3))
    grid = xs * column + ys * row  # (B, 1, W, 2) + (B, H, 1, 2): one full-size pass
    return grid.add_(offset)


def _base_coordinates(steps: int, like: torch.Tensor) -> torch.Tensor:
    """Torch's base grid: -1 to 1 over ``steps`` points, and 0 for a single point."""
    if steps == 1:
        return torch.zeros(1, device=like.device, dtype=like.dtype)
    return torch.linspace(-1, 1, steps, device=like.device, dtype=like.dtype)


def to_device(values: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """Per-batch random parameters (drawn on the host, from the run's generator) to the device; through
    pinned memory on CUDA, so that the copy does not wait for the device to finish the previous step."""
    values = values.to(dtype) if dtype is not None else values
    if torch.device(device).type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    batch, channels, height, width = images.shape
    radius = max(1, int(math.ceil(3 * float(sigmas.max()))))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe = to_device(sigmas.clamp(min=1e-3), images.device, images.dtype)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    kernels = torch.where(to_device(sigmas, images.device)[:, None] > 0, kernels,
                          (offsets == 0).to(images.dtype)[None, :].expand_as(kernels))
    grouped = images.reshape(1, batch * channels, height, width)
    k = kernels.repeat_interleave(channels, dim=0)
    padded = F.pad(grouped, (radius, radius, 0, 0), mode="replicate")
    grouped = F.conv2d(padded, k[:, None, None, :], groups=batch * channels)
    padded = F.pad(grouped, (0, 0, radius, radius), mode="replicate")
    grouped = F.conv2d(padded, k[:, None, :, None], groups=batch * channels)
    return grouped.reshape(batch, channels, height, width)


def jpeg_recompress(gray_uint8: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(gray_uint8, mode="L").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("L"), dtype=np.uint8)


def jpeg_batch(batch_uint8: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """JPEG re-compression runs on the CPU, in the loader thread, before the batch goes to the device."""
    if not (config.jpeg_quality and config.jpeg_p):
        return batch_uint8
    out = batch_uint8.copy()
    for i in range(len(out)):
        if rng.random() < config.jpeg_p:
            out[i] = jpeg_recompress(out[i], rng.integers(config.jpeg_quality, 96))
    return out


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    """``images`` float (B, 1, H, W) in [0, 1] on any device -> augmented batch in the same range, of the same
    shape or, with ``size``, at that resolution (progressive resizing trains on smaller views of the cache)."""
    batch, _, height, width = images.shape
    size = None if size is None or tuple(size) == (height, width) else tuple(size)
    if config.geometric:
        images = warp(images, keras_transform_matrices(batch, height, width, config, generator), size)
    elif size is not None:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)

    def uniform(low, high):
        return to_device(low + (high - low) * torch.rand(batch, generator=generator), images.device, images.dtype)

    view = (batch, 1, 1, 1)
    if config.gamma:
        images = images.clamp(0, 1) ** torch.exp(uniform(-config.gamma, config.gamma)).view(view)
    if config.contrast:
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * uniform(1 - config.contrast, 1 + config.contrast).view(view) + mean
    if config.brightness:
        images = images + uniform(-config.brightness, config.brightness).view(view)
    if config.blur_sigma and config.blur_p:
        apply = torch.rand(batch, generator=generator) < config.blur_p
        sigmas = torch.where(apply, config.blur_sigma * torch.rand(batch, generator=generator), torch.zeros(batch))
        if bool(apply.any()):
            chosen = apply.nonzero().squeeze(1).to(images.device)
            # only the chosen images: the others would be convolved with a unit impulse, which changes nothing
            images = images.index_copy(0, chosen, _gaussian_blur(images.index_select(0, chosen),
                                                                 sigmas[apply]))
    if config.noise:
        std = uniform(0, config.noise).view(view)
        if images.device.type == "cpu":
            noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        else:  # drawn where it is used: a CPU draw plus a copy would cost more than the whole GPU step
            seed = int(torch.randint(2**62, (1,), generator=generator))
            device_generator = torch.Generator(device=images.device).manual_seed(seed)
            noise = torch.randn(images.shape, generator=device_generator, device=images.device, dtype=images.dtype)
        images = images + noise * std
    if config.gamma or config.contrast or config.brightness or config.noise:
        images = images.clamp(0, 1)
    return images
