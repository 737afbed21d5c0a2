"""``listen`` after a hostile review: a destination's warning or "duplicate" status for a report it stored, a
spool that cannot delete a delivered report's file, a temporary folder that fills or is gone while instances
arrive, and images of other modalities' SOP classes carrying Modality CR or DX."""
from __future__ import annotations

import logging
import resource
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumonia_cnn.interop.dicom_send import Destination, ReportRefused, send_c_store
from pneumonia_cnn.interop.listener import Listener
from pneumonia_cnn.interop.scoring import not_an_xray

from .orthanc import free_port
from .studies import xray_dicom
from .test_listen import receipt, storage_scp


@pytest.fixture(scope="module")
def predictor(trained_run):
    from pneumonia_cnn.inference import Predictor
    return Predictor(trained_run, "cpu")


def a_report(uid: str | None = None) -> Dataset:
    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    report.SOPInstanceUID = uid or generate_uid()
    report.Modality, report.PatientID = "SR", "R1"
    return report


# ---------- 1. statuses that mean "stored"
@pytest.mark.parametrize("code", [0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007])
def test_every_warning_status_is_a_stored_report_with_its_line(code, caplog):
    """0x0107 (Attribute List Error) and 0x0116 are warnings: the report was stored, and was filed as refused
    (three times, then moved to SPOOL/refused) because only 0000, B000, B006 and B007 counted."""
    caplog.set_level(logging.INFO)
    port, server = storage_scp(lambda dataset: code)
    try:
        report = a_report()
        send_c_store("NODE", Destination("127.0.0.1", port, "DEST"), [report])
    finally:
        server.shutdown()
    lines = [r.getMessage() for r in caplog.records if report.SOPInstanceUID in r.getMessage()]
    assert len(lines) == 1 and f"stored with warning status 0x{code:04X}" in lines[0], caplog.text


def test_a_duplicate_is_the_same_report_and_taken_as_delivered(caplog):
    """0x0111 for a report this process never sent unanswered: a report's UID comes from its source instance,
    the model and what it states, so the destination holds this very report (an earlier run's). It had been
    refused while the UID ignored the result; a failure status still is."""
    caplog.set_level(logging.INFO)
    answers = {"D": 0x0111, "F": 0xC000}
    port, server = storage_scp(lambda dataset: answers[dataset.PatientID])
    try:
        duplicate, failed = a_report(), a_report()
        duplicate.PatientID, failed.PatientID = "D", "F"
        send_c_store("NODE", Destination("127.0.0.1", port, "DEST"), [duplicate])
        with pytest.raises(ReportRefused, match="status 0xC000"):
            send_c_store("NODE", Destination("127.0.0.1", port, "DEST"), [failed])
    finally:
        server.shutdown()
    assert (f"{duplicate.SOPInstanceUID} with status 0x0111 (Duplicate SOP Instance): the destination holds this "
            f"very report") in caplog.text


def test_a_report_stored_but_its_answer_lost_is_not_set_aside_when_resent(predictor, xray_sources, tmp_path, caplog):
    """/tmp/h2/status_dest.py 0x0111dup: the destination stores the report and the association drops before
    its answer; the retry gets 0x0111 (it holds that very UID). The node set the report aside in SPOOL/refused."""
    caplog.set_level(logging.INFO)
    seen = []

    def answer(event):
        seen.append(str(event.request.AffectedSOPInstanceUID))
        if len(seen) == 1:
            event.assoc.abort()  # stored, but the answer is lost
            return 0x0000
        return 0x0111
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    destination = AE(ae_title="DEST")
    destination.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, answer)])
    try:
        listener = Listener(predictor, Destination("127.0.0.1", port, "DEST"), spool=tmp_path / "spool",
                            attempts=3, backoff=0.05, give_up_after=1)
        assert listener._receive(receipt(xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX"))) == 0
        listener._process(sorted((tmp_path / "spool" / "incoming").glob("*.dcm")))
    finally:
        server.shutdown()
    assert len(seen) == 2 and len(listener.sent) == 1
    assert not any(list((tmp_path / "spool" / name).iterdir()) for name in ("incoming", "refused"))


# ---------- 2. a delivered report whose spool file cannot be removed
def test_a_spool_that_cannot_delete_a_delivered_file_costs_no_report_and_sends_none_twice(
        predictor, xray_sources, tmp_path, caplog, monkeypatch):
    """A read-only spool: the unlink after the first delivery raised out of the batch ("scoring 3 spooled
    instance(s) failed ([Errno 30] ...)"), the other reports were never sent and the retry sent the first again."""
    caplog.set_level(logging.INFO)
    stored = []
    port, server = storage_scp(lambda dataset: stored.append(str(dataset.SOPInstanceUID)) or 0x0000)
    incoming = tmp_path / "spool" / "incoming"
    unlink = Path.unlink

    def read_only(path, missing_ok=False):
        if path.parent == incoming:
            raise OSError(30, "Read-only file system", str(path))
        return unlink(path, missing_ok)
    try:
        listener = Listener(predictor, Destination("127.0.0.1", port, "DEST"), spool=tmp_path / "spool",
                            attempts=1, retry_after=3600)
        for number in range(3):
            path = xray_dicom(xray_sources["NORMAL"][number % 2], tmp_path / f"{number}.dcm", "DX",
                              patient_id=f"RO{number}")
            assert listener._receive(receipt(path)) == 0x0000
        listener.queue.queue.clear()  # given to _process here, not through the worker's queue
        monkeypatch.setattr(Path, "unlink", read_only)
        listener._process(sorted(incoming.glob("*.dcm")))
        assert len(stored) == 3 and len(listener.sent) == 3
        assert "spooled instance(s) failed" not in caplog.text and not listener.later
        lines = [r.getMessage() for r in caplog.records if "cannot be removed" in r.getMessage()]
        names = [path.name for path in incoming.glob("*.dcm")]
        assert len(lines) == 3 and all("WAS delivered to DEST@" in line for line in lines)
        assert all(any(name in line for line in lines) for name in names)
        listener._pick_up_moved_back()  # the next pass over the spool, still read-only
        listener._process(sorted(incoming.glob("*.dcm")))
        assert len(stored) == 3 and listener.queue.empty()
        monkeypatch.undo()  # writable again: the next pass removes them, sending nothing
        listener._pick_up_moved_back()
        assert len(stored) == 3 and not list(incoming.iterdir()) and listener.queue.empty()
    finally:
        server.shutdown()


# ---------- 3. the received data's temporary files
def send(path, port: int, timeout: float = 15) -> str:
    from pynetdicom import AE
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title="TESTSCU")
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = timeout
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title="PNEUMONIA")
    assert association.is_established
    try:
        status = association.send_c_store(dataset)
        return f"0x{status.Status:04X}" if "Status" in status else "none"
    finally:
        if association.is_established:
            association.release()


