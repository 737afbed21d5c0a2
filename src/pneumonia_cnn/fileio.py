"""Atomic file writes (a killed process leaves either the old file or the new one, never half of one) and
safe reads of PyTorch files (no pickled code runs)."""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import stat
import tempfile
import unicodedata
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import CheckpointError, PneumoniaCNNError, one_line

NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def temporary_prefix(name: str) -> str:
    """"." + name + ".", then mkstemp's 8 random characters and a suffix of up to 6 (".tmp", ".check"): the name
    cut to fit the 255 bytes a file name may have, without bytes that are not UTF-8 (torch's and ONNX's writers
    take only UTF-8 text: ``export --out`` to such a name ended in a 4,000-line traceback)."""
    return "." + os.fsencode(name)[:NAME_MAX - 16].decode("utf-8", "ignore") + "."


@contextmanager
def atomic_path(path, mode: int | None = None):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``, with
    ``mode`` (0o600 for patients' images), else the mode a plain write would give. A failure to write it (a full
    disk) is an ``OutputError`` naming ``path``, not the temporary file or no file at all."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # it names the folder it could not make
        if error.errno in WRITE_FAILURES:
            raise output_error(error, error.filename or path.parent) from None
        raise
    try:
        handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as error:  # it names the temporary file, which was never made
        raise output_error(error, path) from None
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, _mode_for(path) if mode is None else mode)  # not mkstemp's 0600 for every output
        os.replace(temporary, path)
    except BaseException as error:
        # named before the temporary file goes: what it took of a full disk is free again after
        named = output_error(error, path) if isinstance(error, OSError) and _in_writing(error, temporary) else None
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if named is not None:
            raise named from None
        raise


class OutputError(OSError):
    """An output that could not be written: ``str()`` is "PATH: reason", one line naming the file (an OSError
    of a write says "[Errno 28] No space left on device" and names none). ``errno`` and ``strerror`` are kept."""

    def __str__(self) -> str:
        return f"{display_path(self.filename)}: {self.strerror}"


# a write that failed for want of room or of a working disk, rather than for something the body read
WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def output_error(error: OSError, path) -> OutputError:
    """``error``, raised while ``path`` was written, as an ``OutputError`` naming ``path``. numpy's short write
    ("36864 requested and 9184 written") gives no reason: on a full file system it is "No space left on device"."""
    if isinstance(error, OutputError):
        return error
    code, reason = error.errno, error.strerror
    if code is None and _short_write(error) and _no_room(Path(path).parent):
        code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
    return OutputError(code, reason or one_line(error), os.fspath(path))


def _in_writing(error: OSError, temporary: str) -> bool:
    """Whether ``error`` is the write's own: about the temporary file, or a full or failing disk."""
    return error.filename in (temporary, None) and (
        error.filename == temporary or error.errno in WRITE_FAILURES or (error.errno is None and _short_write(error)))


def _short_write(error: OSError) -> bool:
    return re.fullmatch(r"\d+ requested and \d+ written", str(error)) is not None


def _no_room(folder: Path) -> bool:
    try:
        found = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows): the short write is reported as it is
        return False
    return found.f_bavail * found.f_frsize < 1 << 20  # what is left is less than one more block of a write


def write_bytes(temporary: Path, data: bytes, path) -> None:
    """``data`` into ``temporary`` (an ``atomic_path``'s for ``path``); a failure names ``path``: where several
    files are written together, the one that failed (the innermost ``atomic_path`` would name its own)."""
    try:
        temporary.write_bytes(data)
    except OSError as error:
        raise output_error(error, path) from None


