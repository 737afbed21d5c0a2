"""What every reader shares: the decoded-image description, the pixel limit, and scaling to uint8.

Both ``readers`` (JPEG, PNG, ...) and ``dicom`` import from here, so neither imports the other's internals.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Refuse decompression bombs ourselves (PIL only warns below 2x its limit); 50 MP is far above any X-ray.
MAX_PIXELS = 50_000_000


@dataclass
class ImageMeta:
    """What a file says about itself, for the intended-use checks (DICOM tags when present)."""
    source_format: str
    original_size: tuple[int, int]  # (height, width)
    tags: dict = field(default_factory=dict)
    saturation: float = 0.0  # mean colour saturation (0 for gray X-rays, high for photographs)


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale any integer or float image to 0..255 without clipping its content."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        array = np.nan_to_num(array)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)
