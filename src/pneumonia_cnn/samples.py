"""``show-samples``: a grid of NORMAL vs PNEUMONIA images from a split."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.cache import none_readable
from .data.dataset import load_split
from .data.readers import read_image
from .errors import ImageReadError
from .plots import sample_grid


def show_samples(data, split: str = "train", out="samples.png", per_class: int = 6, seed: int = 0) -> Path:
    images = load_split(data, split)
    rng = np.random.default_rng(seed)
    grid, titles, failures = {}, [], []
    for index, name in enumerate(images.class_names):
        candidates = [path for path, label in zip(images.paths, images.labels) if label == index]
        chosen, row_titles = [], []
        for path in rng.permutation(candidates):
            try:
                chosen.append(read_image(path)[0])
                row_titles.append(f"{name}\n{Path(path).name[:24]}")
            except ImageReadError as error:
                failures.append((path, error.reason))
                continue
            if len(chosen) == per_class:
                break
        grid[name] = chosen
        titles.append(row_titles)
    if not any(grid.values()):
        raise none_readable(images.source, len(images.paths), *failures[0])
    sample_grid(grid, out, titles)
    return Path(out)
