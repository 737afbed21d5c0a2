"""``listen`` with a real Orthanc on both sides: Orthanc sends X-rays to the node (C-STORE), the node sends each
report back to Orthanc (C-STORE), and the reports read back from Orthanc match ``predict``; C-ECHO answers; a
destination that is down loses nothing; reports sent to the node are not scored again."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest

from pneumonia_cnn.interop.listener import Destination, Listener

from .orthanc import Orthanc, free_port, require_orthanc
from .reports import predict_json, reports_in, wait_for_reports
from .studies import xray_dicom

PROJECT_SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def wait_for_port(port: int, process=None, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, "the listener exited"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port}")


def c_store(path, port: int, ae_title: str = "PNEUMONIA") -> int:
    from pynetdicom import AE
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert association.is_established
    status = association.send_c_store(dataset)
    association.release()
    return status.Status


@pytest.fixture(scope="module")
def node(tmp_path_factory, trained_run):
    """Orthanc, which knows the node as modality "pneumonia", and ``pneumonia-cnn listen`` (the real command,
    in its own process) sending its reports to Orthanc."""
    require_orthanc()
    folder, port = tmp_path_factory.mktemp("listen"), free_port()
    orthanc = Orthanc(folder / "orthanc", {"pneumonia": ("PNEUMONIA", "127.0.0.1", port)}).start()
    log = open(folder / "listen.log", "wb")  # noqa: SIM115 - open while the node runs
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PROJECT_SRC, os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "listen", str(trained_run), "--port", str(port),
                                "--ae-title", "PNEUMONIA", "--send-to", f"127.0.0.1:{orthanc.dicom_port}:ORTHANC",
                                "--spool", str(folder / "spool"), "--device", "cpu", "--backoff", "0.1"],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, process)
        yield {"orthanc": orthanc, "port": port, "spool": folder / "spool", "log": folder / "listen.log"}
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        orthanc.stop()


def test_echo_answers(node):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    assert node["orthanc"].echo("pneumonia")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", node["port"], ae_title="PNEUMONIA")
    assert association.is_established and association.send_c_echo().Status == 0x0000
    association.release()


def test_orthanc_sends_images_and_the_reports_arrive(node, trained_run, xray_sources, tmp_path, capsys):
    orthanc = node["orthanc"]
    files = [xray_dicom(xray_sources["PNEUMONIA"][0], tmp_path / "a.dcm", "DX", patient_id="L1"),
             xray_dicom(xray_sources["NORMAL"][0], tmp_path / "b.dcm", "CR", "MONOCHROME1", patient_id="L2",
                        age="035Y"),
             xray_dicom(xray_sources["NORMAL"][1], tmp_path / "c.dcm", "DX", patient_id="L3", pixel_data=False)]
    orthanc.send("pneumonia", [orthanc.upload(path)["ID"] for path in files])
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    reports = wait_for_reports(orthanc, [h.SOPInstanceUID for h in headers[:2]])
    expected = predict_json(trained_run, files[:2], capsys)
    for path, header in zip(files[:2], headers):
        report, figures = reports[header.SOPInstanceUID], expected[str(path)]
        assert report["probability"] == pytest.approx(figures["probability"], abs=1e-9)
        assert report["finding"] == {"PNEUMONIA": "Present", "NORMAL": "Absent", None: "Unknown"}[figures["label"]]
        assert report["warnings"] == figures["warnings"] and report["in_distribution"] == figures["in_distribution"]
        assert report["study_instance_uid"] == header.StudyInstanceUID and report["model_version"] == figures["model"]
    assert any("patient age 35 years" in w for w in reports[headers[1].SOPInstanceUID]["warnings"])
    deadline = time.monotonic() + 30
    while not list((node["spool"] / "unreadable").glob(f"{headers[2].SOPInstanceUID}.*.dcm")):
        assert time.monotonic() < deadline, "the unreadable instance was not set aside"
        time.sleep(0.2)
    assert f"instance {headers[2].SOPInstanceUID}: unreadable: DICOM has no pixel data" in node["log"].read_text()
    assert headers[2].SOPInstanceUID not in reports and not list((node["spool"] / "incoming").glob("*.dcm"))


def test_a_jpeg_lossless_instance_is_read_and_reported(node, trained_run, xray_sources, tmp_path, capsys):
    """JPEG Lossless (process 14, SV1), the usual archive syntax of CR/DX, transcoded by Orthanc: acknowledged
    and then set aside as "cannot decode" before GDCM was a dependency; now its report holds the probability of
    the uncompressed file's pixels."""
    orthanc = node["orthanc"]
    path = xray_dicom(xray_sources["PNEUMONIA"][1], tmp_path / "plain.dcm", "DX", patient_id="L9")
    plain_id = orthanc.upload(path)["ID"]
    answer = orthanc.http.post(f"{orthanc.url}/instances/{plain_id}/modify", timeout=30, json={
        "Transcode": "1.2.840.10008.1.2.4.70", "Force": True, "Keep": ["SOPInstanceUID"]})
    answer.raise_for_status()
    orthanc.http.delete(f"{orthanc.url}/instances/{plain_id}", timeout=10)
    compressed = tmp_path / "lossless.dcm"
    compressed.write_bytes(answer.content)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    orthanc.send("pneumonia", [orthanc.upload(compressed)["ID"]])
    uid = pydicom.dcmread(path).SOPInstanceUID
    report = wait_for_reports(orthanc, [uid])[uid]
    assert report["probability"] == pytest.approx(predict_json(trained_run, [path], capsys)[str(path)]["probability"],
                                                  abs=1e-9)


