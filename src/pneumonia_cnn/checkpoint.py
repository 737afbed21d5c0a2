"""Self-describing checkpoints: everything inference needs, loaded without running any pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with ``torch.save`` to a
temporary file and renamed, and read with ``torch.load(weights_only=True)``, which refuses any pickled
object (a crafted file cannot run code on load).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import builtin
from .errors import CheckpointError
from .fileio import atomic_path, display_path, load_torch_file

FORMAT = "pneumonia-cnn/1"


def save_checkpoint(payload: dict, path) -> Path:
    payload = dict(payload, format=FORMAT)
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return Path(path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint file, a run folder (its best.pt, else last.pt), or ``builtin`` (the packaged model)."""
    if builtin.is_builtin(path):
        if not builtin.available():
            raise CheckpointError("builtin: the packaged model is missing from this installation (reinstall "
                                  "pneumonia-cnn, or give a checkpoint)")
        path = builtin.checkpoint_path()
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
    payload = load_torch_file(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{display_path(path)}: not a pneumonia-cnn checkpoint (no '{FORMAT}' format tag)")
    payload["path"] = str(path)
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
