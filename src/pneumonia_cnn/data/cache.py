"""Decode each image once into one memory-mapped uint8 array per split, reused across runs.

Layout of a cache folder (one per source, size and preprocessing)::

    manifest.json          entries (path, bytes, mtime, ctime, label, patient, and what the file says about itself
                           for the intended-use checks: colour, DICOM tags), skipped files, the data file's name
    images-<token>.u8      N x H x W uint8, row i = entry i

The data file is written first under a fresh name and the manifest last, each atomically, so a killed
build leaves the previous valid cache (or none). On reuse, a file whose size, mtime and inode change time are
unchanged keeps its row; changed and added files are decoded; removed files are dropped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError, ImageReadError
from ..fileio import atomic_path, display_path, write_json_atomic
from ..signals import map_with_signals_deferred
from .age import patient_age_years
from .dataset import ImageList
from .image import ImageMeta
from .intensity import standardise_intensity
from .readers import read_image

log = logging.getLogger(__name__)
# 2: entries keep the file's colour and DICOM tags (the intended-use checks); 3: and the size of a file smaller
# than the cached image (the size check: a thumbnail); 4: 16-bit colour PNGs read at full depth, EXIF orientation
# applied (an entry's file is reused while its size and times hold, so the reader's changes need a new version);
# 5: 16-bit colour and big-endian TIFFs at full depth, DICOM rescales that give no image skipped; 6: a DICOM's SOP
# class (another modality's image under Modality CR), and a file's frames or pages when more than one
CACHE_VERSION = 6


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
    checked: list = field(default_factory=list)  # per image: what the intended-use checks read, or None

    def __len__(self):
        return len(self.paths)

    def metas(self) -> list[ImageMeta | None]:
        """Per image, what ``predict`` would know about its file (colour, DICOM tags): the same flags."""
        return [None if c is None else ImageMeta(c["format"], tuple(c["size"]), c.get("tags", {}),
                                                 c.get("saturation", 0.0), c.get("frames", 1)) for c in self.checked] \
            if self.checked else [None] * len(self.paths)


def preprocess_file(path, size, interpolation="bilinear", intensity="none") -> np.ndarray:
    """The one definition of file -> model-ready uint8 gray: the cache builds on it, and inference reads a file
    through it (``Preprocessing.read_path``; an upload's bytes take the same reader and standardisation)."""
    return preprocess_file_and_meta(path, size, interpolation, intensity)[0]


def preprocess_file_and_meta(path, size, interpolation="bilinear", intensity="none") -> tuple[np.ndarray, ImageMeta]:
    gray, meta = read_image(path, size, interpolation)
    return standardise_intensity(gray, intensity), meta


def checked_fields(meta: ImageMeta, size) -> dict | None:
    """What the intended-use checks read from a file (its colour; its DICOM modality, SOP class, body part, view
    and the patient's age, never the birth date or ID; its size, when smaller than the cached image's ``size``;
    its frames or pages, when more than one), for the manifest; None when the file says nothing they read."""
    # 64 characters: more than any real value, and a malformed file cannot bloat the manifest
    tags = {key: str(meta.tags[key])[:64] for key in ("Modality", "SOPClassUID", "BodyPartExamined", "ViewPosition")
            if meta.tags.get(key)}
    age = patient_age_years(meta.tags)
    if age is not None:
        tags["PatientAge"] = f"{age!r}Y"  # the float's repr reads back exactly: the same decision at a range's edge
    smaller = any(int(have) < int(cached) for have, cached in zip(meta.original_size, size))
    if not tags and not meta.saturation and not smaller and meta.frames <= 1:
        return None
    return {"format": meta.source_format, "size": list(meta.original_size), "tags": tags,
            "saturation": float(meta.saturation), **({"frames": int(meta.frames)} if meta.frames > 1 else {})}


def _file_signature(path: str):
    """Size, modification time and inode change time: ``cp -p``, ``rsync -a`` or ``touch -d`` put new content
    under an old size and mtime (a cache kept the old pixels), but the change time only the system sets."""
    try:
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    except OSError:
        return None


def cache_key(source: str, size, preprocessing: dict) -> str:
    payload = json.dumps({"source": os.path.abspath(source), "size": list(size), "pre": preprocessing,
                          "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _decode_one(args):
    path, size, interpolation, intensity = args
    try:
        gray, meta = preprocess_file_and_meta(path, size, interpolation, intensity)
        return gray, None, checked_fields(meta, size)
    except ImageReadError as error:
        return None, error.reason, None
    except Exception as error:  # a reader bug must not kill a whole build; report it as a reason
        return None, f"unexpected {type(error).__name__}: {error}", None


@dataclass
class _PreviousBuild:
    """What an earlier build left: row and signature per path, skipped files with their reasons, the rows,
    the checked fields per path."""
    rows: dict
    skipped: dict
    array: np.ndarray | None = None
    checked: dict = field(default_factory=dict)


def _read_previous_build(folder: Path, size) -> _PreviousBuild:
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return _PreviousBuild({}, {})
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("version") != CACHE_VERSION or tuple(manifest["size"]) != size:
            return _PreviousBuild({}, {})
        previous = _PreviousBuild({}, {s["path"]: (s["signature"], s["reason"]) for s in manifest.get("skipped", [])})
        data_path = folder / manifest["data_file"]
        count = len(manifest["entries"])
        if count and data_path.stat().st_size == count * size[0] * size[1]:
            previous.array = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(count, *size))
            previous.rows = {e["path"]: (i, e["signature"]) for i, e in enumerate(manifest["entries"])}
            previous.checked = {e["path"]: e.get("checked") for e in manifest["entries"]}
            if any(c is not None and not {"format", "size"} <= set(c) for c in previous.checked.values()):
                raise KeyError("checked")
        return previous
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # AttributeError: JSON, not an object
        log.warning("%s: cache manifest unreadable, rebuilding", display_path(manifest_path))
        return _PreviousBuild({}, {})


def _plan_reuse(paths, signatures, previous: _PreviousBuild):
    """({index: previous row} for unchanged files, [(path, reason)] still unreadable, [indices to decode])."""
    reuse, skipped, to_decode = {}, [], []
    for index, (path, signature) in enumerate(zip(paths, signatures)):
        if signature is None:
            to_decode.append(index)  # the reader produces the reason (missing, loop, permission)
        elif path in previous.rows and previous.rows[path][1] == signature and previous.array is not None:
            reuse[index] = previous.rows[path][0]
        elif path in previous.skipped and previous.skipped[path][0] == signature:
            skipped.append((path, previous.skipped[path][1]))
        else:
            to_decode.append(index)
    return reuse, skipped, to_decode


def _decode_many(paths, size, interpolation, intensity, workers, progress, description):
    """(array or None, reason or None) per path, in order, decoded in a thread pool."""
    workers = workers or os.cpu_count() or 1
    jobs = [(path, size, interpolation, intensity) for path in paths]
    results = _decode_in_pool(jobs, workers) if workers > 1 else map(_decode_one, jobs)
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=len(jobs), desc=f"decoding {description}", unit="img", leave=False,
                       disable=None)
    return results


def _decode_in_pool(jobs, workers: int):
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from map_with_signals_deferred(pool, _decode_one, jobs, 64)


def _write_build(folder: Path, size, rows, images: ImageList, signatures, keep, skipped, preprocessing,
                 checked: dict) -> np.ndarray:
    """The data file (``rows`` yields each kept image) under a fresh name, then the manifest; stale data
    files go. Returns the new data file, mapped read-only."""
    data_name = f"images-{uuid.uuid4().hex[:12]}.u8"
    shape = (max(len(keep), 1), *size)
    with atomic_path(folder / data_name) as temporary:
        array_out = np.memmap(temporary, dtype=np.uint8, mode="w+", shape=shape)
        for row, image in enumerate(rows):
            array_out[row] = image
        array_out.flush()
        del array_out
    entries = [{"path": images.paths[i], "signature": signatures[i], "label": int(images.labels[i]),
                "patient": images.patients[i], **({"checked": checked[i]} if checked.get(i) else {})} for i in keep]
    skipped_entries = [{"path": p, "signature": _file_signature(p), "reason": r} for p, r in skipped]
    write_json_atomic(folder / "manifest.json", {
        "version": CACHE_VERSION, "size": list(size), "source": images.source, "preprocessing": preprocessing,
        "data_file": data_name, "entries": entries, "skipped": skipped_entries})
    for stale in folder.glob("images-*.u8"):
        if stale.name != data_name:
            try:
                stale.unlink()
            except OSError:
                pass
    return np.memmap(folder / data_name, dtype=np.uint8, mode="r", shape=shape)


def build_or_load(images: ImageList, size, interpolation: str = "bilinear", intensity: str = "none",
                  cache_dir=None, workers: int | None = None, progress: bool = False) -> CachedImages:
    size = tuple(int(s) for s in size)
    preprocessing = {"interpolation": interpolation, "intensity": intensity}
    folder = Path(cache_dir or default_cache_dir()) / cache_key(images.source or "|".join(images.paths[:1]),
                                                                size, preprocessing)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where the cache folder should be, no permission: said with the option
        raise DatasetError(f"{display_path(folder.parent)}: cannot use it as --cache-dir "
                           f"({error.strerror or error})") from None
    previous = _read_previous_build(folder, size)
    signatures = [_file_signature(p) for p in images.paths]
    reuse, skipped, to_decode = _plan_reuse(images.paths, signatures, previous)
    decoded: dict[int, np.ndarray] = {}
    checked = {index: previous.checked.get(images.paths[index]) for index in reuse}
    results = _decode_many([images.paths[i] for i in to_decode], size, interpolation, intensity, workers,
                           progress, Path(images.source).name or "images")
    for index, (array, reason, fields) in zip(to_decode, results):
        if array is None:
            skipped.append((images.paths[index], reason))
        else:
            decoded[index], checked[index] = array, fields
    keep = sorted([*reuse, *decoded])
    if images.paths and not keep:  # every caller needs at least one image; say why there is none
        raise none_readable(images.source, len(images.paths), *skipped[0])
    unchanged = not to_decode and previous.array is not None and len(keep) == len(previous.rows) and \
        keep == list(range(len(keep))) and [reuse[i] for i in keep] == keep
    if unchanged:
        array = previous.array  # nothing changed: use the existing file as it is
    else:
        rows = (decoded[i] if i in decoded else previous.array[reuse[i]] for i in keep)
        array = _write_build(folder, size, rows, images, signatures, keep, skipped, preprocessing, checked)
    for path, reason in skipped:
        log.warning("skipped %s: %s", display_path(path), reason)
    if skipped:
        log.warning("%s: skipped %d unreadable file(s) of %d", display_path(images.source), len(skipped),
                    len(images.paths))
    return CachedImages(array[:len(keep)], images.labels[keep].copy(), [images.paths[i] for i in keep],
                        [images.patients[i] for i in keep], images.class_names, skipped, images.source,
                        decoded=len(to_decode), checked=[checked.get(i) for i in keep])


def none_readable(source, count: int, first, reason: str) -> DatasetError:
    """The one error for a set of images none of which could be read, naming the first and why."""
    return DatasetError(f"{display_path(source or first)}: none of its {count} image(s) could be read "
                        f"(first: {display_path(first)}: {reason})")
