"""Intensity standardisation applied to each image once (in the cache) and identically at inference.

X-rays from another batch or site differ in exposure and contrast; mapping every image to a standard
intensity distribution removes much of that shift before the model sees it.
"""
from __future__ import annotations

import numpy as np

INTENSITY_METHODS = ("none", "equalize", "clahe", "window")
# what each method computes, exactly enough to reproduce it elsewhere (an exported model's metadata says it):
# Pillow's ImageOps.equalize, for one, moves the built-in model's probabilities by up to 0.04
INTENSITY_RECIPES = {
    "none": "the uint8 gray image as it is",
    "equalize": "scikit-image exposure.equalize_hist(gray_uint8, nbins=256), then round(x * 255) clipped to uint8",
    "clahe": "scikit-image exposure.equalize_adapthist(gray_uint8, clip_limit=0.01, nbins=256), then round(x * 255) "
             "clipped to uint8",
    # the factor computed first, in float64, as the code does: (gray - low) * 255 / (high - low) moved 11,001 pixels
    "window": "numpy percentiles 1 and 99 (low, high); round((gray - low) * (255 / (high - low))) in float64, "
              "clipped to uint8 (unchanged when high <= low)",
}


def standardise_intensity(gray: np.ndarray, method: str = "none") -> np.ndarray:
    """``gray`` uint8 (H, W) -> uint8 (H, W)."""
    if method == "none":
        return gray
    if method == "window":
        low, high = np.percentile(gray, (1.0, 99.0))
        if high <= low:
            return gray
        scaled = (gray.astype(np.float64) - low) * (255.0 / (high - low))  # float64 under NumPy 1 too
        return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    from skimage import exposure
    if method == "equalize":
        out = exposure.equalize_hist(gray, nbins=256)
    elif method == "clahe":
        out = exposure.equalize_adapthist(gray, clip_limit=0.01, nbins=256)
    else:
        raise ValueError(f"unknown intensity method {method!r}; choose from {', '.join(INTENSITY_METHODS)}")
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
