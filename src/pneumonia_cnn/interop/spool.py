"""The ``listen`` node's spool: its folders made (or a one-line error naming ``--spool``) before the model
loads, and a lock held while a node runs, so that a second node started on the same spool by mistake refuses
to start instead of racing the first for the same files."""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import display_path

FOLDERS = ("incoming", "unreadable", "refused")


def open_spool(spool: Path) -> Path:
    spool = Path(spool)
    for name in FOLDERS:
        folder = spool / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            in_the_way = ": a file is in the way" if folder.exists() or spool.is_file() else ""
            raise PneumoniaCNNError(f"--spool {display_path(spool)}: cannot make {display_path(folder)} "
                                    f"({error.strerror}{in_the_way})") from None
    for folder in (spool, *(spool / name for name in FOLDERS)):  # the root holds the lock file
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PneumoniaCNNError(f"--spool {display_path(spool)}: {display_path(folder)} is not writable")
    return spool


class SpoolLock:
    """An exclusive lock on SPOOL/.lock for as long as the node runs (released by the system if it dies). On a
    system without ``fcntl`` (Windows) there is none: one node per spool is then the operator's to keep."""

    def __init__(self, spool: Path):
        self.path, self.handle = Path(spool) / ".lock", None

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            self.handle = open(self.path, "a+")  # noqa: SIM115 - held open while the node runs
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self.release()
            held = error.errno in (errno.EAGAIN, errno.EACCES)
            raise PneumoniaCNNError(f"--spool {display_path(self.path.parent)}: " + (
                f"another listen node is using this spool (it holds {display_path(self.path)}); give each node a "
                "spool of its own" if held else f"cannot lock {display_path(self.path)} ({error.strerror})")) \
                from None
        return self

    def release(self):
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None
