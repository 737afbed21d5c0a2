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
from datetime import datetime, timedelta, timezone
from pathlib import Path

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


def connect(path, read_only: bool = False) -> sqlite3.Connection:
    path = Path(path)
    if read_only:
        if not path.is_file():
            raise PneumoniaCNNError(f"{path}: no such audit log")
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA busy_timeout=10000")  # several server processes may share one log
    connection.executescript(SCHEMA)
    return connection


class AuditLog:
    def __init__(self, path, keep_images=None):
        self.path, self.keep_images = Path(path), Path(keep_images) if keep_images else None
        self.connection = connect(self.path)
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
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
            return None
        except Exception as error:  # disk full, read-only file system: the requests waiting fail with 503
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            log.error("audit log %s: cannot write (%s)", self.path, error)
            return error

    def _keep(self, sha256: str, data: bytes, suffix: str) -> str:
        from ..fileio import atomic_path
        target = self.keep_images / sha256[:2] / f"{sha256}{suffix}"
        if not target.exists():
            with atomic_path(target) as temporary:
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


def parse_since(text: str | None, now: datetime | None = None) -> str | None:
    """'2026-05-01', '2026-05-01T08:00', an ISO time with a zone, or a span back from now ('90m', '24h', '7d')
    -> the UTC ISO text the log stores (the comparison is textual, so both sides must share the form)."""
    if not text:
        return None
    now = now or datetime.now(timezone.utc)
    span = re.fullmatch(r"(\d+)([mhd])", text.strip())
    if span:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[span.group(2)]
        moment = now - timedelta(**{unit: int(span.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise PneumoniaCNNError(f"--since/--until {text}: give a date (2026-05-01), a time "
                                    f"(2026-05-01T08:00, UTC unless a zone is given) or a span (24h, 7d)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_audit(path, since: str | None = None, until: str | None = None) -> list[dict]:
    connection = connect(path, read_only=True)
    try:
        query, arguments = f"SELECT {', '.join(COLUMNS)} FROM predictions WHERE 1=1", []
        if since:
            query, arguments = query + " AND time >= ?", arguments + [parse_since(since)]
        if until:
            query, arguments = query + " AND time < ?", arguments + [parse_since(until)]
        rows = connection.execute(query + " ORDER BY time, request_id, item", arguments).fetchall()
    except sqlite3.DatabaseError as error:
        raise PneumoniaCNNError(f"{path}: not a readable audit log ({error})") from None
    finally:
        connection.close()
    out = []
    for row in rows:
        entry = dict(zip(COLUMNS, row))
        entry["in_distribution"] = None if entry["in_distribution"] is None else bool(entry["in_distribution"])
        entry["warnings"] = json.loads(entry["warnings"]) if entry["warnings"] else []
        out.append(entry)
    return out


def format_audit(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "warnings": "; ".join(row["warnings"])})
    return buffer.getvalue()
