"""The audit trail: one row per answered prediction, exported by ``pneumonia-cnn audit``, whole after SIGKILL."""
import asyncio
import csv
import hashlib
import io
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx

from tests.serving.conftest import Server, bearer, xray_paths
from tests.serving.test_operations import noise_png


def audit_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumonia_cnn", "audit", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_every_prediction_is_logged_without_pixels_and_exported(trained_run, keys, tmp_path):
    running = Server(trained_run / "best.pt", "--api-keys", keys["path"], "--audit-log", tmp_path / "audit.sqlite",
                     workdir=tmp_path)
    try:
        paths = xray_paths(2)
        answers = []
        for path in paths:
            response = httpx.post(f"{running.url}/predict", files={"file": (path.name, path.read_bytes())},
                                  headers=bearer(keys["ward"]))
            answers.append(response.json())
        noise = httpx.post(f"{running.url}/predict", files={"file": ("noise.png", noise_png(0))},
                           headers=bearer(keys["ward"])).json()
        batch = httpx.post(f"{running.url}/predict/batch", headers=bearer(keys["admin"]),
                           files=[("files", (p.name, p.read_bytes())) for p in paths[:2]]
                           + [("files", ("bad.png", b"x"))])
        assert batch.status_code == 200
    finally:
        running.stop()
    connection = sqlite3.connect(tmp_path / "audit.sqlite")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    exported = audit_cli(tmp_path / "audit.sqlite", "--format", "json")
    assert exported.returncode == 0, exported.stderr
    rows = json.loads(exported.stdout)
    assert len(rows) == len(paths) + 3  # the unreadable file of the batch was not predicted: no row
    # not an X-ray: scored, given no label, and logged so (the column is NOT NULL: stored "", exported null)
    assert noise["label"] is None and rows[len(paths)]["label"] is None
    assert rows[len(paths)]["probability"] == noise["probability"]
    for row, path, answer in zip(rows, paths, answers):
        assert row["request_id"] == answer["request_id"] and row["key_id"] == "ward3"
        assert row["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["probability"] == answer["probability"] and row["label"] == answer["label"]
        assert row["threshold"] == answer["threshold"] and row["in_distribution"] == answer["in_distribution"]
        assert row["model_id"] == answer["model"] and row["time"].endswith("Z") and row["kept_image"] is None
    assert [r["key_id"] for r in rows[-2:]] == ["ops", "ops"] and rows[-1]["endpoint"] == "predict/batch"
    table = list(csv.DictReader(io.StringIO(audit_cli(tmp_path / "audit.sqlite", "--since", "1h").stdout)))
    assert table[len(paths)]["label"] == "" and table[0]["label"] in ("NORMAL", "PNEUMONIA")
    assert len(table) == len(rows) and set(table[0]) >= {"time", "key_id", "image_sha256", "model_id", "probability",
                                                         "label", "threshold", "in_distribution"}
    assert audit_cli(tmp_path / "audit.sqlite", "--since", "2099-01-01").stdout.count("\n") == 1  # the header only
    bad = audit_cli(tmp_path / "audit.sqlite", "--since", "last tuesday")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--since" in bad.stderr
    assert b"JFIF" not in (tmp_path / "audit.sqlite").read_bytes()  # no pixels kept


def test_keep_images_stores_bytes_by_hash_only(trained_run, tmp_path):
    running = Server(trained_run / "best.pt", "--audit-log", tmp_path / "audit.sqlite", "--keep-images",
                     tmp_path / "kept", workdir=tmp_path)
    try:
        path = xray_paths(1)[0]
        response = httpx.post(f"{running.url}/predict", files={"file": ("../../escape.jpeg", path.read_bytes())})
        assert response.status_code == 200
    finally:
        running.stop()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    kept = list((tmp_path / "kept").rglob("*"))
    assert [p.name for p in kept if p.is_file()] == [f"{digest}.jpeg"]
    assert (tmp_path / "kept" / digest[:2] / f"{digest}.jpeg").read_bytes() == path.read_bytes()
    assert not (tmp_path.parent / "escape.jpeg").exists()


def test_sigkill_mid_load_loses_no_answered_request(trained_run, tmp_path):
    audit = tmp_path / "audit.sqlite"
    running = Server(trained_run / "best.pt", "--audit-log", audit, workdir=tmp_path)
    answered, stop = [], threading.Event()
    payloads = [(p.name, p.read_bytes()) for p in xray_paths(4)]

    async def clients():
        async with httpx.AsyncClient(timeout=30) as http:
            async def one_client(offset):
                index = offset
                while not stop.is_set():
                    name, data = payloads[index % len(payloads)]
                    index += 1
                    try:
                        response = await http.post(f"{running.url}/predict", files={"file": (name, data)})
                    except httpx.HTTPError:
                        continue
                    if response.status_code == 200:
                        answered.append(response.json()["request_id"])
            await asyncio.gather(*[one_client(i) for i in range(8)])
    loader = threading.Thread(target=lambda: asyncio.run(clients()))
    loader.start()
    while len(answered) < 40:
        time.sleep(0.05)
    # Hold the log's write lock for a second, then kill: rows are waiting in the server when it dies, and
    # a server that answered before committing would have answered some of them.
    blocker = sqlite3.connect(audit, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")
    time.sleep(1.0)
    running.process.send_signal(signal.SIGKILL)
    running.process.wait()
    blocker.rollback()
    blocker.close()
    stop.set()
    loader.join(timeout=60)
    restarted = Server(trained_run / "best.pt", "--audit-log", audit, workdir=tmp_path)  # recovers the WAL
    restarted.stop()
    connection = sqlite3.connect(audit)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    logged = {row[0] for row in connection.execute("SELECT request_id FROM predictions")}
    assert set(answered) <= logged, f"{len(set(answered) - logged)} answered requests missing from the log"
    torn = connection.execute("SELECT COUNT(*) FROM predictions WHERE image_sha256 IS NULL OR "
                              "length(image_sha256) != 64 OR probability IS NULL OR label IS NULL OR "
                              "model_id IS NULL OR time IS NULL").fetchone()[0]
    assert torn == 0 and len(logged) >= len(answered) >= 40