def _mode_for(path: Path) -> int:
    """The mode a plain write would give: an existing file's own, a new file's from the process umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # read, not set: os.umask() sets it, and a thread creating a file meanwhile would get the wrong mode
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path, payload) -> None:
    write_text_atomic(path, json_text(payload) + "\n")


def json_text(payload, indent: int = 2) -> str:
    """Strict JSON: an undefined number (NaN, an AUC of one class) is null, which every parser reads; Python
    writes a bare NaN that JavaScript's, jq's and most others refuse."""
    return json.dumps(_finite(payload), indent=indent, default=_json_default, allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _json_default(value):
    import numpy as np
    if isinstance(value, (np.generic, np.ndarray)):
        return _finite(value.item() if isinstance(value, np.generic) else value.tolist())
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def over_limit(size_bytes: int, limit_mb: float) -> str:
    """"SIZE, above the LIMIT MB limit", in MB to one decimal, or in bytes where that rounding would show the
    size at or under the limit ("2.0 MB, above the 2 MB limit" for a file 300 bytes over)."""
    size = f"{size_bytes / 2**20:.1f} MB"
    if float(size.split()[0]) <= limit_mb:
        return f"{size_bytes:,} bytes, above the {limit_mb:g} MB limit ({int(limit_mb * 2**20):,} bytes)"
    return f"{size}, above the {limit_mb:g} MB limit"


def display_path(path) -> str:
    """A printable form of any path, also one whose name is not valid UTF-8, that tells any two paths apart: a byte
    that is not UTF-8 is shown as ``\\xff`` and a backslash of the name itself doubled (``a\\\\b.jpeg`` for
    ``a\\b.jpeg``): a file named ``x\\xff.jpeg`` (backslash, x, f, f) had been shown as the one named with the
    byte 0xff, in every output."""
    text = str(path)
    if not _encodable(text):  # lone surrogates other than those of undecodable bytes: not a name on disk
        return text.replace("\\", "\\\\").encode("utf-8", "backslashreplace").decode("utf-8")
    return os.fsencode(text).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


# what a terminal would act on rather than show: controls (a newline forges a line, ESC redraws the screen), the
# line and paragraph separators, and the bidirectional overrides and isolates that reorder what follows
_HIDDEN_EFFECT = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)}


def printable(path) -> str:
    """A file name (or a message naming one) as one line a terminal shows as it is: bytes that are not UTF-8 as
    ``\\xff`` (a strict UTF-8 stream could not print them) and the characters in ``_HIDDEN_EFFECT`` or of
    category Cc escaped (``\\x1b``, ``\\n``; a C1 control as ``\\u0085``, as ``\\x85`` is the byte 0x85 that
    ``display_path`` shows). Every other character stays, so a name with an ideographic space or a zero-width
    joiner can be copied back into a command. A backslash stays single (a message quotes text that has its own):
    a path whose form must tell it from any other goes through ``display_path`` first, as the table's do."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace") if _encodable(str(path)) else \
        str(path).encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join((f"\\u{ord(c):04x}" if 0x80 <= ord(c) <= 0x9F else c.encode("unicode_escape").decode())
                   if unicodedata.category(c) == "Cc" or c in _HIDDEN_EFFECT else c for c in text)


def _encodable(text: str) -> bool:
    """Whether ``os.fsencode`` takes it: lone surrogates other than the U+DC80-DCFF of undecodable bytes fail."""
    try:
        os.fsencode(text)
        return True
    except UnicodeEncodeError:
        return False


