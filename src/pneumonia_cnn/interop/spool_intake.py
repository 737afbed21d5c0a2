"""How the ``listen`` worker reads a spooled file before scoring it: the checks that set it aside unread (over
--max-instance-mb, a header the guard refuses, no SOP Instance UID, not decodable), made apart from the move
that sets it aside. A move that fails (SPOOL/unreadable read-only, its disk full) then holds back that one
instance, named with its reason, and not the batch it came in (the move inside the checks' ``except`` raised
out of the batch, which was retried whole, forever)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..data.dicom_guard import dicom_problem
from ..fileio import display_path, over_limit, write_text_atomic

log = logging.getLogger("pneumonia_cnn")
REASONS = ".reasons"  # SPOOL/unreadable/.reasons/NAME.txt: why NAME was set aside


def read_spooled(path: Path, max_instance_mb: float):
    """(the data set, None), or (None, why the file is set aside unread)."""
    import pydicom
    try:
        size = path.stat().st_size  # a file put into the spool by hand came through no arrival limit
        if size > max_instance_mb * 2**20:
            return None, f"{over_limit(size, max_instance_mb)} (--max-instance-mb)"
        with open(path, "rb") as header:  # the header only, before pydicom inflates anything
            problem = dicom_problem(header)
        if problem:
            return None, problem
        dataset = pydicom.dcmread(path, force=True)  # from the file: a dataset read from bytes keeps them
    except Exception as error:  # noqa: BLE001 - any decoding failure is a bad instance, named by the caller
        return None, f"not readable as DICOM ({type(error).__name__})"
    if "SOPInstanceUID" not in dataset:  # an empty or text file put in the spool: not an instance
        return None, "not a DICOM instance (no SOP Instance UID)"
    return dataset, None


def kept(path: Path, folder: Path, error: OSError, retry_after: float) -> str:
    """What a failed move of ``path`` to ``folder`` (or its deletion: ``folder`` None) leaves, in words."""
    action = f"cannot be set aside in {display_path(folder)}" if folder else "cannot be removed from the spool"
    return (f"{action} ({error.strerror or error}): kept in {display_path(path.parent)}, tried again in "
            f"{retry_after:.0f} s")


def remove_unscored(path: Path, uid: str, retry_after: float) -> bool:
    """An instance not scored (a CT, a report) deleted from the spool; False, said on one line, if it cannot be."""
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("instance %s: not scored, but %s", uid, kept(path, None, error, retry_after))
        return False
    return True


def set_aside(path: Path, folder: Path, reason: str) -> None:
    """``path`` moved into ``folder`` (SPOOL/unreadable, SPOOL/refused), and its reason written in
    ``folder/.reasons/NAME.txt``: it was in the log alone, which rotates away while the file stays (hidden, so that
    ``mv refused/* incoming/`` moves the instances alone). A reason that cannot be written is said in the log; the
    move stands."""
    shutil.move(str(path), folder / path.name)
    try:
        (folder / REASONS).mkdir(exist_ok=True)
        write_text_atomic(folder / REASONS / f"{path.name}.txt", f"{reason}\n")
    except OSError as error:
        log.warning("%s: its reason not written beside it (%s)", display_path(folder / path.name),
                    error.strerror or error)
