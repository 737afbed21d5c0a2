"""Defects a probe of the DICOM path found (docs/hospital.md): a report re-sent after a patient correction kept its
UID, identifiers too long for DICOM were cut in the report, and a header declaring half the rows its pixel data
holds was scored as the top half of the chest."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from pneumonia_cnn.inference import Predictor
from pneumonia_cnn.interop.dicom_sr import read_sr
from pneumonia_cnn.interop.scoring import DicomScorer
from tests.conftest import SHARED_DATA, require_shared

from .studies import xray_dicom


@pytest.fixture(scope="module")
def scorer():
    return DicomScorer(Predictor("builtin", "cpu"))


@pytest.fixture(scope="module")
def child_xray():
    require_shared()
    return sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]


def test_a_corrected_patient_or_study_gets_a_report_of_a_new_uid(scorer, child_xray, tmp_path):
    source = pydicom.dcmread(xray_dicom(child_xray, tmp_path / "x.dcm", patient_id="WRONG1"))
    first, again = scorer.score([source, pydicom.dcmread(tmp_path / "x.dcm")])
    assert first.report_uid == again.report_uid  # a repeat replaces its report
    uids = {first.report_uid}
    for keyword, corrected in (("PatientID", "RIGHT2"), ("PatientName", "Right^Patient"),
                               ("AccessionNumber", "ACC9"), ("StudyInstanceUID", "1.2.3.4.5")):
        changed = pydicom.dcmread(tmp_path / "x.dcm")
        setattr(changed, keyword, corrected)
        (result,) = scorer.score([changed])
        assert result.error is None and result.report_uid not in uids, keyword  # same SOP UID, same pixels
        uids.add(result.report_uid)
        assert getattr(result.outputs[0], keyword) == corrected
    assert read_sr(result.outputs[0])["source_sop_instance_uid"] == source.SOPInstanceUID


@pytest.mark.parametrize("keyword, value, limit", [("PatientID", "P" * 80, 64), ("AccessionNumber", "A" * 17, 16),
                                                   ("IssuerOfPatientID", "I" * 65, 64), ("StudyID", "S" * 17, 16)])
def test_an_identifier_too_long_for_dicom_is_refused_not_cut(scorer, child_xray, tmp_path, keyword, value, limit):
    source = pydicom.dcmread(xray_dicom(child_xray, tmp_path / "x.dcm"))
    setattr(source, keyword, value)
    (result,) = scorer.score([source])
    assert result.outputs == [] and result.error == (
        f"its {keyword} is {len(value)} characters, over DICOM's {limit}: a report could not carry it whole, and "
        f"under a shortened one it would be filed away from the image; correct it at the source")


def test_identifiers_at_their_limit_and_a_name_too_long_still_get_a_report(scorer, child_xray, tmp_path):
    source = pydicom.dcmread(xray_dicom(child_xray, tmp_path / "x.dcm"))
    source.PatientID, source.AccessionNumber, source.PatientName = "P" * 64, "A" * 16, "N" * 70
    (result,) = scorer.score([source])
    report = result.outputs[0]
    assert result.error is None and report.PatientID == "P" * 64 and report.AccessionNumber == "A" * 16
    assert str(report.PatientName) == "N" * 64  # a name is still cut to fit (it files nothing)


def test_pixel_data_beyond_the_header_is_refused_in_predict_and_by_the_nodes(scorer, child_xray, tmp_path, capsys):
    from pneumonia_cnn.cli import main
    path = xray_dicom(child_xray, tmp_path / "half.dcm")
    source = pydicom.dcmread(path)
    rows, columns = int(source.Rows), int(source.Columns)
    source.Rows = rows // 2  # the data still holds every row
    source.save_as(path)
    reason = (f"DICOM pixel data holds {rows * columns * 2:,} bytes, {rows - rows // 2} row(s) of {columns} pixels "
              f"more than its header's 1 frame(s) of {columns}x{rows // 2}: the header does not describe the image")
    assert main(["predict", str(path), "--format", "json"]) == 1
    assert reason in capsys.readouterr().out
    (result,) = scorer.score([pydicom.dcmread(path)])
    assert result.error == reason
    padded = pydicom.dcmread(xray_dicom(np.full((225, 225), 60, np.uint8), tmp_path / "odd.dcm", BitsAllocated=8,
                                        BitsStored=8, HighBit=7))
    padded.PixelData = np.full((225, 225), 60, np.uint8).tobytes() + b"\0"  # one pad byte to an even length
    padded.BitsAllocated, padded.BitsStored, padded.HighBit = 8, 8, 7
    (scored,) = scorer.score([padded])
    assert scored.error is None


def test_a_destination_slower_than_pynetdicom_s_default_is_waited_for(tmp_path):
    """listen --answer-timeout (120 s): pynetdicom's 30 s gave up on a destination taking 45 s per C-STORE, which
    stored every copy; the node counted none as delivered and sent them again on every pass."""
    import time

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    from pneumonia_cnn.interop.dicom_send import Destination, send_c_store
    from tests.conftest import free_port
    stored = []

    def slow_store(event):
        time.sleep(2.5)
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000
    ae = AE(ae_title="DEST")
    ae.add_supported_context(DigitalXRayImageStorageForPresentation)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, slow_store)])
    try:
        instance = pydicom.dcmread(xray_dicom(np.full((64, 64), 90, np.uint8), tmp_path / "x.dcm"))
        with pytest.raises(ConnectionError, match=r"answered C-STORE with status none \(timeout or abort\)"):
            send_c_store("NODE", Destination("127.0.0.1", port, "DEST", answer_timeout=1), [instance])
        send_c_store("NODE", Destination("127.0.0.1", port, "DEST", answer_timeout=10), [instance])  # no raise
        assert Destination.parse("127.0.0.1:104:DEST").answer_timeout == 120  # the default
        deadline = time.monotonic() + 10
        while len(stored) < 2 and time.monotonic() < deadline:  # the first copy, stored after its answer's wait
            time.sleep(0.1)
        assert stored == [instance.SOPInstanceUID] * 2
    finally:
        server.shutdown()


def test_listen_passes_its_answer_timeout_to_the_destination(monkeypatch, tmp_path):
    from pneumonia_cnn.cli import main
    from pneumonia_cnn.interop import listener
    made = []

    class Started:
        def __init__(self, predictor, destination, *args, **kwargs):
            made.append(destination)

        def start(self, block):
            pass
    monkeypatch.setattr(listener, "Listener", Started)
    assert main(["listen", "builtin", "--send-to", "127.0.0.1:104:DEST", "--spool", str(tmp_path / "spool"),
                 "--answer-timeout", "45"]) == 0
    assert main(["listen", "builtin", "--send-to", "127.0.0.1:104:DEST", "--spool", str(tmp_path / "spool")]) == 0
    assert [d.answer_timeout for d in made] == [45, 120]


def test_a_destination_that_is_down_is_tried_once_per_pass_not_once_per_report(child_xray, tmp_path, caplog):
    """Each report had taken its retries in turn, every --retry-after, and each image was scored again on each
    pass: log lines and CPU grew with the backlog. Now the first report that finds no association makes the
    others wait, unscored, until the next pass."""
    import time

    from pneumonia_cnn.interop.listener import Destination, Listener
    from tests.conftest import free_port

    from .test_listen import c_store
    port, spool = free_port(), tmp_path / "spool"
    scored = []
    node = Listener(Predictor("builtin", "cpu"), Destination("127.0.0.1", free_port(), "NOBODY"), port=port,
                    spool=spool, attempts=2, backoff=0.05, retry_after=1.0, batch_size=1)
    score = node.scorer.score
    node.scorer.score = lambda datasets: scored.extend(datasets) or score(datasets)
    node.start(block=False)
    try:
        for index in range(3):
            assert c_store(xray_dicom(child_xray, tmp_path / f"{index}.dcm", patient_id=f"D{index}"), port) == 0
        time.sleep(3.5)  # three or four passes
    finally:
        node.stop()
    failures = [r.message for r in caplog.records if "kept in the spool" in r.message]
    assert len(failures) >= 2 and all(f.endswith("with every report waiting (the destination is unreachable)")
                                      for f in failures)
    assert sum("retrying in" in r.message for r in caplog.records) == len(failures)  # one report's retry a pass
    assert len(scored) <= len(failures) + 1  # one report scored a pass, not all three
    assert len(list((spool / "incoming").glob("*.dcm"))) == 3  # none lost


def test_a_report_the_destination_does_not_answer_holds_back_only_itself(child_xray, tmp_path, caplog):
    """A C-STORE without an answer concerns that report: the others go out (the first version of the rule above
    had made every report wait behind it, pass after pass)."""
    import time

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from pneumonia_cnn.interop.listener import Destination, Listener
    from tests.conftest import free_port

    from .test_listen import c_store

    def store(event):
        if event.dataset.PatientID == "POISON":
            time.sleep(2)  # past the node's answer timeout
        return 0x0000
    destination = AE(ae_title="DEST")
    for context in AllStoragePresentationContexts:
        destination.add_supported_context(context.abstract_syntax)
    destination_port, port = free_port(), free_port()
    server = destination.start_server(("127.0.0.1", destination_port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, store)])
    node = Listener(Predictor("builtin", "cpu"), Destination("127.0.0.1", destination_port, "DEST", answer_timeout=1),
                    port=port, spool=tmp_path / "spool", attempts=1, backoff=0.05, retry_after=2, batch_size=1)
    node.start(block=False)
    try:
        uids = {}
        for patient in ("POISON", "A", "B"):
            path = xray_dicom(child_xray, tmp_path / f"{patient}.dcm", patient_id=patient)
            uids[patient] = pydicom.dcmread(path).SOPInstanceUID
            assert c_store(path, port) == 0
        deadline = time.monotonic() + 30
        while len(node.sent) < 2:
            assert time.monotonic() < deadline, "the other reports were held back"
            time.sleep(0.1)
    finally:
        node.stop()
        server.shutdown()
    assert {sent["sop_instance_uid"] for sent in node.sent} == {uids["A"], uids["B"]}
    assert not any("the destination is unreachable" in r.message for r in caplog.records)


@pytest.mark.parametrize("keyword", ["PatientID", "AccessionNumber"])
def test_an_identifier_holding_two_values_is_refused(scorer, child_xray, tmp_path, keyword):
    """A PatientID of two values (a backslash in it) was copied into the report as two: an invalid report (VM 1)."""
    source = pydicom.dcmread(xray_dicom(child_xray, tmp_path / "x.dcm"))
    setattr(source, keyword, ["P1", "P2"])
    (result,) = scorer.score([source])
    assert result.outputs == [] and result.error == (
        f"its {keyword} holds 2 values, where DICOM allows one: a report could not name the one it belongs to; "
        "correct it at the source")