def test_a_transfer_syntax_the_node_cannot_decode_is_not_accepted(node):
    """Offered MPEG-2 alone for an X-ray, the node accepts no presentation context (so a sender converts the
    image to a syntax it offers, instead of having it acknowledged and never read); native syntaxes, JPEG
    Lossless and JPEG-LS are accepted."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation as DX
    ae = AE(ae_title="TESTSCU")
    for syntax in ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
                   "1.2.840.10008.1.2.1"):
        ae.add_requested_context(DX, syntax)
    association = ae.associate("127.0.0.1", node["port"], ae_title="PNEUMONIA")
    try:
        accepted = sorted(context.transfer_syntax[0] for context in association.accepted_contexts)
    finally:
        association.release()
    assert accepted == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80"]


def test_reports_sent_to_the_node_are_not_scored(node, xray_sources, tmp_path):
    orthanc = node["orthanc"]
    path = xray_dicom(xray_sources["PNEUMONIA"][1], tmp_path / "d.dcm", "DX", patient_id="L4")
    orthanc.send("pneumonia", [orthanc.upload(path)["ID"]])
    report_uid = wait_for_reports(orthanc, [pydicom.dcmread(path).SOPInstanceUID])  # one report...
    sr_ids = orthanc.instances_of_modality("SR")
    orthanc.send("pneumonia", sr_ids)  # ...sent to the node, as a PACS that forwards everything would
    deadline = time.monotonic() + 30
    while "not scored (modality SR is not an image)" not in node["log"].read_text():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert len(reports_in(orthanc)) == len(report_uid)


def test_destination_down_loses_nothing(trained_run, xray_sources, tmp_path, caplog):
    from pneumonia_cnn.inference import Predictor
    require_orthanc()
    predictor, spool, port = Predictor(trained_run, "cpu"), tmp_path / "spool", free_port()
    path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "e.dcm", "DX", patient_id="L5")
    down = Listener(predictor, Destination("127.0.0.1", free_port(), "NOBODY"), port=port, spool=spool, attempts=2,
                    backoff=0.05, retry_after=3600).start(block=False)
    try:
        assert c_store(path, port) == 0x0000
        deadline = time.monotonic() + 60
        while "kept in the spool" not in caplog.text:
            assert time.monotonic() < deadline, "the failed delivery was not reported"
            time.sleep(0.1)
    finally:
        down.stop()
    (kept,) = (spool / "incoming").iterdir()  # one file per receipt: UID.RECEIPT.dcm
    assert kept.name.startswith(f"{pydicom.dcmread(path).SOPInstanceUID}.") and kept.suffix == ".dcm"
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:  # restarted with a destination that answers: the spooled image is scored and delivered
        up = Listener(predictor, Destination("127.0.0.1", orthanc.dicom_port, "ORTHANC"), port=port, spool=spool,
                      overlay=True)
        up.start(block=False)
        wait_for_reports(orthanc, [pydicom.dcmread(path).SOPInstanceUID], timeout=60)
        up.stop()
        assert not list((spool / "incoming").glob("*.dcm"))
        (overlay,) = [orthanc.tags(i) for i in orthanc.instances_of_modality("OT")]  # --overlay: the heat map too
        assert overlay["StudyInstanceUID"] == pydicom.dcmread(path).StudyInstanceUID
    finally:
        orthanc.stop()


def test_bad_send_to_is_one_line(trained_run, capsys):
    from pneumonia_cnn.cli import main
    assert main(["listen", str(trained_run), "--send-to", "pacs:notaport:AET"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --send-to pacs:notaport:AET: expected HOST:PORT:AE_TITLE")


def test_each_receipt_is_spooled_apart_and_other_modalities_are_not_scored(trained_run, xray_sources, tmp_path,
                                                                           caplog):
    """A copy re-sent while the first is being reported gets its own spool file (it used to overwrite the
    first and be deleted with it, unscored); a CT routed to the node is acknowledged and not scored."""
    import logging

    from pneumonia_cnn.inference import Predictor
    caplog.set_level(logging.INFO)
    listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", free_port(), "NOBODY"),
                        spool=tmp_path / "spool", attempts=1)
    path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "ct.dcm", "DX", patient_id="L9")
    routed = pydicom.dcmread(path)  # a CT slice that a router sends to every node
    routed.Modality = "CT"
    routed.SOPClassUID = routed.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    routed.save_as(path)
    uid = str(routed.SOPInstanceUID)
    assert (listener._receive(receipt(path, uid)), listener._receive(receipt(path, uid))) == (0x0000, 0x0000)
    spooled = sorted((tmp_path / "spool" / "incoming").glob("*.dcm"))
    assert len(spooled) == 2 and all(f.name.startswith(f"{uid}.") for f in spooled)
    listener._process(spooled)
    assert f"instance {uid}: not scored (modality CT is not one of CR, DX (--modality))" in caplog.text
    assert not list((tmp_path / "spool" / "incoming").glob("*.dcm")) and not listener.sent


def receipt(path, uid=None):
    """What pynetdicom hands the node for one C-STORE of the file at ``path``: the request, and the instance as
    it arrived, written to a temporary file (a copy: the node moves it into its spool)."""
    import shutil
    import uuid
    from types import SimpleNamespace
    uid = uid if uid is not None else str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    arrived = path.parent / f"arrived-{uuid.uuid4().hex}.dcm"
    shutil.copyfile(path, arrived)
    return SimpleNamespace(request=SimpleNamespace(AffectedSOPInstanceUID=uid), dataset_path=arrived,
                           assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY")))


def test_a_deflate_bomb_is_set_aside_from_its_header(trained_run, tmp_path, caplog):
    """612 KB that inflates to 600 MB took a node to 2.9 GB (it read the whole data set before any check); the
    header guard that serve uses now refuses it first. Here 48 MB of zeros behind a 64 x 64 header."""
    import logging
    import tracemalloc

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from pneumonia_cnn.inference import Predictor
    caplog.set_level(logging.INFO)
    bomb = pydicom.dcmread(xray_dicom(np.zeros((64, 64), np.uint8), tmp_path / "b.dcm", "DX", patient_id="L7"))
    bomb.PixelData = bytes(48 * 1024 * 1024)
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    assert (tmp_path / "bomb.dcm").stat().st_size < 1024 * 1024
    listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", free_port(), "NOBODY"),
                        spool=tmp_path / "spool", attempts=1)
    assert listener._receive(receipt(tmp_path / "bomb.dcm")) == 0x0000
    tracemalloc.start()
    listener._process(sorted((tmp_path / "spool" / "incoming").glob("*.dcm")))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, f"{peak:,} bytes"  # before: the 48 MB data set and its re-encoding
    assert "(decompression bomb) (kept in" in caplog.text
    (aside,) = (tmp_path / "spool" / "unreadable").glob("*.dcm")
    reason = (tmp_path / "spool" / "unreadable" / ".reasons" / f"{aside.name}.txt").read_text()
    assert reason.endswith("(decompression bomb)\n")  # beside the file: the log rotates away


def test_what_a_sender_chose_cannot_forge_log_lines_or_put_patient_names_in_the_log(trained_run, xray_sources,
                                                                                   tmp_path):
    """A UID with a newline wrote a second, forged log line; highdicom's warning about a one-part patient name
    wrote the name into the log over two lines. The node's log keeps one line per record and no name."""
    import io
    import logging

    from pneumonia_cnn.cli.common import OneLineFormatter
    from pneumonia_cnn.inference import Predictor
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    try:
        listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", free_port(), "NOBODY"),
                            spool=tmp_path / "spool", attempts=1, retry_after=3600)
        path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "n.dcm", "DX", patient_id="L8",
                          PatientName="SMITHERSON")
        forged = "1.2\nFORGED instance 7.7: p=0.0100 NORMAL -> report 1 sent\x85\u2028x"
        with warnings_to(stream):
            assert listener._receive(receipt(path, forged)) == 0x0000
            listener._process(sorted((tmp_path / "spool" / "incoming").glob("*.dcm")))
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "received instance 1.2\\nFORGED instance 7.7: p=0.0100 NORMAL -> report 1 sent\\x85\\u2028x " \
                       "from MODALITY"
    assert not any(line.startswith("FORGED") for line in lines)
    assert "SMITHERSON" not in stream.getvalue() and "C-STORE of its report" in lines[-1]  # scored, then sent


