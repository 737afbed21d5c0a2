"""How a ``listen`` node starts and stops: its options and spool checked before the model loads, the port bound
before anything in the spool is touched, one node per spool, SIGTERM and Ctrl-C stopping it cleanly, and a
destination's rejection of the node named in the log."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.interop.listener import Destination, Listener

from .orthanc import free_port
from .studies import xray_dicom
from .test_listen import PROJECT_SRC, c_store, wait_for_port


@pytest.fixture(scope="module")
def predictor(trained_run):
    from pneumonia_cnn.inference import Predictor
    return Predictor(trained_run, "cpu")


def nowhere() -> Destination:
    return Destination("127.0.0.1", free_port(), "NOBODY")


@pytest.mark.parametrize("options, message", [
    (["--send-to", "127.0.0.1:4242:OR\\TH"], "error: --send-to 'OR\\\\TH': an AE title has 1 to 16 printable ASCII"),
    (["--send-to", "127.0.0.1:4242:    "], "error: --send-to '    ': an AE title has 1 to 16 printable ASCII"),
    (["--send-to", "127.0.0.1:4242:PACS", "--ae-title", "A\\B"], "error: --ae-title 'A\\\\B': an AE title has"),
])
def test_an_ae_title_dicom_cannot_carry_is_refused_at_start(tmp_path, capsys, options, message):
    """A backslash in --send-to's AE title started the node; every delivery then failed in pynetdicom, forever.
    Said before the model loads (this one does not exist)."""
    assert main(["listen", str(tmp_path / "missing.pt"), "--spool", str(tmp_path / "spool"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err


def test_a_spool_that_cannot_be_one_is_said_before_the_model_loads(tmp_path, capsys):
    """Named with --spool, before the checkpoint is even read (it does not exist here)."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "incoming").write_text("x")
    for spool, reason in (("file", "Not a directory: a file is in the way"), ("blocked", "File exists: a file is in "
                                                                                           "the way")):
        assert main(["listen", str(tmp_path / "missing.pt"), "--send-to", "127.0.0.1:4242:PACS",
                     "--spool", str(tmp_path / spool)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --spool {tmp_path / spool}: cannot make ") and err.endswith(f"({reason})"), err


def test_a_port_in_use_leaves_the_spool_untouched(predictor, xray_sources, tmp_path):
    """The worker started, and sent what the spool held, before the port was found in use."""
    first = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "first").start(block=False)
    try:
        second = Listener(predictor, nowhere(), port=first.address[1], spool=tmp_path / "second")
        waiting = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "second" / "incoming" / "1.2.3.abc.dcm", "DX")
        with pytest.raises(PneumoniaCNNError, match=r"cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            second.start(block=False)
        assert second.worker is None and waiting.exists()
        third = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "second")
        third.start(block=False)  # the lock of the node that failed to start was released
        third.stop()
    finally:
        first.stop()


def test_one_node_per_spool(predictor, tmp_path, capsys):
    first = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool").start(block=False)
    try:
        second = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool")
        with pytest.raises(PneumoniaCNNError, match="another listen node is using this spool"):
            second.start(block=False)
        assert second.worker is None
        # the command says so before it loads a model (this one does not even exist)
        assert main(["listen", str(tmp_path / "missing.pt"), "--send-to", "127.0.0.1:4242:PACS",
                     "--spool", str(tmp_path / "spool")]) == 2
        assert "another listen node is using this spool" in capsys.readouterr().err
    finally:
        first.stop()


