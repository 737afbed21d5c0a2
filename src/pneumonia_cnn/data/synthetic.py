"""A synthetic chest-X-ray-like data set for the demo and tests: no download, learnable, labelled.

Each image has a bright body outline, two darker lung fields, ribs, a spine and a heart shadow, with
random exposure, position and noise. PNEUMONIA images add patchy opacities inside one or both lungs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import atomic_path


def synthetic_xray(rng: np.random.Generator, size: int = 128, pneumonia: bool = False) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx = 0.5 + rng.normal(0, 0.02)
    body = np.exp(-(((xx - cx) / 0.42) ** 2 + ((yy - 0.55) / 0.55) ** 2) ** 3)
    image = 0.15 + 0.55 * body
    lungs = np.zeros_like(image)
    for side in (-1, 1):
        lx, ly = cx + side * (0.17 + rng.normal(0, 0.01)), 0.47 + rng.normal(0, 0.02)
        lungs += np.exp(-(((xx - lx) / (0.13 + rng.normal(0, 0.01))) ** 2 + ((yy - ly) / 0.27) ** 2) ** 2)
    lungs = np.clip(lungs, 0, 1)
    image -= 0.38 * lungs
    for k in range(7):  # ribs: curved bright bands over the lungs
        y0 = 0.25 + 0.07 * k + rng.normal(0, 0.005)
        curve = y0 + 0.08 * ((xx - cx) / 0.3) ** 2
        image += 0.07 * np.exp(-((yy - curve) / 0.012) ** 2) * lungs
    image += 0.25 * np.exp(-((xx - cx) / 0.035) ** 2) * body  # spine
    heart = np.exp(-(((xx - cx + 0.06) / 0.12) ** 2 + ((yy - 0.62) / 0.12) ** 2) ** 2)
    image += 0.30 * heart
    if pneumonia:
        for _ in range(rng.integers(2, 6)):
            side = rng.choice([-1, 1])
            px = cx + side * (0.17 + rng.normal(0, 0.05))
            py = 0.45 + rng.normal(0, 0.12)
            radius = rng.uniform(0.04, 0.09)
            patch = np.exp(-(((xx - px) ** 2 + (yy - py) ** 2) / radius ** 2))
            image += rng.uniform(0.18, 0.32) * patch * lungs
    image = image * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03)  # exposure
    image += rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_synthetic_dataset(root, per_class: dict | None = None, size: int = 128, seed: int = 0) -> Path:
    """Write ``root/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``; returns ``root``. Existing sets are reused."""
    root = Path(root)
    per_class = per_class or {"train": 160, "val": 40, "test": 50}
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == repr((per_class, size, seed)):
        return root
    rng = np.random.default_rng(seed)
    person = 0
    for split, count in per_class.items():
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                person += 1
                kind = "bacteria" if label else "normal"
                path = folder / (f"person{person}_{kind}_{i}.jpeg" if label else f"IM-{person:04d}-0001.jpeg")
                with atomic_path(path) as temporary:
                    Image.fromarray(synthetic_xray(rng, size, bool(label))).save(temporary, format="JPEG",
                                                                                 quality=92)
    marker.write_text(repr((per_class, size, seed)))
    return root
