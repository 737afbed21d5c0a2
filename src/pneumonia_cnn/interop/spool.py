"""The ``listen`` node's spool: its folders made (or a one-line error naming ``--spool``) before the model
loads, and a lock held while a node runs, so that a second node started on the same spool by mistake refuses
to start instead of racing the first for the same files. SPOOL/receiving holds each instance while it arrives
(pynetdicom's temporary file of it, on the spool's own disk: not the system's temporary folder)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import FolderLock, display_path, write_json_atomic

log = logging.getLogger("pneumonia_cnn")
FOLDERS = ("incoming", "unreadable", "refused", "receiving")


def default_spool() -> Path:
    return Path.home() / ".cache" / "pneumonia-cnn" / "listen-spool"


def open_spool(spool: Path | None) -> Path:
    spool = Path(spool) if spool else default_spool()
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


def spool_lock(spool: Path) -> FolderLock:
    """SPOOL/.lock, held for as long as the node runs."""
    lock = Path(spool) / ".lock"
    return FolderLock(spool, f"--spool {display_path(spool)}: another listen node is using this spool (it holds "
                             f"{display_path(lock)}); give each node a spool of its own")


def remove_partial_receipts(spool: Path) -> int:
    """Delete SPOOL/incoming/.NAME.dcm.*.tmp (an instance being moved into the spool when the node was killed)
    and whatever SPOOL/receiving holds (instances being received then). Their senders got no acknowledgement
    (it comes after the rename) and send them again; left there, a partial patient image stayed for good. Only
    while this node holds the spool's lock: no other node is writing."""
    removed = 0
    for partial in [*Path(spool, "incoming").glob(".*.dcm.*.tmp"), *Path(spool, "receiving").iterdir()]:
        try:
            partial.unlink()
            removed += 1
        except OSError:  # gone meanwhile, or not a file (a folder of that name): left as it is
            pass
    if removed:
        log.warning("%d partial instance(s) left in %s by a node stopped while receiving them: removed (their "
                    "senders were not acknowledged and send them again)", removed, display_path(spool))
    return removed


class RefusalCounts(dict):
    """SPOOL/refusals.json: how often the destination refused each spooled report (file name: count), for the
    files still in SPOOL/incoming, so that a restart goes on counting where the node stopped."""

    def __init__(self, spool: Path):
        super().__init__()
        self.path, incoming = Path(spool) / "refusals.json", Path(spool) / "incoming"
        try:
            kept = json.loads(self.path.read_text(encoding="utf-8"))
            self.update({name: int(count) for name, count in kept.items() if (incoming / name).exists()
                         and isinstance(count, int) and count > 0})
        except (OSError, ValueError, AttributeError, TypeError):  # none yet, or damaged: counting starts again
            pass

    def set(self, name: str, count: int | None):
        """Record ``count`` refusals of ``name``; None: forget it (delivered, or set aside)."""
        if count is None and name not in self:
            return
        if count is None:
            self.pop(name)
        else:
            self[name] = count
        try:
            write_json_atomic(self.path, dict(self))
        except OSError as error:  # the counts still hold in memory
            log.warning("cannot record refusal counts in %s (%s)", display_path(self.path.parent), error)


class SpoolHold:
    """The spool's lock once the node's worker runs: released by whichever comes last of the node's stop() and
    its worker's end. A worker still scoring after stop()'s wait had the lock released under it, and a second
    node started on the spool meanwhile would have sent the same reports again."""

    def __init__(self, lock: FolderLock):
        self.lock, self.guard = lock, threading.Lock()
        self.worker_running = self.node_stopped = False

    def worker_starts(self) -> SpoolHold:
        with self.guard:
            self.worker_running = True
        return self

    def release(self) -> bool:
        """The node stopped; True if the lock is released now, False if it waits for the worker."""
        with self.guard:
            self.node_stopped, release = True, not self.worker_running
        if release:
            self.lock.release()
        return release

    def worker_ended(self):
        with self.guard:
            self.worker_running, release = False, self.node_stopped
        if release:
            self.lock.release()
            log.info("the worker ended: spool released")


def move_file(source: Path, target: Path):
    try:
        os.replace(source, target)
    except OSError:  # another file system (the system's temporary folder): copied
        shutil.copyfile(source, target)


def uid_of(path: Path) -> str:
    """The SOP Instance UID a spooled file was received under: its name less the receipt's suffix (12 hex
    digits, ``_receive``'s); a file put there by hand (1.2.3.4.dcm) by its whole name, not "1.2.3"."""
    uid, _, suffix = path.stem.rpartition(".")
    return uid if uid and re.fullmatch(r"[0-9a-f]{12}", suffix) else path.stem
