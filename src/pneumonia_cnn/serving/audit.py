"""The audit trail: every prediction the server answers, in SQLite (WAL mode), committed before the answer.

One writer thread owns the connection. Requests hand it their rows and wait; it writes everything waiting in
one transaction (group commit, ``synchronous=FULL``), then wakes them. So an answered request is on disk, a
killed server loses only requests it had not answered, and SQLite's journal keeps rows whole. If the log
cannot be written the request fails (503): the service never answers what it cannot account for.

No pixels are kept unless ``keep_images`` names a folder: then the upload's bytes are stored there under
their SHA-256 (never under the client's file name), and the row says where.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import queue
import re
import sqlite3
import threading
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

from ..errors import PneumoniaCNNError

log = logging.getLogger(__name__)
COLUMNS = ("request_id", "item", "time", "key_id", "endpoint", "image_sha256", "model_id", "probability",
           "raw_score", "label", "threshold", "in_distribution", "ood_score", "warnings", "kept_image")
SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT NOT NULL, item INTEGER NOT NULL, time TEXT NOT NULL, key_id TEXT, endpoint TEXT NOT NULL,
    image_sha256 TEXT NOT NULL, model_id TEXT NOT NULL, probability REAL NOT NULL, raw_score REAL,
    label TEXT NOT NULL, threshold REAL NOT NULL, in_distribution INTEGER, ood_score REAL, warnings TEXT,
    kept_image TEXT, PRIMARY KEY (request_id, item));
CREATE INDEX IF NOT EXISTS predictions_time ON predictions (time);
"""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def connect(path, read_only: bool = False, immutable: bool = False) -> sqlite3.Connection:
    """The log for writing (created in WAL mode when new), or opened read-only: ``immutable`` when no journal
    lies beside it, so that SQLite creates no -wal/-shm files and changes nothing (see ``read_audit``)."""
    path = Path(path)
    if read_only:
        check_readable_log(path)
        mode = "immutable=1" if immutable else "mode=ro"
        return sqlite3.connect(f"file:{quote(str(path.resolve()))}?{mode}", uri=True, isolation_level=None)
    connection = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        _check_is_audit_log(connection, path)  # before anything is written into someone else's database
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=10000")  # several server processes may share one log
        connection.executescript(SCHEMA)
        return connection
    except (sqlite3.DatabaseError, OSError, PneumoniaCNNError) as error:  # not SQLite, a folder, no permission
        if connection is not None:
            connection.close()
        if isinstance(error, PneumoniaCNNError):
            raise
        raise PneumoniaCNNError(f"--audit-log {path}: cannot be used as an SQLite audit log ({error})") from None


def check_readable_log(path: Path) -> None:
    """A regular file: a folder or a named pipe "no such audit log" (it existed; it was no file)."""
    from ..fileio import special_file
    kind = special_file(path)
    if kind:
        raise PneumoniaCNNError(f"{path}: not an audit log (not a regular file: {kind})")
    if not path.is_file():
        raise PneumoniaCNNError(f"{path}: no such audit log")


def _check_is_audit_log(connection: sqlite3.Connection, path: Path) -> None:
    """A new or empty file, or a log with the predictions table; not another application's database."""
    tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "predictions" not in tables:
        raise PneumoniaCNNError(f"--audit-log {path}: an SQLite database of something else (tables: "
                                f"{', '.join(sorted(tables)[:5])}), not an audit log")


def check_keep_folder(folder: Path) -> None:
    """--keep-images checked at start, with a file written and removed there: a file, a device or /proc in its
    place let the server start, then every prediction was withheld ("audit log unavailable")."""
    import tempfile
    if folder.exists() and not folder.is_dir():
        raise PneumoniaCNNError(f"--keep-images {folder}: not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise PneumoniaCNNError(f"--keep-images {folder}: cannot keep images there ({error.strerror or error})"
                                ) from None


