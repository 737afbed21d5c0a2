"""Self-describing checkpoints: everything inference needs, loaded without running any pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with ``torch.save`` to a
temporary file and renamed, and read with ``torch.load(weights_only=True)``, which refuses any pickled
object (a crafted file cannot run code on load).
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .fileio import atomic_path, display_path

FORMAT = "pneumonia-cnn/1"


def save_checkpoint(payload: dict, path) -> Path:
    payload = dict(payload, format=FORMAT)
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{display_path(path)}: run folder has no best.pt or last.pt")
    if not path.is_file():
        raise CheckpointError(f"{display_path(path)}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
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
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{display_path(path)}: not a pneumonia-cnn checkpoint (no '{FORMAT}' format tag)")
    payload["path"] = str(path)
    return payload


def load_state_dict_file(path) -> dict:
    """Weights for ``create_model(..., weights=path)``: a pneumonia-cnn checkpoint or a bare state dict."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{display_path(path)}: cannot load weights ({str(error).splitlines()[0][:160]})") \
            from None
    if isinstance(payload, dict) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, dict):
        raise CheckpointError(f"{display_path(path)}: not a state dict")
    return payload


def build_model(checkpoint: dict) -> torch.nn.Module:
    from .models import create_model
    spec = checkpoint["model"]
    kwargs = dict(spec.get("kwargs", {}))
    model = create_model(spec["name"], **kwargs)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"{display_path(checkpoint.get('path', '?'))}: weights do not fit model "
                              f"{spec['name']} ({str(error).splitlines()[0][:200]})") from None
    model.eval()
    return model


def load_model(path) -> torch.nn.Module:
    """The trained ``torch.nn.Module`` from a checkpoint (or run folder), in eval mode, on the CPU."""
    return build_model(load_checkpoint(path))
