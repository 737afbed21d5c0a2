"""The audit export at its edges: it changes nothing beside the log, a damaged row does not stop it, spans out
of the calendar and files that are not audit logs get one line."""
import asyncio
import csv
import io
import json
import sqlite3
import subprocess
import sys

import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.serving.audit import AuditLog, utc_now
from tests.conftest import PROJECT
from tests.serving.test_audit import audit_cli

EXAMPLE = PROJECT / "src/pneumonia_cnn/builtin/examples/NORMAL_IM-0128-0001.jpeg"


def row(request_id, warnings):
    return {"request_id": request_id, "item": 0, "time": utc_now(), "key_id": "ward3", "endpoint": "predict",
            "image_sha256": "ab" * 32, "model_id": "m", "probability": 0.25, "raw_score": -1.1, "label": "NORMAL",
            "threshold": 0.5, "in_distribution": 1, "ood_score": 2.0, "warnings": warnings}


def write_rows(log: AuditLog, rows):
    async def go():
        for one in rows:
            await log.record([one])
    asyncio.run(go())


@pytest.fixture
def damaged_log(tmp_path):
    """A closed log (as a stopped server leaves it): a good row, one whose warnings are not JSON, one whose
    warnings are JSON but not a list."""
    folder = tmp_path / "logs"
    log = AuditLog(folder / "audit.sqlite")
    write_rows(log, [row("r1", json.dumps(["patient age unknown"])), row("r2", "not json {"),
                     row("r3", json.dumps("a string"))])
    log.close()
    return folder / "audit.sqlite"


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_export_creates_and_changes_nothing_beside_the_log(damaged_log):
    before = snapshot(damaged_log.parent)
    assert list(before) == ["audit.sqlite"]
    for extra in ((), ("--format", "json"), ("--since", "24h"), ("--until", "1h", "--format", "json")):
        exported = audit_cli(damaged_log, *extra)
        assert exported.returncode == 0, exported.stderr
    assert snapshot(damaged_log.parent) == before  # no -wal, no -shm, not a byte or a time stamp changed


def test_export_while_a_server_writes_reads_through_its_journal(tmp_path):
    log = AuditLog(tmp_path / "audit.sqlite")
    try:
        write_rows(log, [row("r1", "[]"), row("r2", "[]")])  # committed, still in the -wal file
        names = sorted(p.name for p in tmp_path.iterdir())
        assert "audit.sqlite-wal" in names
        main_bytes = (tmp_path / "audit.sqlite").read_bytes()
        exported = audit_cli(tmp_path / "audit.sqlite", "--format", "json")
        assert exported.returncode == 0, exported.stderr
        assert [r["request_id"] for r in json.loads(exported.stdout)] == ["r1", "r2"]
        assert sorted(p.name for p in tmp_path.iterdir()) == names
        assert (tmp_path / "audit.sqlite").read_bytes() == main_bytes
    finally:
        log.close()


def test_a_damaged_warnings_cell_is_exported_as_its_raw_text(damaged_log):
    exported = audit_cli(damaged_log, "--format", "json")
    assert exported.returncode == 0, exported.stderr
    rows = json.loads(exported.stdout)
    assert [r["warnings"] for r in rows] == [["patient age unknown"], ["not json {"], ['"a string"']]
    assert "2 row(s) whose warnings are not a JSON list" in exported.stderr
    table = list(csv.DictReader(io.StringIO(audit_cli(damaged_log).stdout)))
    assert [r["warnings"] for r in table] == ["patient age unknown", "not json {", '"a string"']


@pytest.mark.parametrize("flag, value", [("--since", "99999999d"), ("--until", "99999999999999999999999d"),
                                         ("--since", "0001-01-01T00:00+05:00"), ("--until", "9999-12-31T23:00-05:00")])
