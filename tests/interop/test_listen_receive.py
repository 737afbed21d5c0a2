"""``listen`` writes each instance to a file as it arrives (pynetdicom's chunked receiving) instead of gathering
it in memory; refuses one above ``--max-instance-mb``; and a sender that dies inside an instance leaves no
file behind and a line in the log. The sender is a process of its own (tests/interop/storescu.py)."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import pydicom
import pytest
from PIL import Image

from pneumonia_cnn.interop.listener import Destination, Listener

from .orthanc import free_port
from .studies import xray_dicom
from .test_listen import receipt

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.fixture
def node(trained_run, tmp_path, monkeypatch, caplog):
    """A node whose worker only records what it is given (receiving alone is measured), and the folder instances
    arrive in (SPOOL/receiving: the tests assert that nothing is left there; pynetdicom's own temporary folder is
    one of the test's, so that a file written there instead shows too)."""
    from pneumonia_cnn.inference import Predictor
    caplog.set_level(logging.INFO)
    arriving = tmp_path / "arriving"
    arriving.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(arriving))
    listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", free_port(), "NOBODY"),
                        port=free_port(), spool=tmp_path / "spool", max_instance_mb=40)
    listener.given = []
    listener._process = listener.given.extend
    listener.start(block=False)
    yield listener, listener.spool / "receiving"
    listener.stop()
    assert not list(arriving.iterdir())  # nothing went to the system's temporary folder


def large_xray(source, target, side: int, height: int | None = None):
    """A real X-ray resampled to side x height 12-bit pixels: 2 bytes each (4096 x 4096: 32 MB)."""
    gray = np.asarray(Image.open(source).convert("L").resize((side, height or side)))
    return xray_dicom(gray, target, "DX", patient_id="BIG")