def echo(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", port, ae_title="PNEUMONIA")
    try:
        return association.is_established and association.send_c_echo().Status == 0
    finally:
        association.release()


@pytest.fixture
def receiving_node(predictor, tmp_path, monkeypatch, caplog):
    """A node whose worker only records what it is given; the process's temporary folder is gone."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    leftover = tmp_path / "spool" / "receiving" / "tmpk2j4h7xa.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"DICM" + bytes(100))  # left by a node killed while receiving
    listener = Listener(predictor, Destination("127.0.0.1", free_port(), "NOBODY"), port=free_port(),
                        spool=tmp_path / "spool")
    listener.given = []
    listener._process = listener.given.extend
    listener.start(block=False)
    assert not leftover.exists() and "1 partial instance(s)" in caplog.text
    yield listener
    listener.stop()


def square_xray(source, target, side: int):
    gray = np.asarray(Image.open(source).convert("L").resize((side, side)))
    return xray_dicom(gray, target, "DX", patient_id="TMP")


def test_instances_are_received_into_the_spool_not_the_temporary_folder(receiving_node, xray_sources, tmp_path):
    """pynetdicom wrote each arriving instance to TMPDIR: a TMPDIR that is gone (or full) hung every
    association with no status, and C-ECHO still answered."""
    path = square_xray(xray_sources["NORMAL"][0], tmp_path / "x.dcm", 256)
    assert send(path, receiving_node.address[1]) == "0x0000"
    assert len(list((receiving_node.spool / "incoming").glob("*.dcm"))) == 1
    assert not list((receiving_node.spool / "receiving").iterdir())


def test_a_write_that_fails_while_an_instance_arrives_aborts_its_association_with_one_line(
        receiving_node, xray_sources, tmp_path, caplog, monkeypatch):
    """A disk that fills while an instance arrives (here: the process may write no file past 1 MB): the
    connection's thread died with a traceback, the association hung with no status and the partial file stayed."""
    import threading
    died = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    path = square_xray(xray_sources["PNEUMONIA"][0], tmp_path / "big.dcm", 2048)  # 8 MB
    previous_signal = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, not death
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, previous_limit[1]))
    try:
        started = time.monotonic()
        answer = send(path, receiving_node.address[1], timeout=20)
        took = time.monotonic() - started
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_signal)
    assert answer == "none" and took < 10, (answer, took, caplog.text)  # aborted at once, not after a timeout
    lines = [r.getMessage() for r in caplog.records if "cannot be received" in r.getMessage()]
    assert len(lines) == 1 and "File too large" in lines[0] and "aborted" in lines[0], caplog.text
    assert not died and "Traceback" not in caplog.text
    deadline = time.monotonic() + 10
    while list((receiving_node.spool / "receiving").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((receiving_node.spool / "receiving").iterdir())
    assert not list((receiving_node.spool / "incoming").iterdir()) and not receiving_node.given
    assert echo(receiving_node.address[1])
    small = square_xray(xray_sources["NORMAL"][1], tmp_path / "small.dcm", 128)
    assert send(small, receiving_node.address[1]) == "0x0000"


# ---------- 4. the SOP class decides, not only Modality
OTHER_MODALITIES = {
    "1.2.840.10008.5.1.4.1.1.2": "CR",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": "DX",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4": "CR",  # MR
    "1.2.840.10008.5.1.4.1.1.1.2": "DX",  # Digital Mammography X-Ray, for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1": "DX",  # Digital Mammography X-Ray, for processing
    "1.2.840.10008.5.1.4.1.1.6.1": "DX",  # Ultrasound
    "1.2.840.10008.5.1.4.1.1.20": "CR",  # Nuclear Medicine
    "1.2.840.10008.5.1.4.1.1.128": "DX",  # PET
    "1.2.840.10008.5.1.4.1.1.1.3": "DX",  # Digital Intra-Oral X-Ray
    "1.2.840.10008.5.1.4.1.1.12.1": "DX",  # X-Ray Angiographic
}
XRAYS = ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"]


def test_images_of_other_modalities_classes_are_not_x_rays_whatever_their_modality():
    for sop_class, modality in OTHER_MODALITIES.items():
        dataset = Dataset()
        dataset.SOPClassUID, dataset.Modality = sop_class, modality
        reason = not_an_xray(dataset)
        assert reason and pydicom.uid.UID(sop_class).name in reason and f"Modality {modality}" in reason, sop_class
    for sop_class in XRAYS:
        dataset = Dataset()
        dataset.SOPClassUID, dataset.Modality = sop_class, "DX"
        assert not_an_xray(dataset) is None, sop_class


def test_a_ct_with_modality_cr_is_acknowledged_and_not_scored(predictor, xray_sources, tmp_path, caplog):
    """A CT slice with Modality CR and a mammogram with Modality DX were scored as chest X-rays."""
    caplog.set_level(logging.INFO)
    listener = Listener(predictor, Destination("127.0.0.1", free_port(), "NOBODY"), spool=tmp_path / "spool",
                        attempts=1, retry_after=3600)
    uids = []
    for number, (sop_class, modality) in enumerate([("1.2.840.10008.5.1.4.1.1.2", "CR"),
                                                    ("1.2.840.10008.5.1.4.1.1.1.2", "DX")]):
        path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / f"{number}.dcm", modality, patient_id=f"M{number}")
        dataset = pydicom.dcmread(path)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = sop_class
        dataset.save_as(path, enforce_file_format=True)
        uids.append(str(dataset.SOPInstanceUID))
        assert listener._receive(receipt(path)) == 0x0000
    listener._process(sorted((tmp_path / "spool" / "incoming").glob("*.dcm")))
    assert not listener.sent and not list((tmp_path / "spool" / "incoming").iterdir())
    assert f"instance {uids[0]}: not scored (SOP class CT Image Storage" in caplog.text
    assert f"instance {uids[1]}: not scored (SOP class Digital Mammography X-Ray Image Storage" in caplog.text


