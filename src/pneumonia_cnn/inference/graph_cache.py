"""Cached graphs kept with a SHA-256 of their bytes: the float32 ONNX export (``engines.cached_graph``) and the
int8 build (``quantize.export_int8``, read by ``quantized.load_cached``).

ONNX Runtime and OpenVINO load a graph with a flipped bit in a weight as they load any other: one flipped exponent
bit in a cached graph's head bias scored every image 0.0 NORMAL with exit 0. The check is worth its cost: hashing
the graph (a few MB) is a small part of what building a session from the same bytes takes.

The checksum lies beside the graph, in ``NAME.sha256`` (the line ``sha256sum`` writes: ``sha256sum -c`` checks it
by hand). Both are written atomically, the checksum first, and a reader reads the graph before its checksum: an
export of the same weights by the same code gives the same bytes, so two processes filling the cache at once
never show a reader a graph without its checksum (it sees the graph missing, or both). A crash between the two
writes, or writers of different bytes, can leave a pair that does not match: a float graph is then exported
again, an int8 one refused with the command that builds it again.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..fileio import atomic_path, display_path, special_file, write_text_atomic

SUFFIX = ".sha256"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def checksum_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def store(path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` and its checksum beside it (the checksum first: see the module's note).
    An ``OSError`` (an ``OutputError`` naming the file) when either cannot be written."""
    path = Path(path)
    write_text_atomic(checksum_path(path), f"{hashlib.sha256(payload).hexdigest()}  {path.name}\n")
    with atomic_path(path) as temporary:
        Path(temporary).write_bytes(payload)


def read_verified(path, since: str = "cached") -> tuple[bytes | None, str | None]:
    """The graph's bytes and why they must not be used (None when their checksum matches). (None, None) when
    there is no graph to read: a cache miss."""
    path = Path(path)
    kind = special_file(path)
    if kind is not None:  # a named pipe would keep read_bytes waiting for a writer for ever
        return None, f"not a regular file: {kind}"
    try:
        payload = path.read_bytes()
    except OSError:
        return None, None
    return payload, mismatch(path, payload, since)


def problem(path, since: str = "built") -> str | None:
    """Why the graph at ``path`` is not the one its checksum was written for, or None when it is."""
    payload, why = read_verified(path, since)
    return "it cannot be read" if payload is None and why is None else why


def mismatch(path, payload: bytes, since: str = "cached") -> str | None:
    """Why ``payload`` (the bytes read from ``path``) does not match the checksum beside it: none there, one that
    cannot be read, or another digest. None when it matches."""
    sidecar = checksum_path(path)
    name = display_path(sidecar.name)
    kind = special_file(sidecar)
    if kind is not None:
        return f"its checksum {name} is not a regular file: {kind}"
    try:
        with open(sidecar, "rb") as handle:
            head = handle.read(256)  # a digest, two spaces and the graph's name: never a large file's whole
    except FileNotFoundError:
        return f"no checksum beside it: {name} is missing, as for a graph written by an earlier version"
    except OSError as error:
        return f"its checksum {name} cannot be read ({error.strerror or type(error).__name__})"
    words = head.split()
    found = words[0].decode("ascii", "replace").lower() if words else ""
    if not _DIGEST.fullmatch(found):
        return f"its checksum {name} holds no SHA-256 digest"
    if found != hashlib.sha256(payload).hexdigest():
        return f"its checksum does not match its bytes: changed since it was {since}"
    return None
