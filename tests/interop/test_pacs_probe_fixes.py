"""What a probe of ``pacs`` and ``listen`` found: a ``pacs`` run ended early (the state file's disk full,
SIGTERM) printed none of the reports it had stored; in ``listen``, one instance that could not be moved to
SPOOL/unreadable (or deleted, not scored) held back its whole batch, pass after pass; a file put into the spool
by hand was named by part of its name."""
from __future__ import annotations

import errno
import logging
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.interop import spool_intake
from pneumonia_cnn.interop.listener import Destination, Listener
from pneumonia_cnn.interop.spool import uid_of
from pneumonia_cnn.interop.state import ScoredState, StateFileError

from .studies import xray_dicom
from .test_listen import receipt, storage_scp
from .test_pacs_review import FAST, cli

RESULT = " -> SR "


def upload(orthanc, xray_sources, folder: Path, date: str, count: int) -> list[str]:
    sources = xray_sources["NORMAL"] + xray_sources["PNEUMONIA"]
    uids = []
    for index in range(count):
        path = xray_dicom(sources[index % len(sources)], folder / f"{date}-{index}.dcm", "DX",
                          patient_id=f"E{index}", study_date=date)
        orthanc.upload(path)
        uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return uids


def printed(out: str) -> set[str]:
    return {line.split()[0] for line in out.splitlines() if RESULT in line}


def test_a_run_ended_by_a_full_state_disk_has_printed_each_report_it_stored(orthanc, xray_sources, trained_run,
                                                                             tmp_path, capsys, monkeypatch):
    """The state file's disk filled after two reports were stored and recorded done: they were never printed
    (results came only after the whole pass), and the next run counts them "already scored"."""
    uids = upload(orthanc, xray_sources, tmp_path, "20221111", 4)
    record, done = ScoredState.record, []

    def record_until_full(self, sop, model, status, *args, **kwargs):
        if status == "done" and len(done) == 2:
            raise StateFileError("state.sqlite: cannot write the state file (database or disk is full)")
        record(self, sop, model, status, *args, **kwargs)
        done.extend([sop] if status == "done" else [])
    monkeypatch.setattr(ScoredState, "record", record_until_full)
    state = tmp_path / "state.sqlite"
    assert main(["pacs", str(trained_run), "--dicomweb", orthanc.dicomweb, "--state", str(state), *FAST,
                 "--study-date", "20221111", "--batch-size", "1"]) == 2
    out, err = capsys.readouterr()
    assert "disk is full" in err
    assert len(done) == 2 and printed(out) == set(done) and set(done) <= set(uids)


def test_a_run_ended_by_sigterm_has_printed_each_report_it_stored(orthanc, xray_sources, trained_run, tmp_path,
                                                                   monkeypatch):
    """SIGTERM to a run without --watch once it has recorded two reports done: each report recorded before the
    signal is printed (all but, at most, the one recorded as the signal came), standard output a pipe whose
    buffer the signal's exit does not flush."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    upload(orthanc, xray_sources, tmp_path, "20221112", 12)
    state = tmp_path / "state.sqlite"
    process = cli("pacs", str(trained_run), "--dicomweb", orthanc.dicomweb, "--state", str(state), *FAST,
                  "--study-date", "20221112", "--batch-size", "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def done() -> set[str]:
        try:
            with sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=1) as db:
                return {row[0] for row in db.execute("SELECT sop_instance_uid FROM instances WHERE status = 'done'")}
        except sqlite3.Error:  # not made yet, or being written
            return set()
    deadline = time.monotonic() + 120
    while len(done()) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before the signal: nothing to check"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    stored = done()
    assert "terminated (SIGTERM)" in err and len(stored) >= 2
    assert printed(out) <= stored and len(printed(out)) >= len(stored) - 1, (out, err)


def one_file_fails(monkeypatch, name: str, action: str):
    """``action`` ("move", "unlink") raising EROFS for the spooled file whose name starts with ``name`` only."""
    if action == "move":
        move = spool_intake.shutil.move

        def failing_move(source, target, *args, **kwargs):
            if Path(source).name.startswith(name):
                raise OSError(errno.EROFS, "Read-only file system", str(target))
            return move(source, target, *args, **kwargs)
        monkeypatch.setattr(spool_intake.shutil, "move", failing_move)
        return
    unlink = Path.unlink

    def failing_unlink(self, *args, **kwargs):
        if self.name.startswith(name):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return unlink(self, *args, **kwargs)
    monkeypatch.setattr(Path, "unlink", failing_unlink)


@pytest.mark.parametrize("kind", ["junk", "huge", "ct"])
def test_one_instance_the_spool_cannot_move_holds_back_only_itself(kind, trained_run, xray_sources, tmp_path,
                                                                  caplog, monkeypatch):
    """SPOOL/unreadable read-only: a junk file or one over --max-instance-mb (set aside unread), or a CT (not
    scored, deleted) in a batch with two X-rays. The failed move raised out of the batch, which was retried whole
    on every pass, its line naming neither the instance nor the reason; now the X-rays' reports go out and that
    instance has its own line, and stays in the spool for the next pass."""
    from pneumonia_cnn.inference import Predictor
    caplog.set_level(logging.INFO)
    answered = []
    port, server = storage_scp(lambda dataset: answered.append(str(dataset.PatientID)) or 0x0000)
    try:
        node = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", port, "DEST"),
                        spool=tmp_path / "spool", attempts=1, max_instance_mb=1, retry_after=30)
        incoming = tmp_path / "spool" / "incoming"
        for name in ("a", "b"):
            node._receive(receipt(xray_dicom(xray_sources["NORMAL"][0], tmp_path / f"{name}.dcm", patient_id=name)))
        if kind == "junk":
            (incoming / "junk.dcm").write_text("not an image\n")
            failing, action, line = "junk", "move", ("instance junk: unreadable: not a DICOM instance (no SOP "
                                                     "Instance UID); cannot be set aside in")
        elif kind == "huge":
            with open(incoming / "huge.dcm", "wb") as sparse:
                sparse.truncate(3 * 2**20)
            failing, action, line = "huge", "move", "instance huge: unreadable: 3.0 MB, above the 1 MB limit"
        else:
            path = xray_dicom(xray_sources["NORMAL"][1], tmp_path / "ct.dcm", patient_id="CT")
            routed = pydicom.dcmread(path)
            routed.Modality = "CT"
            routed.SOPClassUID = routed.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            routed.save_as(path)
            failing, action = str(routed.SOPInstanceUID), "unlink"
            node._receive(receipt(path))
            line = f"instance {failing}: not scored, but cannot be removed from the spool (Read-only file system)"
        one_file_fails(monkeypatch, failing, action)
        node._process(sorted(incoming.glob("*.dcm")))
        assert sorted(answered) == ["a", "b"] and len(node.sent) == 2  # the batch's reports went out
        left = [p.name for p in incoming.glob("*.dcm")]
        assert len(left) == 1 and left[0].startswith(failing)  # kept, for the next pass
        warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert warning.startswith(line) and "Read-only file system" in warning, warning
        assert "kept in" in warning and "tried again in 30 s" in warning
        assert [p.name for _, p in node.later] == left  # not queued again by the rescan meanwhile
    finally:
        server.shutdown()


def test_a_file_put_into_the_spool_by_hand_is_named_by_its_uid():
    assert uid_of(Path("1.2.3.4.dcm")) == "1.2.3.4"  # was "1.2.3"
    assert uid_of(Path("1.2.840.99.0a1b2c3d4e5f.dcm")) == "1.2.840.99"  # a receipt: its suffix dropped
    assert uid_of(Path("notes.dcm")) == "notes"
