"""The model that ships with the package: the `best` recipe trained on the shared pediatric X-rays, with its
model card (``card.json``: training population, license and attribution, figures with intervals, the file's
SHA-256 and the command that retrains it) and a handful of example X-rays. Every command that takes a
checkpoint accepts ``builtin``; ``predict``, ``serve``, ``explain``, ``evaluate``, ``export`` and ``info`` use it
when none is given. Nothing is downloaded: it is package data."""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

NAME = "builtin"


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def checkpoint_path() -> Path:
    return _folder() / "best.pt"


def available() -> bool:
    return checkpoint_path().is_file()


def card() -> dict:
    path = _folder() / "card.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def example_paths() -> list[Path]:
    return sorted(p for p in (_folder() / "examples").glob("*.jpeg"))


def sha256(path: Path | None = None) -> str:
    return hashlib.sha256((path or checkpoint_path()).read_bytes()).hexdigest()


def is_builtin(name) -> bool:
    return isinstance(name, str) and name == NAME
