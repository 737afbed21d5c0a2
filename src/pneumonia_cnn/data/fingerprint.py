"""Content fingerprints of image files: the same X-ray under another name or path is still the same X-ray.

They let a checkpoint remember which images its threshold and calibration were fitted on, so that
``evaluate`` can refuse to report on those images whatever the split is called.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

from ..signals import map_with_signals_deferred


def file_fingerprint(path) -> str:
    """The first 16 hex digits of the file's SHA-256 (64 bits: collisions are negligible at any data size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def file_fingerprints(paths, workers: int = 4) -> list[str]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(map_with_signals_deferred(pool, file_fingerprint, paths, 64))