# what a file saved by torch's legacy (pre-zip) format begins with: its magic number, pickled
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def load_torch_file(path, map_location="cpu"):
    """``torch.load(weights_only=True)`` with one-line errors: a file that holds pickled objects is refused
    (loading it could run code), an unreadable one is named with the reason. A plain pickle (one without
    torch's magic number) is refused first, in the same words whatever its protocol: torch warned about
    protocol 4 ("Detected pickle protocol 4 ...", a second line) and gave its own message cut mid-word."""
    path = Path(path)
    if path.exists() and not path.is_file():  # open() would wait on a named pipe's writer for ever
        raise CheckpointError(f"{display_path(path)}: {not_a_file_reason(path)}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        head = b""  # torch.load below names the reason
    if head.startswith(b"\x80") and _LEGACY_MAGIC not in head:
        raise CheckpointError(f"{display_path(path)}: not a readable checkpoint (not a PyTorch file: a pickle "
                              f"without torch's magic number)")
    if _is_torchscript(path):  # torch.load warned in a second line, then told of its own API's history
        raise CheckpointError(f"{display_path(path)}: a TorchScript export (export --format torchscript), not a "
                              f"checkpoint; give the checkpoint it was exported from")
    damaged = damaged_entry(path)
    if damaged:
        raise CheckpointError(f"{display_path(path)}: not a readable checkpoint (damaged: the checksum of {damaged} "
                              f"does not match its bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{display_path(path)}: not a readable checkpoint ({_unreadable_reason(path, error)})"
                                  ) from None
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f"it references {found.group(1)}" if found else "it holds pickled objects"
        raise CheckpointError(f"{display_path(path)}: refused to load: {what}; a checkpoint may hold only weights "
                              f"and plain data (loading it could run code)") from None
    except Exception as error:  # garbage makes the unpickler fail in many ways (KeyError, IndexError, ...)
        raise CheckpointError(f"{display_path(path)}: not a readable checkpoint ({_unreadable_reason(path, error)})"
                              ) from None


def _is_torchscript(path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return False


def damaged_entry(path) -> str | None:
    """The first entry of a zip-format torch file whose CRC-32 does not match its bytes: torch.load never checks
    them, and one flipped bit in a weight loaded silently (an X-ray scored 0.0000 instead of 0.9981). None when
    all match, or when the file is no zip (torch's legacy format has no checksums; torch.load names the reason)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.CRC == 0:  # saved with torch's compute_crc32 off (or empty): no checksum to check
                    continue
                try:
                    with archive.open(entry) as member:
                        while member.read(1 << 22):
                            pass
                except zipfile.BadZipFile:  # "Bad CRC-32", raised once the entry is read to its end
                    return entry.filename.split("/", 1)[-1]  # less the archive's folder: the name when saved
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        pass
    return None


def not_a_file_reason(path, what: str = "checkpoint") -> str:
    """Why ``path``, which is not a regular file, is no ``what`` (a checkpoint, a config file): it is missing,
    or what it is instead (a named pipe, a device, a symbolic link loop: "checkpoint not found" sent the user
    looking for a file that is there)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{what} not found" + (" (a symbolic link to a missing file)" if path.is_symlink() else "")
        if error.errno == errno.ELOOP:
            return f"not a readable {what} (a symbolic link loop)"
        return f"not a readable {what} ({error.strerror or type(error).__name__})"
    return f"not a readable {what} (not a regular file: {file_kind(mode)})"


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def special_file(path) -> str | None:
    """What ``path`` is when it exists but is no regular file (a named pipe, a device, a folder): reading a pipe
    waits for a writer for ever, and /dev/zero never ends. None for a regular file, or one that cannot be
    looked at (its reader names the reason)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def _unreadable_reason(path: Path, error: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, on one line: what the file is rather than which opcode
    the unpickler tripped on, where that can be told."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as cause:
        return cause.strerror or type(cause).__name__
    if not head:
        return "empty file"
    legacy = head.startswith(b"\x80")  # a pickle: torch's format before zip archives
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            return "truncated or damaged: its zip archive has no central directory"
        if not legacy:
            return "not a PyTorch file"
        if isinstance(error, EOFError):
            return "truncated: the file ends inside its pickled data"
        if "Invalid magic number" in str(error):
            return "not a PyTorch file: a pickle without torch's magic number"
    reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", one_line(error, limit=1000))
    reason = reason.split(" This is an internal miniz error")[0]  # then advice that the file may be corrupt
    if not isinstance(error, RuntimeError):  # the unpickler tripped on damaged pickled data
        kind = type(error).__name__ if type(error).__module__ == "builtins" else \
            f"{type(error).__module__}.{type(error).__name__}"
        reason = f"damaged pickled data: {kind}" + (f" {reason}" if str(error).strip() else "")
    return reason if len(reason) <= 160 else reason[:159] + "…"


class FolderLock:
    """An exclusive lock on FOLDER/.lock while one process writes into FOLDER (the system releases it if the
    process dies). ``busy`` is the one-line error when another process holds it. Where ``fcntl`` is missing
    (Windows) there is no lock: one writer per folder is then the user's to keep."""

    def __init__(self, folder, busy: str):
        import threading
        self.path, self.busy, self.handle = Path(folder) / ".lock", busy, None
        self.guard = threading.Lock()  # release() from two threads at once: one of them closes the handle

    def acquire(self):
        import errno
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            self.handle = open(self.path, "a+")  # noqa: SIM115 - held open while the folder is written
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self.release()
            held = error.errno in (errno.EAGAIN, errno.EACCES)
            raise PneumoniaCNNError(self.busy if held else f"cannot lock {display_path(self.path)} "
                                                           f"({error.strerror})") from None
        return self

    def release(self):
        """Idempotent and thread-safe: a lock already released is left as it is; once any call has returned, the
        lock is released (two threads closing one file at once raised "I/O operation on closed file")."""
        with self.guard:
            handle, self.handle = self.handle, None
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

