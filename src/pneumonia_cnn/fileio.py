"""Atomic file writes (a killed process leaves either the old file or the new one, never half of one) and
safe reads of PyTorch files (no pickled code runs)."""
from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value):
    import numpy as np
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def display_path(path) -> str:
    """A printable form of any path, also one whose name is not valid UTF-8."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def load_torch_file(path, map_location="cpu"):
    """``torch.load(weights_only=True)`` with one-line errors: a file that holds pickled objects is refused
    (loading it could run code), an unreadable one is named with the reason."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{display_path(path)}: not a readable checkpoint (not a PyTorch file)") from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f"it references {found.group(1)}" if found else "it holds pickled objects"
        raise CheckpointError(f"{display_path(path)}: refused to load: {what}; a checkpoint may hold only weights "
                              f"and plain data (loading it could run code)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{display_path(path)}: not a readable checkpoint ({first[:160]})") from None
