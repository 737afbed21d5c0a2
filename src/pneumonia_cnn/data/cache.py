"""Decode each image once into one memory-mapped uint8 array per split, reused across runs.

Layout of a cache folder (one per source, size and preprocessing)::

    manifest.json          entries (path, bytes, mtime, label, patient), skipped files, the data file's name
    images-<token>.u8      N x H x W uint8, row i = entry i

The data file is written first under a fresh name and the manifest last, each atomically, so a killed
build leaves the previous valid cache (or none). On reuse, a file whose size and mtime are unchanged keeps
its row; changed and added files are decoded; removed files are dropped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ImageReadError
from ..fileio import display_path, write_json_atomic, atomic_path
from .dataset import ImageList
from .intensity import standardise_intensity
from .readers import read_image

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("PNEUMONIA_CNN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pneumonia-cnn")
    return Path(root)


@dataclass
class CachedImages:
    """Decoded images of one split: ``images[i]`` is uint8 (H, W); labels, paths and patients align."""
    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    patients: list[str]
    class_names: tuple[str, ...]
    skipped: list[tuple[str, str]]
    source: str = ""
    decoded: int = 0  # how many files this call had to decode (0 = fully reused)

    def __len__(self):
        return len(self.paths)


def preprocess_file(path, size, interpolation="bilinear", intensity="none") -> np.ndarray:
    """The one definition of file -> model-ready uint8 gray; the cache and inference both call it."""
    gray, _ = read_image(path, size, interpolation)
    return standardise_intensity(gray, intensity)


def _file_signature(path: str):
    try:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return None


def cache_key(source: str, size, preprocessing: dict) -> str:
    payload = json.dumps({"source": os.path.abspath(source), "size": list(size), "pre": preprocessing,
                          "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _decode_one(args):
    path, size, interpolation, intensity = args
    try:
        return preprocess_file(path, size, interpolation, intensity), None
    except ImageReadError as error:
        return None, error.reason
    except Exception as error:  # a reader bug must not kill a whole build; report it as a reason
        return None, f"unexpected {type(error).__name__}: {error}"


def build_or_load(images: ImageList, size, interpolation: str = "bilinear", intensity: str = "none",
                  cache_dir=None, workers: int | None = None, progress: bool = False) -> CachedImages:
    size = tuple(int(s) for s in size)
    preprocessing = {"interpolation": interpolation, "intensity": intensity}
    folder = Path(cache_dir or default_cache_dir()) / cache_key(images.source or "|".join(images.paths[:1]),
                                                                size, preprocessing)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    old_rows, old_skipped, old_array = {}, {}, None
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if manifest.get("version") == CACHE_VERSION and tuple(manifest["size"]) == size:
                data_path = folder / manifest["data_file"]
                count = len(manifest["entries"])
                if count and data_path.stat().st_size == count * size[0] * size[1]:
                    old_array = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(count, *size))
                    old_rows = {e["path"]: (i, e["signature"]) for i, e in enumerate(manifest["entries"])}
                old_skipped = {s["path"]: (s["signature"], s["reason"]) for s in manifest.get("skipped", [])}
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: cache manifest unreadable, rebuilding", display_path(manifest_path))
            old_rows, old_skipped, old_array = {}, {}, None

    signatures = [_file_signature(p) for p in images.paths]
    plan = []  # (index, reuse_row or None)
    skipped: list[tuple[str, str]] = []
    to_decode = []
    for index, (path, signature) in enumerate(zip(images.paths, signatures)):
        if signature is None:
            to_decode.append(index)  # the reader produces the reason (missing, loop, permission)
            continue
        if path in old_rows and old_rows[path][1] == signature and old_array is not None:
            plan.append((index, old_rows[path][0]))
        elif path in old_skipped and old_skipped[path][0] == signature:
            skipped.append((path, old_skipped[path][1]))
        else:
            to_decode.append(index)

    decoded: dict[int, np.ndarray] = {}
    if to_decode:
        workers = workers or os.cpu_count() or 1
        jobs = [(images.paths[i], size, interpolation, intensity) for i in to_decode]
        iterator = ThreadPoolExecutor(max_workers=workers).map(_decode_one, jobs, chunksize=16) \
            if workers > 1 else map(_decode_one, jobs)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, total=len(jobs), desc=f"decoding {Path(images.source).name or 'images'}",
                            unit="img", leave=False, disable=None)
        for index, (array, reason) in zip(to_decode, iterator):
            if array is None:
                skipped.append((images.paths[index], reason))
            else:
                decoded[index] = array

    keep = sorted([i for i, _ in plan] + list(decoded))
    reuse = dict(plan)
    if not to_decode and old_array is not None and keep == list(range(len(keep))) and \
            [reuse.get(i) for i in keep] == list(range(len(keep))) and len(keep) == len(old_rows):
        array = old_array  # nothing changed: use the existing file as it is
    else:
        data_name = f"images-{uuid.uuid4().hex[:12]}.u8"
        with atomic_path(folder / data_name) as temporary:
            array_out = np.memmap(temporary, dtype=np.uint8, mode="w+", shape=(max(len(keep), 1), *size))
            for row, index in enumerate(keep):
                array_out[row] = decoded[index] if index in decoded else old_array[reuse[index]]
            array_out.flush()
            del array_out
        entries = [{"path": images.paths[i], "signature": signatures[i], "label": int(images.labels[i]),
                    "patient": images.patients[i]} for i in keep]
        skipped_entries = [{"path": p, "signature": _file_signature(p), "reason": r} for p, r in skipped]
        write_json_atomic(manifest_path, {"version": CACHE_VERSION, "size": list(size), "source": images.source,
                                          "preprocessing": preprocessing, "data_file": data_name,
                                          "entries": entries, "skipped": skipped_entries})
        for stale in folder.glob("images-*.u8"):
            if stale.name != data_name:
                try:
                    stale.unlink()
                except OSError:
                    pass
        array = np.memmap(folder / data_name, dtype=np.uint8, mode="r", shape=(max(len(keep), 1), *size))
    for path, reason in skipped:
        log.warning("skipped %s: %s", display_path(path), reason)
    if skipped:
        log.warning("%s: skipped %d unreadable file(s) of %d", display_path(images.source), len(skipped),
                    len(images.paths))
    return CachedImages(array[:len(keep)], images.labels[keep].copy(), [images.paths[i] for i in keep],
                        [images.patients[i] for i in keep], images.class_names, skipped, images.source,
                        decoded=len(to_decode))