class warnings_to:
    """Python warnings written to ``stream`` (as the default handler writes them to stderr) while inside."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        import warnings
        self.previous = warnings.showwarning
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: self.stream.write(
            warnings.formatwarning(message, category, filename, lineno, line))

    def __exit__(self, *exc):
        import warnings
        warnings.showwarning = self.previous


def test_a_report_the_destination_refuses_is_set_aside_and_does_not_hold_up_the_others(trained_run, xray_sources,
                                                                                       tmp_path, caplog):
    """A destination answering 0xC000 for one patient's report: that report used to be retried forever (four
    attempts with back-off every --retry-after), taking the worker's time from every other report. Now it is not
    retried within a pass, and after --give-up-after refusals it is moved to SPOOL/refused; the others go."""
    import logging

    from pneumonia_cnn.inference import Predictor
    caplog.set_level(logging.INFO)
    answered = []
    port, server = storage_scp(lambda dataset: answered.append(str(dataset.PatientID)) or (
        0xC000 if dataset.PatientID == "BAD" else 0x0000))
    try:
        listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", port, "DEST"),
                            spool=tmp_path / "spool", attempts=4, backoff=0.05, give_up_after=2)
        for name, patient in (("bad", "BAD"), ("good", "GOOD")):
            path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / f"{name}.dcm", "DX", patient_id=patient)
            assert listener._receive(receipt(path)) == 0x0000
        incoming = tmp_path / "spool" / "incoming"
        listener._process(sorted(incoming.glob("*.dcm")))
        assert sorted(answered) == ["BAD", "GOOD"]  # one attempt each: a refusal is not retried within a pass
        assert [s["report_uid"] is not None for s in listener.sent] == [True] and len(list(incoming.iterdir())) == 1
        listener._process(sorted(incoming.glob("*.dcm")))  # the pass after --retry-after: refused again
        assert answered.count("BAD") == 2 and not list(incoming.iterdir())
        (aside,) = (tmp_path / "spool" / "refused").glob("*.dcm")
        reason = (tmp_path / "spool" / "refused" / ".reasons" / f"{aside.name}.txt").read_text()
        assert reason.startswith("refused 2 times: ") and "0xC000" in reason
        assert "with status 0xC000 (after" not in caplog.text  # never retried with back-off
        assert "refused 2 times: set aside in" in caplog.text
    finally:
        server.shutdown()


@pytest.mark.parametrize("destination_kind", ["refuses the overlay", "has no Secondary Capture context"])
def test_a_refused_overlay_leaves_the_report_delivered(trained_run, xray_sources, tmp_path, caplog, destination_kind):
    """With --overlay the report and overlay went in one association: a destination refusing the overlay had
    the report resent every pass (and, with a failure status, moved to SPOOL/refused although it had it)."""
    import logging

    from pynetdicom.sop_class import ComprehensiveSRStorage

    from pneumonia_cnn.inference import Predictor
    caplog.set_level(logging.INFO)
    answered = []
    port, server = storage_scp(lambda dataset: answered.append(str(dataset.Modality)) or (
        0xC000 if dataset.Modality == "OT" else 0x0000),
        None if destination_kind == "refuses the overlay" else [ComprehensiveSRStorage])
    try:
        listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", port, "DEST"),
                            spool=tmp_path / "spool", overlay=True, attempts=2, backoff=0.05)
        path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX", patient_id="OV1")
        assert listener._receive(receipt(path)) == 0x0000
        listener._process(sorted((tmp_path / "spool" / "incoming").glob("*.dcm")))
        assert answered[0] == "SR" and answered.count("SR") == 1 and len(listener.sent) == 1
        spool = tmp_path / "spool"
        assert not list((spool / "incoming").iterdir()) and not list((spool / "refused").iterdir())
        assert "(the report was stored; the overlay is not sent again)" in caplog.text
        assert "(overlay refused)" in caplog.text
    finally:
        server.shutdown()


def storage_scp(answer, sop_classes=None):
    """A DICOM destination on loopback: ``answer(dataset) -> status`` for each C-STORE; it takes every storage
    class, or only ``sop_classes``. Returns (port, server); ``server.shutdown()`` ends it."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    destination = AE(ae_title="DEST")
    if sop_classes is None:
        destination.supported_contexts = AllStoragePresentationContexts
    for sop_class in sop_classes or []:
        destination.add_supported_context(sop_class)
    port = free_port()
    return port, destination.start_server(("127.0.0.1", port), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, lambda event: answer(event.dataset))])