class AuditLog:
    def __init__(self, path, keep_images=None):
        self.path, self.keep_images = Path(path), Path(keep_images) if keep_images else None
        if self.keep_images is not None:
            check_keep_folder(self.keep_images)
        self.connection = connect(self.path)
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.last_error: str | None = None  # the last write's failure, until a write or a probe succeeds
        self.thread = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self.thread.start()

    async def record(self, rows: list[dict], images: list[tuple[bytes, str]] | None = None) -> None:
        """Append ``rows`` (and keep ``images`` = [(bytes, suffix)] when asked); returns once committed."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending.put((rows, images, done, loop))
        await done

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=30)
        self.connection.close()

    def _write_loop(self):
        while True:
            first = self.pending.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    item = self.pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.pending.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            error = self._write(batch)
            for _, _, done, loop in batch:
                loop.call_soon_threadsafe(_settle, done, error)

    def _write(self, batch) -> Exception | None:
        try:
            rows = []
            for item_rows, images, _, _ in batch:
                for row, image in zip(item_rows, images or [None] * len(item_rows)):
                    kept = self._keep(row["image_sha256"], *image) if image and self.keep_images else None
                    rows.append(tuple({**row, "kept_image": kept}.get(c) for c in COLUMNS))
            self.connection.execute("BEGIN")
            self.connection.executemany(f"INSERT INTO predictions ({', '.join(COLUMNS)}) VALUES "
                                        f"({', '.join('?' * len(COLUMNS))})", rows)
            self.connection.execute("COMMIT")
            self.last_error = None
            return None
        except Exception as error:  # disk full, read-only file system: the requests waiting fail with 503
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            log.error("audit log %s: cannot write (%s)", self.path, error)
            self.last_error = str(error)
            return error

    def problem(self) -> str | None:
        """Why the log cannot be written now, or ``None``. After a failed write, a probe takes the write lock
        for a moment (within 1 s): a lock released or a file made writable again clears it; a full disk shows
        again at the next prediction."""
        if self.last_error is None:
            return None
        try:
            with closing(sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=rw", uri=True, timeout=1,
                                         isolation_level=None)) as probe:  # mode=rw: never creates a file
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
        except sqlite3.Error as error:
            self.last_error = str(error)
            return self.last_error
        self.last_error = None
        return None

    def _keep(self, sha256: str, data: bytes, suffix: str) -> str:
        from ..fileio import atomic_path
        target = self.keep_images / sha256[:2] / f"{sha256}{suffix}"
        if not target.exists():
            with atomic_path(target, mode=0o600) as temporary:  # a patient's image: its owner alone reads it
                temporary.write_bytes(data)
        return str(target)


def _settle(done, error):
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(AuditUnavailable(str(error)))


class AuditUnavailable(Exception):
    pass


def parse_since(text: str | None, now: datetime | None = None, flag: str = "--since/--until") -> str | None:
    """'2026-05-01', '2026-05-01T08:00', an ISO time with a zone, or a span back from now ('90m', '24h', '7d')
    -> the UTC ISO text the log stores (the comparison is textual, so both sides must share the form)."""
    if text is None:
        return None
    if not text.strip():  # an unset $SINCE in a script: not "no bound", which exported every row
        raise PneumoniaCNNError(f"{flag}: empty; give a date/time or a span")
    now = now or datetime.now(timezone.utc)
    span = re.fullmatch(r"(\d+)([mhd])", text.strip())
    try:
        if span:
            unit = {"m": "minutes", "h": "hours", "d": "days"}[span.group(2)]
            moment = now - timedelta(**{unit: int(span.group(1))})
        else:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
        moment = moment.astimezone(timezone.utc)
    except (OverflowError, ValueError) as error:
        if span or isinstance(error, OverflowError):  # 99999999d reaches back before year 1
            raise PneumoniaCNNError(f"{flag} {text}: outside the dates a log can hold (years 1 to 9999 UTC)") from None
        raise PneumoniaCNNError(f"{flag} {text}: give a date (2026-05-01), a time "
                                f"(2026-05-01T08:00, UTC unless a zone is given) or a span (24h, 7d)") from None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_audit(path, since: str | None = None, until: str | None = None) -> list[dict]:
    """The rows from ``since`` until before ``until``, without changing the log or creating files beside it:
    with no -wal (or -journal) file beside it, no server has it open and every row is in the file itself, so
    it is opened immutable (a read-only connection to a WAL log would create -wal and -shm files and leave
    them); with a -wal but no -shm (a copy, a backup), from a private copy of both (SQLite reads a -wal only
    through a -shm, which it would create beside the log; immutable=1 ignores the -wal's rows); otherwise
    read-only, through the server's own -wal and -shm files."""
    path = Path(path)
    bounds = _bounds(since, until)
    check_readable_log(path)
    for _ in range(3):  # a server that opens (or closes) the log while it is read: read again, the new way
        state = _journal_state(path)
        rows = _select_as(path, bounds, state)
        if _journal_state(path) == state:
            break
    else:
        rows = _select(path, bounds, immutable=False)
    out, unreadable = [], 0
    for row in rows:
        entry = dict(zip(COLUMNS, row))
        entry["in_distribution"] = None if entry["in_distribution"] is None else bool(entry["in_distribution"])
        entry["label"] = entry["label"] or None  # stored "" (the column is NOT NULL): an image given no label
        entry["warnings"], readable = _warnings(entry["warnings"])
        unreadable += not readable
        out.append(entry)
    if unreadable:
        log.warning("%s: %d row(s) whose warnings are not a JSON list; exported as their raw text", path, unreadable)
    return out


def _bounds(since: str | None, until: str | None) -> list[tuple[str, str]]:
    """The WHERE clauses of ``read_audit``; a ``since`` after (or at) ``until`` is refused, not an export of
    the CSV header alone. Both spans count back from the same moment."""
    now = datetime.now(timezone.utc)
    start, end = parse_since(since, now, "--since"), parse_since(until, now, "--until")
    if start is not None and end is not None and start >= end:
        relation = "after" if start > end else "the same moment as"
        raise PneumoniaCNNError(f"--since {since} ({start}) is {relation} --until {until} ({end}): no row lies "
                                f"between them")
    return [(clause, value) for clause, value in ((" AND time >= ?", start), (" AND time < ?", end))
            if value is not None]


def _journal_state(path: Path) -> tuple[bool, ...]:
    """Which of -wal, -journal and -shm lie beside the log (a -wal counts only as a regular file)."""
    return tuple(Path(f"{path}{suffix}").is_file() if suffix == "-wal" else Path(f"{path}{suffix}").exists()
                 for suffix in ("-wal", "-journal", "-shm"))


def _select_as(path: Path, bounds, state: tuple[bool, ...]) -> list[tuple]:
    wal, journal, shm = state
    if not wal and not journal:
        return _select(path, bounds, immutable=True)
    if wal and not shm and not journal:
        return _select_copy(path, bounds)
    return _select(path, bounds, immutable=False)


def _select_copy(path: Path, bounds) -> list[tuple]:
    """The rows of the log and its -wal, read from copies of both in a private temporary folder (its -shm is
    made and removed there)."""
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pneumonia-cnn-audit-") as folder:
        copy = Path(folder) / "audit.sqlite"
        try:
            shutil.copyfile(path, copy)
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
        except OSError as error:
            raise PneumoniaCNNError(f"{path}: cannot read the log and its -wal ({error.strerror or error})") from None
        try:
            return _select(copy, bounds, immutable=False)
        except PneumoniaCNNError as error:  # named by the log, not by the copy
            raise PneumoniaCNNError(str(error).replace(str(copy), str(path), 1)) from None


def _select(path: Path, bounds, immutable: bool) -> list[tuple]:
    connection = connect(path, read_only=True, immutable=immutable)
    query = f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE 1=1" + "".join(clause for clause, _ in bounds)
    try:
        return connection.execute(query + " ORDER BY time, request_id, item", [v for _, v in bounds]).fetchall()
    except sqlite3.DatabaseError as error:
        raise PneumoniaCNNError(f"{path}: not a readable audit log ({error})") from None
    finally:
        connection.close()


def _warnings(text) -> tuple[list[str], bool]:
    """A row's warnings (stored as a JSON list) and whether they were one; anything else is kept as its raw
    text, so that one damaged row does not stop the export of the others."""
    if not text:
        return [], True
    try:
        value = json.loads(text)
    except ValueError:
        return [str(text)], False
    if not isinstance(value, list):
        return [str(text)], False
    return [item if isinstance(item, str) else json.dumps(item) for item in value], True


def format_audit(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        # a cell another program filled with a BLOB: shown as hex, not a TypeError
        return json.dumps(rows, indent=2, default=lambda value: value.hex() if isinstance(value, bytes) else str(value))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "warnings": "; ".join(row["warnings"])})
    return buffer.getvalue()