def test_a_span_or_time_outside_the_calendar_is_one_line_naming_the_flag(damaged_log, capsys, flag, value):
    before = snapshot(damaged_log.parent)
    assert main(["audit", str(damaged_log), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {value}: outside the dates") and err.count("\n") == 1
    assert snapshot(damaged_log.parent) == before


def test_serve_refuses_an_audit_log_that_is_not_sqlite_in_one_line(tmp_path):
    target = tmp_path / "scan.jpeg"
    target.write_bytes(EXAMPLE.read_bytes())
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "serve", "builtin", "--device", "cpu",
                           "--audit-log", str(target)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"error: --audit-log {target}: cannot be used as an SQLite "
                                                    f"audit log (file is not a database)")
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before
    exported = audit_cli(target)  # the export says the same in its own words
    assert exported.returncode == 2 and exported.stderr.count("\n") == 1 and str(target) in exported.stderr


def test_another_applications_database_is_refused_untouched(tmp_path):
    other = tmp_path / "other.sqlite"
    connection = sqlite3.connect(other)
    connection.execute("CREATE TABLE patients (name TEXT)")
    connection.commit()
    connection.close()
    before = snapshot(tmp_path)
    with pytest.raises(PneumoniaCNNError, match=r"other.sqlite: an SQLite database of something else \(tables: "
                                                r"patients\), not an audit log"):
        AuditLog(other)
    assert snapshot(tmp_path) == before  # not switched to WAL, no predictions table added


@pytest.mark.parametrize("options, message", [
    ({"max_upload_mb": 1e30}, "--max-upload-mb 1e+30: must be a positive number of at most 4,096"),
    ({"max_batch_upload_mb": 1e6}, "--max-batch-upload-mb 1e+06: must be a positive number of at most 65,536"),
    ({"max_in_flight": 10 ** 20}, "--max-in-flight 100000000000000000000: must be a whole number from 1 to 1,000,000"),
])
def test_serve_limits_have_ceilings(options, message):
    """A limit past the ceiling was accepted, and then every upload failed with an index overflow (HTTP 500)."""
    from pneumonia_cnn.serving.service import ServeOptions
    with pytest.raises(PneumoniaCNNError) as raised:
        ServeOptions(**options)
    assert str(raised.value) == message
    assert ServeOptions(max_upload_mb=4096, max_in_flight=1_000_000).max_bytes == 4096 * 1024 * 1024


def test_a_blob_cell_is_exported_as_hex_not_a_traceback(tmp_path):
    """A cell another program filled with bytes made --format json raise TypeError from json.dumps."""
    import sqlite3
    log = AuditLog(tmp_path / "audit.sqlite")
    write_rows(log, [row("r1", "[]")])
    log.close()
    with sqlite3.connect(tmp_path / "audit.sqlite") as connection:
        connection.execute("UPDATE predictions SET model_id = ? WHERE request_id = 'r1'", (b"\x01\xff",))
    exported = audit_cli(tmp_path / "audit.sqlite", "--format", "json")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)[0]["model_id"] == "01ff"


def test_health_says_503_while_the_audit_log_cannot_be_written(trained_run, tmp_path):
    """Every prediction is refused while the log is locked by another process: /health must take the node out
    of a load balancer's rotation then, and put it back once the lock is gone."""
    import httpx

    from tests.serving.conftest import Server, xray_paths
    running = Server(trained_run / "best.pt", "--audit-log", tmp_path / "audit.sqlite", workdir=tmp_path)
    image = {"file": ("a.jpeg", xray_paths(1)[0].read_bytes())}
    try:
        assert httpx.get(f"{running.url}/health").json()["status"] == "ok"
        holder = sqlite3.connect(tmp_path / "audit.sqlite", isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        refused = httpx.post(f"{running.url}/predict", files=image, timeout=60)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["detail"] == "audit log unavailable (database is locked); prediction withheld"
        health = httpx.get(f"{running.url}/health", timeout=30)
        assert health.status_code == 503
        assert health.json()["status"] == "audit log unavailable (database is locked): predictions refused"
        holder.execute("ROLLBACK")
        holder.close()
        assert httpx.get(f"{running.url}/health").json()["status"] == "ok"
        assert httpx.post(f"{running.url}/predict", files=image, timeout=60).status_code == 200
    finally:
        running.stop()
