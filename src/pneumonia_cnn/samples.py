"""``show-samples``: a grid of NORMAL vs PNEUMONIA images from a split."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .data.cache import none_readable
from .data.dataset import load_split
from .data.readers import read_image
from .errors import ImageReadError, PneumoniaCNNError
from .fileio import display_path
from .plots import sample_grid

log = logging.getLogger(__name__)
# matplotlib's own formats, less its headerless pixel dumps (raw, rgba), which no viewer opens as a picture
NOT_PICTURES = ("raw", "rgba")


def picture_formats() -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    return sorted(kind for kind in FigureCanvasAgg.get_supported_filetypes() if kind not in NOT_PICTURES)


def check_picture_path(out) -> None:
    """Before the images are read: the suffix of ``out`` names the picture's format, and matplotlib's own error
    for one it cannot write ("Format 'txt' is not supported") came only after the drawing, without the file."""
    suffix = Path(out).suffix.lower().lstrip(".")
    formats = picture_formats()
    if suffix not in formats:
        reason = f".{suffix} is not a picture format show-samples writes" if suffix else "no suffix to name its format"
        raise PneumoniaCNNError(f"{out}: {reason}; use one of {', '.join('.' + kind for kind in formats)}")


def show_samples(data, split: str = "train", out="samples.png", per_class: int = 6, seed: int = 0) -> Path:
    check_picture_path(out)
    images = load_split(data, split)
    rng = np.random.default_rng(seed)
    grid, titles, failures = {}, [], []
    for index, name in enumerate(images.class_names):
        candidates = [path for path, label in zip(images.paths, images.labels) if label == index]
        chosen, row_titles = [], []
        for path in rng.permutation(candidates):
            try:
                chosen.append(read_image(path)[0])
                shown = Path(path).name  # cut with a mark: "person62_bacteria_299.jp" read as a whole name
                row_titles.append(f"{name}\n{shown if len(shown) <= 24 else shown[:23] + '…'}")
            except ImageReadError as error:  # said, as training says it: it had been left out without a word
                failures.append((path, error.reason))
                log.warning("skipped %s: %s", display_path(path), error.reason)
                continue
            if len(chosen) == per_class:
                break
        grid[name] = chosen
        titles.append(row_titles)
        if len(chosen) < per_class:  # none at all too: its row was empty without a word
            log.warning("%s: %d readable %s image(s), fewer than --per-class %d", display_path(images.source),
                        len(chosen), name, per_class)
    if not any(grid.values()):
        raise none_readable(images.source, len(images.paths), *failures[0])
    sample_grid(grid, out, titles)
    return Path(out)
