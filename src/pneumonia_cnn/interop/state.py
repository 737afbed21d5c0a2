"""What the ``pacs`` job has done, in a small SQLite file: one row per (source instance, model), the model
being its id and decision (``ModelIdentity.key``), so that a rerun scores only new instances and a failed
transfer is tried again on the next run, never forgotten.

Statuses: ``done`` (report stored in the PACS), ``unreadable`` (the image could not be decoded; not retried),
``skipped`` (not an X-ray to score, e.g. a report), ``failed`` (a network step failed after its retries; tried
again next run), ``given_up`` (the PACS refused this very instance, e.g. HTTP 404 for one it still lists, in
several runs; not fetched again until ``--retry-given-up``). ``refusals`` counts those runs since the last
success, ``refused_at`` is when the last of them was counted. Each change is one committed transaction, so a
killed job leaves the file consistent.
"""
from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import display_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT NOT NULL,
    model TEXT NOT NULL,
    study_instance_uid TEXT,
    series_instance_uid TEXT,
    status TEXT NOT NULL,
    probability REAL,
    label TEXT,
    in_distribution INTEGER,
    report_uid TEXT,
    overlay_uid TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated TEXT NOT NULL,
    refusals INTEGER NOT NULL DEFAULT 0,
    refused_at REAL,
    PRIMARY KEY (sop_instance_uid, model)
)"""
FINAL = ("done", "unreadable", "skipped")
GIVEN_UP = "given_up"
ADDED_COLUMNS = {"refusals": "INTEGER NOT NULL DEFAULT 0", "refused_at": "REAL"}  # absent from older state files


class StateFileError(PneumoniaCNNError):
    """The state file could not be read or written (locked by another process for longer than the wait, the
    disk full, the file damaged): one line, and ``--watch`` polls again."""


class ScoredState:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30)
            with self.db:
                self.db.execute(SCHEMA)
                self._add_columns()
        except sqlite3.Error as error:
            raise StateFileError(f"{display_path(self.path)}: cannot open the state file ({error})") from None

    def _add_columns(self):
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(instances)")}
        for name, kind in ADDED_COLUMNS.items():
            if name not in columns:
                try:
                    self.db.execute(f"ALTER TABLE instances ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as error:  # another job added it a moment ago
                    if "duplicate column" not in str(error):
                        raise

    @contextmanager
    def _writing(self):
        """One committed transaction; a file that cannot be written is a one-line error."""
        try:
            with self.db:
                yield self.db
        except sqlite3.Error as error:
            raise StateFileError(f"{display_path(self.path)}: cannot write the state file ({error})") from None

    def _read(self, sql: str, parameters=()) -> list[tuple]:
        try:
            return self.db.execute(sql, parameters).fetchall()
        except sqlite3.Error as error:  # a lock held past the wait ended a --watch job with a traceback
            raise StateFileError(f"{display_path(self.path)}: cannot read the state file ({error})") from None

    def close(self):
        self.db.close()

    def finished(self, model: str, statuses=FINAL) -> set[str]:
        """SOP Instance UIDs that this model has scored (or found unreadable, or skipped): not to be fetched
        again; ``statuses=(GIVEN_UP,)``: those it has given up on."""
        marks = ", ".join("?" * len(statuses))
        rows = self._read(f"SELECT sop_instance_uid FROM instances WHERE model = ? AND status IN ({marks})",
                          (model, *statuses))
        return {row[0] for row in rows}

    def refusals(self, sop_instance_uid: str, model: str) -> tuple[int, float | None]:
        """How many runs have counted a refusal of this instance, and when the last one was counted (Unix
        time; None when never)."""
        rows = self._read("SELECT refusals, refused_at FROM instances WHERE sop_instance_uid = ? AND model = ?",
                          (sop_instance_uid, model))
        return (rows[0][0], rows[0][1]) if rows else (0, None)

    def retry_given_up(self, model: str) -> int:
        """Make the instances given up on by this model ``failed`` again (fetched on this run); how many."""
        with self._writing() as db:
            cursor = db.execute("UPDATE instances SET status = 'failed', refusals = 0, refused_at = NULL "
                                "WHERE model = ? AND status = ?", (model, GIVEN_UP))
        return cursor.rowcount

    def produced(self) -> set[str]:
        """UIDs of the reports and overlays this job stored: its own output is never scored."""
        rows = self._read("SELECT report_uid, overlay_uid FROM instances WHERE status = 'done'")
        return {uid for row in rows for uid in row if uid}

    def record(self, sop_instance_uid: str, model: str, status: str, study: str | None = None,
               series: str | None = None, entry: dict | None = None, report_uid: str | None = None,
               overlay_uid: str | None = None, error: str | None = None,
               refusals: tuple[int, float | None] = (0, None)):
        entry = entry or {}
        inside = entry.get("in_distribution")
        with self._writing() as db:
            db.execute(
                "INSERT INTO instances (sop_instance_uid, model, study_instance_uid, series_instance_uid, status, "
                "probability, label, in_distribution, report_uid, overlay_uid, error, attempts, updated, refusals, "
                "refused_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?) "
                "ON CONFLICT (sop_instance_uid, model) DO UPDATE "
                "SET status = excluded.status, probability = excluded.probability, label = excluded.label, "
                "in_distribution = excluded.in_distribution, report_uid = excluded.report_uid, "
                "overlay_uid = excluded.overlay_uid, error = excluded.error, attempts = attempts + 1, "
                "updated = excluded.updated, refusals = excluded.refusals, refused_at = excluded.refused_at",
                (sop_instance_uid, model, study, series, status, entry.get("probability"), entry.get("label"),
                 None if inside is None else int(inside), report_uid, overlay_uid, error,
                 datetime.now(timezone.utc).isoformat(timespec="seconds"), *refusals))

    def rows(self, model: str | None = None) -> list[dict]:
        where = " WHERE model = ?" if model else ""
        cursor = self.db.execute(f"SELECT * FROM instances{where} ORDER BY updated", (model,) if model else ())
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def counts(self, model: str) -> dict[str, int]:
        return dict(self._read("SELECT status, COUNT(*) FROM instances WHERE model = ? GROUP BY status", (model,)))