def send(path, port: int, *options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.interop.storescu", str(path), str(port), *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def eventually(condition, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_an_instance_is_received_into_a_file_not_into_memory(node, xray_sources, tmp_path, caplog):
    """32 MB of pixels arrive while the node's Python allocations stay under 8 MB (received in memory, the
    data set was gathered whole and then copied to encode it: 64 MB and more); the spooled file holds the very
    pixels sent; an aborted association gets its line."""
    listener, arriving = node
    path = large_xray(xray_sources["PNEUMONIA"][0], tmp_path / "big.dcm", 4096)
    tracemalloc.start()
    try:
        answer = send(path, listener.address[1], "--abort")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert answer.stdout.strip() == "0x0000", answer.stderr
    assert peak < 8 * 2**20, f"{peak:,} bytes"
    spooled = list((listener.spool / "incoming").glob("*.dcm"))
    assert len(spooled) == 1 and eventually(lambda: listener.given == spooled)
    sent, kept = pydicom.dcmread(path), pydicom.dcmread(spooled[0])
    assert kept.SOPInstanceUID == sent.SOPInstanceUID and kept.PixelData == sent.PixelData
    assert oct(spooled[0].stat().st_mode & 0o777) == "0o600"  # a patient's image
    assert eventually(lambda: "association with TESTSCU (127.0.0.1:" in caplog.text and " aborted" in caplog.text)
    assert not list(arriving.iterdir())


def test_an_instance_above_the_limit_is_aborted_as_it_arrives_and_not_kept(node, xray_sources, tmp_path, caplog):
    """48 MB under a 40 MB limit: the association is aborted once 40 MB of the data set have arrived, so the
    disk never held the other 8; nothing is kept."""
    listener, arriving = node
    path = large_xray(xray_sources["NORMAL"][0], tmp_path / "huge.dcm", 4096, 6144)  # 48 MB
    answer = send(path, listener.address[1])
    assert answer.stdout.strip() == "none", answer.stderr  # no status: the association was aborted
    assert re.search(r"instance from TESTSCU \(127\.0\.0\.1:\d+\): aborted as it arrived: more than 40 MB "
                     r"\(--max-instance-mb\)$", caplog.text, re.M), caplog.text
    assert eventually(lambda: "ended inside an instance" in caplog.text)
    held = re.search(r"ended inside an instance \(([0-9.]+) MB received\)", caplog.text)
    assert 20 < float(held.group(1)) <= 40.1, caplog.text  # at most the limit written, never the 48
    assert not list((listener.spool / "incoming").iterdir()) and not listener.given
    assert eventually(lambda: not list(arriving.iterdir()))


def test_a_complete_instance_above_the_limit_is_refused_with_a700(node, xray_sources, tmp_path, caplog):
    """The guard behind the abort (an instance whose file passes the limit only with the file meta information
    written before it): the arrival count set beyond it, the received file is measured and refused with a status."""
    listener, arriving = node
    listener.arrival.limit = 2**40
    path = large_xray(xray_sources["NORMAL"][0], tmp_path / "huge.dcm", 4096, 6144)  # 48 MB
    answer = send(path, listener.address[1])
    assert answer.stdout.strip() == "0xA700", answer.stderr  # refused: out of resources
    refused = re.search(r"from TESTSCU: refused: ([0-9.]+) MB, above the 40 MB limit \(--max-instance-mb\)$",
                        caplog.text, re.M)
    assert refused and 47.9 < float(refused.group(1)) < 48.1, caplog.text
    assert not list((listener.spool / "incoming").iterdir()) and not listener.given
    assert eventually(lambda: not list(arriving.iterdir()))


def test_a_pdu_announced_larger_than_the_node_reads_is_refused_unread(node, xray_sources, tmp_path, caplog):
    """An association request announced as 300 MB, 24 MB of it streamed: the node closes the connection
    without gathering it (pynetdicom alone held all that arrived, 2x: 48 MB and more) and goes on receiving."""
    import socket
    import struct
    listener, _ = node
    tracemalloc.start()
    try:
        with socket.create_connection(listener.address) as peer:
            peer.sendall(struct.pack(">BBL", 0x01, 0, 300 * 2**20))
            with contextlib.suppress(OSError):  # the node closes its end: the rest finds a broken pipe
                for _ in range(24):
                    peer.sendall(bytes(2**20))
        assert eventually(lambda: "a PDU of 314572800 bytes announced, above the 4 MB read here: closed" in caplog.text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak:,} bytes"
    path = large_xray(xray_sources["NORMAL"][0], tmp_path / "small.dcm", 256)
    assert send(path, listener.address[1]).stdout.strip() == "0x0000"


def test_fragments_are_read_from_p_data_pdus_only():
    from pneumonia_cnn.interop.arrival import fragments
    data_last = (6).to_bytes(4, "big") + bytes([1, 0x02]) + b"abcd"  # a data set's last fragment, 4 bytes
    command = (4).to_bytes(4, "big") + bytes([1, 0x03]) + b"xy"  # a command's last fragment
    data_more = (7).to_bytes(4, "big") + bytes([3, 0x00]) + b"12345"
    items = data_last + command + data_more
    pdu = bytes([0x04, 0]) + len(items).to_bytes(4, "big") + items
    assert fragments(pdu) == [(False, 4, True), (True, 2, True), (False, 5, False)]
    assert fragments(bytes([0x02, 0]) + pdu[2:]) == []  # an A-ASSOCIATE-AC is no data
    assert fragments(pdu[:6] + (1).to_bytes(4, "big") + b"\0\0") == []  # a lying item length


def test_a_command_set_that_never_ends_is_aborted(node, caplog):
    """pynetdicom gathers command fragments in memory and they were not counted: 64 MB of them left 65.7 MB
    on the node. A command set passing 64 KB now ends the association."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation as DX
    listener, _ = node
    sender = AE(ae_title="TESTSCU")
    sender.add_requested_context(DX)
    association = sender.associate("127.0.0.1", listener.address[1], ae_title="PNEUMONIA")
    assert association.is_established
    context = association.accepted_contexts[0].context_id
    item = (16_002).to_bytes(4, "big") + bytes([context, 0x01]) + bytes(16_000)  # a command fragment, never last
    pdu = bytes([0x04, 0]) + len(item).to_bytes(4, "big") + item
    tracemalloc.start()
    try:
        with contextlib.suppress(OSError):
            for _ in range(1000):  # 16 MB of command set
                association.dul.socket.send(pdu)
        assert eventually(lambda: "aborted as it arrived: a command set of more than 64 KB" in caplog.text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        association.abort()
    assert peak < 8 * 2**20, f"{peak:,} bytes"


def test_a_sender_that_dies_inside_an_instance_leaves_nothing_behind(node, xray_sources, tmp_path, caplog):
    listener, arriving = node
    path = large_xray(xray_sources["NORMAL"][1], tmp_path / "cut.dcm", 4096)
    answer = send(path, listener.address[1], "--die-after", str(4 * 2**20))
    assert answer.returncode == 3 and not answer.stdout
    assert eventually(lambda: "connection with TESTSCU (127.0.0.1:" in caplog.text)
    cut = re.search(r"ended inside an instance \(([0-9.]+) MB received\): discarded, not acknowledged$",
                    caplog.text, re.M)
    assert cut and 1 <= float(cut.group(1)) < 32, caplog.text  # it died after 4 MB of the 32
    assert not list(arriving.iterdir()) and not list((listener.spool / "incoming").iterdir())
    assert not listener.given



def test_an_instance_whose_sop_class_is_not_an_image_is_not_scored_whatever_its_modality(trained_run, xray_sources,
                                                                                        tmp_path, caplog):
    """A report or a document carrying pixel data and Modality DX was scored as an X-ray; its SOP class says
    what it is. An image class pydicom does not know (a vendor's private one) is left to the reader."""
    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.interop.scoring import not_an_xray
    caplog.set_level(logging.INFO)
    listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", free_port(), "NOBODY"),
                        spool=tmp_path / "spool", attempts=1, retry_after=3600)
    classes = {"1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
               "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage"}
    for number, sop_class in enumerate(classes):
        path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / f"{number}.dcm", "DX", patient_id=f"S{number}")
        dataset = pydicom.dcmread(path)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = sop_class
        dataset.save_as(path, enforce_file_format=True)
        assert listener._receive(receipt(path)) == 0x0000
    listener._process(sorted((tmp_path / "spool" / "incoming").glob("*.dcm")))
    for name in classes.values():
        assert f"not scored (SOP class {name} is not an image)" in caplog.text
    assert not listener.sent and not list((tmp_path / "spool" / "incoming").iterdir())
    private = pydicom.dcmread(xray_dicom(xray_sources["NORMAL"][0], tmp_path / "p.dcm", "DX"))
    private.SOPClassUID = "1.3.6.1.4.1.9999.1.1"
    assert not_an_xray(private) is None
    private.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    assert not_an_xray(private) is None


