"""What every reader shares: the decoded-image description, the pixel limit, and scaling to uint8.

Both ``readers`` (JPEG, PNG, ...) and ``dicom`` import from here, so neither imports the other's internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Refuse decompression bombs ourselves (PIL only warns below 2x its limit); 50 MP is far above any X-ray.
MAX_PIXELS = 50_000_000
MIN_SIDE = 2  # a 1-pixel-wide image holds no X-ray; refused rather than scored


@dataclass
class ImageMeta:
    """What a file says about itself, for the intended-use checks (DICOM tags when present)."""
    source_format: str
    original_size: tuple[int, int]  # (height, width)
    tags: dict = field(default_factory=dict)
    saturation: float = 0.0  # mean colour saturation (0 for gray X-rays, high for photographs)
    frames: int = 1  # frames (DICOM) or pages (TIFF, GIF) in the file: only the first is scored


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale any integer or float image to 0..255 by its finite minimum and maximum, without clipping its
    content; NaN and -inf become the minimum, +inf the maximum (one infinite pixel must not blank the image).
    Done in blocks of rows, in float64: a 49-megapixel float image would otherwise hold several full-size
    float64 copies (about 400 MB each) at once."""
    if array.dtype == np.uint8:
        return array
    if array.size == 0 or array.ndim == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    blocks = _float_row_blocks(array)
    low, high = np.inf, -np.inf
    for _, block in blocks:
        finite = block[np.isfinite(block)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    out = np.zeros(array.shape, dtype=np.uint8)
    if not high > low:
        return out
    with np.errstate(over="ignore"):
        scale = 255.0 / (high - low)
    if not 0 < scale < np.inf:  # a range past float64's (1e308 wide) or under it (subnormal, 1e-317)
        return _scaled_by_halves(blocks, low, high, out)
    for rows, block in blocks:
        np.nan_to_num(block, copy=False, nan=low, posinf=high, neginf=low)
        block -= low
        block *= scale
        out[rows] = np.round(block, out=block)
    return out


def _scaled_by_halves(blocks, low: float, high: float, out: np.ndarray) -> np.ndarray:
    """``scale_to_uint8`` for ranges whose width or its reciprocal overflows: values and range halved (a
    width of 2e308 then fits) and divided by the width (a subnormal width's reciprocal would not fit); a
    range of one subnormal step, whose halves are equal, gives two levels."""
    span = high / 2 - low / 2
    for rows, block in blocks:
        np.nan_to_num(block, copy=False, nan=low, posinf=high, neginf=low)
        if not span > 0:
            out[rows] = np.where(block > low, 255, 0)
            continue
        block *= 0.5
        block -= low / 2
        block /= span
        block *= 255.0
        out[rows] = np.round(block, out=block)
    return out


class _float_row_blocks:
    """Iterable, more than once, over (row slice, that block of rows as a fresh float64 array)."""
    VALUES = 1 << 20  # 8 MB of float64 per block

    def __init__(self, array: np.ndarray):
        self.array, self.step = array, max(1, self.VALUES // max(1, array[0].size))

    def __iter__(self):
        for start in range(0, len(self.array), self.step):
            rows = slice(start, start + self.step)
            yield rows, self.array[rows].astype(np.float64)