def test_a_partial_instance_left_by_a_killed_node_is_removed_when_the_next_one_starts(predictor, tmp_path, caplog):
    """A node killed while moving a received instance into the spool (TMPDIR on another file system: a copy)
    left SPOOL/incoming/.UID.dcm.RANDOM.tmp, part of a patient's image, for good; its sender was never
    acknowledged and sends it again. A second node refused on the same spool removes nothing."""
    caplog.set_level(logging.INFO)
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    partial = incoming / ".1.2.3.4.0123456789ab.dcm.kecrzia4.tmp"
    partial.write_bytes(b"DICM" + bytes(1000))
    (incoming / "notes.txt.tmp").write_text("not ours\n")  # only the node's own temporary names
    (incoming / ".x.dcm.abc.tmp").mkdir()  # a folder of that name is left, and does not stop the node
    node = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool").start(block=False)
    try:
        assert not partial.exists() and (incoming / "notes.txt.tmp").exists()
        assert "1 partial instance(s) left in" in caplog.text
        partial.write_bytes(b"DICM")  # one being received right now by the running node
        with pytest.raises(PneumoniaCNNError, match="another listen node"):
            Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool").start(block=False)
        assert partial.exists()
    finally:
        node.stop()


def test_a_destination_that_rejects_the_node_is_named_with_its_reason(predictor, xray_sources, tmp_path, caplog):
    """"Not registered in the PACS" read like a network outage: "was rejected, aborted or never connected"."""
    from pynetdicom import AE, AllStoragePresentationContexts
    caplog.set_level(logging.INFO)
    strict = AE(ae_title="STRICT")
    strict.supported_contexts = AllStoragePresentationContexts
    strict.require_calling_aet = ["SOMEONE"]
    port = free_port()
    server = strict.start_server(("127.0.0.1", port), block=False)
    node = Listener(predictor, Destination("127.0.0.1", port, "STRICT"), port=free_port(), spool=tmp_path / "s",
                    attempts=1, retry_after=3600).start(block=False)
    try:
        assert c_store(xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX"), node.address[1]) == 0
        deadline = time.monotonic() + 60
        while "kept in the spool" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.1)
    finally:
        node.stop()
        server.shutdown()
    assert f"STRICT@127.0.0.1:{port} rejected the association (Rejected Permanent: Calling AE title not " \
           "recognised; from the Service User)" in caplog.text


@pytest.mark.parametrize("stop_signal, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_stops_the_node_and_says_what_is_left(trained_run, xray_sources, tmp_path, stop_signal, status):
    """SIGTERM (systemd's stop): exit 0; Ctrl-C: 130; both stop taking associations, finish the batch being
    scored and say how many instances wait in the spool. Before, SIGTERM ended it with no line at all."""
    spool, port = tmp_path / "spool", free_port()
    xray_dicom(xray_sources["NORMAL"][0], spool / "incoming" / "1.2.3.abc.dcm", "DX")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PROJECT_SRC, os.environ.get("PYTHONPATH", "")]))
    node = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "listen", str(trained_run), "--port", str(port),
                             "--send-to", f"127.0.0.1:{free_port()}:NOBODY", "--spool", str(spool), "--device", "cpu",
                             "--retries", "0", "--retry-after", "3600"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_port(port, node)
        time.sleep(2)  # its first delivery fails: the instance stays in the spool
        node.send_signal(stop_signal)
        _, err = node.communicate(timeout=60)
    finally:
        node.kill()
    assert node.returncode == status, err
    assert f"stopped; 1 instance(s) in {spool / 'incoming'} go out at the next start" in err
    assert ("SIGTERM: stopping" in err) == (stop_signal == signal.SIGTERM) and "Traceback" not in err
    assert (spool / "incoming" / "1.2.3.abc.dcm").exists()