def test_a_report_moved_back_from_refused_is_sent_without_a_restart(trained_run, xray_sources, tmp_path, caplog):
    """The docs said: move it back and restart the node. The worker now looks at the spool every --retry-after
    seconds and queues what it does not know of, once: here a report set aside after refusals, moved back once
    the destination was fixed, and a receipt already waiting for its retry, which is not queued twice."""
    from pneumonia_cnn.inference import Predictor

    from .test_listen import storage_scp
    caplog.set_level(logging.INFO)
    answered, fixed = [], []
    port, server = storage_scp(lambda dataset: answered.append(str(dataset.PatientID)) or (
        0x0000 if fixed else 0xC000))
    listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", port, "DEST"), port=free_port(),
                        spool=tmp_path / "spool", attempts=1, give_up_after=1, retry_after=0.5)
    try:
        path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX", patient_id="BACK")
        assert listener._receive(receipt(path)) == 0x0000
        listener.start(block=False)
        refused = tmp_path / "spool" / "refused"
        assert eventually(lambda: len(list(refused.glob("*.dcm"))) == 1) and answered == ["BACK"]
        fixed.append(True)
        moved = next(refused.glob("*.dcm"))
        moved.rename(listener.incoming / moved.name)
        assert eventually(lambda: len(listener.sent) == 1)
        assert answered == ["BACK", "BACK"] and not list(listener.incoming.iterdir())
        assert f"instance {moved.name.rsplit('.', 2)[0]}: found in " in caplog.text
        waiting = listener.incoming / "1.2.3.waiting.dcm"
        listener.later.append((time.monotonic() + 3600, waiting))  # first: a rescan in between would queue it
        waiting.write_bytes(b"")
        time.sleep(1.2)  # two rescans
        assert listener.queue.empty() and "instance 1.2.3: found in" not in caplog.text
    finally:
        listener.stop()
        server.shutdown()


def test_refusal_counts_survive_a_restart(trained_run, xray_sources, tmp_path, caplog):
    """The counts lived in memory: a node restarted every night never reached --give-up-after and tried a
    refused report forever. They are kept in SPOOL/refusals.json, for the files still spooled."""
    import json

    from pneumonia_cnn.inference import Predictor

    from .test_listen import storage_scp
    caplog.set_level(logging.INFO)
    port, server = storage_scp(lambda dataset: 0xC000)  # refuses every report
    predictor = Predictor(trained_run, "cpu")
    try:
        def node():
            return Listener(predictor, Destination("127.0.0.1", port, "DEST"), spool=tmp_path / "spool", attempts=1,
                            give_up_after=2)
        first = node()
        path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX", patient_id="NIGHTLY")
        assert first._receive(receipt(path)) == 0x0000
        spooled = sorted(first.incoming.glob("*.dcm"))
        first._process(spooled)
        kept = json.loads((tmp_path / "spool" / "refusals.json").read_text())
        assert kept == {spooled[0].name: 1}
        second = node()  # the restart
        assert second.refusals == {spooled[0].name: 1}
        second._process(spooled)
        assert [p.name for p in second.refused.glob("*.dcm")] == [spooled[0].name]  # refused twice: set aside
        assert json.loads((tmp_path / "spool" / "refusals.json").read_text()) == {}
        (tmp_path / "spool" / "refusals.json").write_text("[1, 2]")  # damaged: counting starts again
        assert node().refusals == {}
    finally:
        server.shutdown()
