"""Reading and decoding files in a thread pool, apart from scoring: per-file errors, order kept."""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import ImageReadError
from ..signals import map_with_signals_deferred
from .bundle import Preprocessing


@dataclass
class DecodedFile:
    path: str
    pixels: np.ndarray | None = None
    meta: object = None
    error: str | None = None


def decode_files(paths, preprocessing: Preprocessing, chunk: int = 32, workers: int | None = None
                 ) -> Iterator[list[DecodedFile]]:
    """Chunks of decoded files in the given order; an unreadable file carries its one-line reason."""
    paths = [str(p) for p in paths]

    size = tuple(preprocessing.size)

    def read(path: str) -> DecodedFile:
        try:
            pixels, meta = preprocessing.read_path(path)
        except ImageReadError as error:
            return DecodedFile(path, error=error.reason)
        if getattr(pixels, "shape", None) != size or getattr(pixels, "dtype", None) != np.uint8:
            # one image of the model's size, or this file's reason: stacked with the others, it would end the run
            return DecodedFile(path, error=f"decoded to an array of shape {getattr(pixels, 'shape', None)}, not "
                                           f"one {size[1]}x{size[0]} gray image")
        return DecodedFile(path, pixels, meta)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), chunk):
            yield list(map_with_signals_deferred(pool, read, paths[start:start + chunk], chunk))