def test_junk_put_in_the_spool_is_set_aside_not_deleted(predictor, tmp_path, caplog):
    """An empty or text file in SPOOL/incoming was deleted as "not scored (modality missing ...)"; a dangling
    link was "found ... queued" again at every rescan, forever."""
    caplog.set_level(logging.INFO)
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "empty.dcm").write_bytes(b"")
    (incoming / "notes.dcm").write_text("not an image\n")
    (incoming / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    node = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool")
    node._pick_up_moved_back()
    node._process([incoming / "empty.dcm", incoming / "notes.dcm"])
    assert not list(incoming.iterdir())
    unreadable = tmp_path / "spool" / "unreadable"
    assert sorted(p.name for p in unreadable.iterdir()) == [".reasons", "empty.dcm", "gone.dcm", "notes.dcm"]
    assert (unreadable / ".reasons" / "notes.dcm.txt").read_text() == "not a DICOM instance (no SOP Instance UID)\n"
    assert (unreadable / "gone.dcm").is_symlink()  # the link itself moved, nothing it points to read
    assert "instance gone: unreadable: not a regular file (a link, a folder or a device): not read" in caplog.text
    assert "instance notes: unreadable: not a DICOM instance (no SOP Instance UID)" in caplog.text


def test_a_file_above_the_instance_limit_put_in_the_spool_is_set_aside_unread(predictor, tmp_path, caplog):
    """Files put into SPOOL/incoming by hand pass no arrival limit: a sparse 3 GB file held the worker while
    pydicom read it."""
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    with open(incoming / "huge.dcm", "wb") as sparse:
        sparse.truncate(3 * 2**30)
    node = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool", max_instance_mb=256)
    start = time.monotonic()
    node._process([incoming / "huge.dcm"])
    assert time.monotonic() - start < 2
    assert [p.name for p in (tmp_path / "spool" / "unreadable").glob("*.dcm")] == ["huge.dcm"]
    assert "instance huge: unreadable: 3072.0 MB, above the 256 MB limit (--max-instance-mb)" in caplog.text


def test_a_file_moved_away_while_the_worker_lists_the_spool_is_passed_over(predictor, tmp_path, monkeypatch):
    """It was set aside with a move that failed, and the exception ended the worker: the node went on
    acknowledging images it never scored."""
    from pathlib import Path
    node = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool")
    (node.incoming / "1.2.3.abc.dcm").write_bytes(b"x")
    listed = Path.glob

    def listed_then_moved_away(self, pattern):
        found = list(listed(self, pattern))
        for path in found:
            path.unlink()  # the operator moved it between the listing and the look at it
        return iter(found)
    monkeypatch.setattr(Path, "glob", listed_then_moved_away)
    node._pick_up_moved_back()
    assert node.queue.empty() and not list(node.unreadable.iterdir())


def test_stop_from_another_thread_ends_a_blocking_start_and_sigterm_is_handed_back(predictor, tmp_path):
    """start(block=True) waited for a SIGTERM only, and left its own handler in place once it returned."""
    import threading
    before = signal.getsignal(signal.SIGTERM)
    node = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool")
    threading.Timer(1.0, node.stop).start()
    fallback = threading.Timer(15.0, os.kill, (os.getpid(), signal.SIGTERM))  # ends the wait if stop() cannot
    fallback.start()
    started = time.monotonic()
    try:
        node.start(block=True)
    finally:
        fallback.cancel()
    assert time.monotonic() - started < 10 and node.lock is None and node.server is None
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_instance_whose_uid_is_not_one_is_set_aside_not_reported(predictor, xray_sources, tmp_path, caplog):
    """"not-a-uid\\n../../evil" was reported as "not-a-uid../../evil": a report referencing nothing, which a
    validating PACS refuses (and the node then set it aside after three passes)."""
    import pydicom
    caplog.set_level(logging.INFO)
    node = Listener(predictor, nowhere(), port=free_port(), spool=tmp_path / "spool")
    source = pydicom.dcmread(xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX"))
    source.SOPInstanceUID = "not-a-uid"
    source.save_as(node.incoming / "odd.dcm")
    node._process([node.incoming / "odd.dcm"])
    assert (node.unreadable / "odd.dcm").exists() and not node.sent
    assert "unreadable: its SOPInstanceUID is not a valid UID (not-a-uid): a report could not reference it" \
        in caplog.text