@pytest.mark.parametrize("code", [0xA700, 0xA7FF, 0x0213])
def test_a_busy_destination_is_tried_again_not_refused(code):
    """Out of resources (A7xx) and the general "resource limitation" (0213) say the destination is busy, not that
    the report is wrong: the link's failure, retried with back-off; 0213 had counted as a refusal."""
    port, server = storage_scp(lambda dataset: code)
    try:
        with pytest.raises(ConnectionError, match=f"status 0x{code:04X}"):
            send_c_store("NODE", Destination("127.0.0.1", port, "DEST"), [a_report()])
    finally:
        server.shutdown()


def test_every_secondary_capture_class_is_refused_single_or_multi_frame():
    """The docs say Secondary Captures are not scored; the multi-frame classes (a one-frame Grayscale Byte SC
    reads as any X-ray) had been scored while the single-frame class was refused."""
    for sop_class in ["1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
                      "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4"]:
        dataset = Dataset()
        dataset.SOPClassUID, dataset.Modality = sop_class, "DX"
        assert not_an_xray(dataset) == "a secondary capture, not an acquired X-ray", sop_class


def test_an_image_re_sent_with_other_pixels_gets_a_report_of_a_new_uid(predictor, xray_sources, tmp_path):
    """A probe with Orthanc: an image changed and re-sent under its old SOP Instance UID got its report under the
    old report's UID; Orthanc kept the first report and answered Success, so the new result was lost while the
    node logged it as sent. The same pixels scored again (alone or in a batch) keep their report's UIDs."""
    from pneumonia_cnn.interop.scoring import DicomScorer
    first = pydicom.dcmread(xray_dicom(xray_sources["PNEUMONIA"][0], tmp_path / "a.dcm", "DX"))
    changed = pydicom.dcmread(xray_dicom(xray_sources["NORMAL"][0], tmp_path / "b.dcm", "DX"))
    other = pydicom.dcmread(xray_dicom(xray_sources["NORMAL"][1], tmp_path / "c.dcm", "DX"))
    changed.SOPInstanceUID = first.SOPInstanceUID
    scorer = DicomScorer(predictor, overlay=True)

    def uids(dataset, *batch):
        result = scorer.score([dataset, *batch])[0]
        assert result.error is None and len(result.outputs) == 2
        return [str(output.SOPInstanceUID) for output in result.outputs]
    assert uids(first) == uids(first, other)  # its batch changes nothing
    assert not set(uids(first)) & set(uids(changed))
