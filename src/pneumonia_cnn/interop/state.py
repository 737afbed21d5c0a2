"""What the ``pacs`` job has done, in a small SQLite file: one row per (source instance, model), the model
being its id and decision (``ModelIdentity.key``), so that a rerun scores only new instances and a failed
transfer is tried again on the next run, never forgotten.

Statuses: ``done`` (report stored in the PACS), ``unreadable`` (the image could not be decoded; not retried),
``skipped`` (not an X-ray to score, e.g. a report), ``failed`` (a network step failed after its retries; tried
again next run), ``given_up`` (the PACS refused it, e.g. HTTP 404 for an instance it still lists, in several
runs in a row; not fetched again until ``--retry-given-up``). ``refusals`` counts those runs in a row. Each
change is one committed transaction, so a killed job leaves the file consistent.
"""
from __future__ import annotations

import sqlite3
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
    PRIMARY KEY (sop_instance_uid, model)
)"""
FINAL = ("done", "unreadable", "skipped")
GIVEN_UP = "given_up"


class ScoredState:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30)
            with self.db:
                self.db.execute(SCHEMA)
                columns = {row[1] for row in self.db.execute("PRAGMA table_info(instances)")}
                if "refusals" not in columns:  # a state file written before give-ups were counted
                    self.db.execute("ALTER TABLE instances ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0")
        except sqlite3.Error as error:
            raise PneumoniaCNNError(f"{display_path(self.path)}: cannot open the state file ({error})") from None

    def close(self):
        self.db.close()

    def finished(self, model: str, statuses=FINAL) -> set[str]:
        """SOP Instance UIDs that this model has scored (or found unreadable, or skipped): not to be fetched
        again; ``statuses=(GIVEN_UP,)``: those it has given up on."""
        marks = ", ".join("?" * len(statuses))
        rows = self.db.execute(f"SELECT sop_instance_uid FROM instances WHERE model = ? AND status IN ({marks})",
                               (model, *statuses))
        return {row[0] for row in rows}

    def refusals(self, sop_instance_uid: str, model: str) -> int:
        """In how many runs in a row the PACS has refused this instance (0 when never, or not the last time)."""
        row = self.db.execute("SELECT refusals FROM instances WHERE sop_instance_uid = ? AND model = ?",
                              (sop_instance_uid, model)).fetchone()
        return row[0] if row else 0

    def retry_given_up(self, model: str) -> int:
        """Make the instances given up on by this model ``failed`` again (fetched on this run); how many."""
        with self.db:
            cursor = self.db.execute("UPDATE instances SET status = 'failed', refusals = 0 WHERE model = ? AND "
                                     "status = ?", (model, GIVEN_UP))
        return cursor.rowcount

    def produced(self) -> set[str]:
        """UIDs of the reports and overlays this job stored: its own output is never scored."""
        rows = self.db.execute("SELECT report_uid, overlay_uid FROM instances WHERE status = 'done'")
        return {uid for row in rows for uid in row if uid}

    def record(self, sop_instance_uid: str, model: str, status: str, study: str | None = None,
               series: str | None = None, entry: dict | None = None, report_uid: str | None = None,
               overlay_uid: str | None = None, error: str | None = None, refusals: int = 0):
        entry = entry or {}
        inside = entry.get("in_distribution")
        with self.db:
            self.db.execute(
                "INSERT INTO instances (sop_instance_uid, model, study_instance_uid, series_instance_uid, status, "
                "probability, label, in_distribution, report_uid, overlay_uid, error, attempts, updated, refusals) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (sop_instance_uid, model) DO UPDATE "
                "SET status = excluded.status, probability = excluded.probability, label = excluded.label, "
                "in_distribution = excluded.in_distribution, report_uid = excluded.report_uid, "
                "overlay_uid = excluded.overlay_uid, error = excluded.error, attempts = attempts + 1, "
                "updated = excluded.updated, refusals = excluded.refusals",
                (sop_instance_uid, model, study, series, status, entry.get("probability"), entry.get("label"),
                 None if inside is None else int(inside), report_uid, overlay_uid, error,
                 datetime.now(timezone.utc).isoformat(timespec="seconds"), refusals))

    def rows(self, model: str | None = None) -> list[dict]:
        where = " WHERE model = ?" if model else ""
        cursor = self.db.execute(f"SELECT * FROM instances{where} ORDER BY updated", (model,) if model else ())
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def counts(self, model: str) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM instances WHERE model = ? GROUP BY status", (model,))
        return dict(rows.fetchall())
