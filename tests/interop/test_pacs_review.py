"""What a hostile review of ``pacs`` and ``predict --format fhir`` found: a password in the --dicomweb URL printed
in every error line, pydicom's raw note on a header naming no file, an unreadable DICOM's Observation linked to
nothing, ``pacs --watch`` killed by SIGTERM with no word, and a --modality that is no modality code taken as one."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import PneumoniaCNNError

from .orthanc import free_port
from .studies import xray_dicom
from .test_listen import PROJECT_SRC

FAST = ["--device", "cpu", "--retries", "1", "--backoff", "0.05", "--timeout", "5"]


def cli(*argv: str, **popen) -> subprocess.Popen:
    """``python -m pneumonia_cnn ARGV`` as a separate process: what an operator's terminal shows, exactly."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PROJECT_SRC, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", *argv], text=True, env=env, **popen)


def test_credentials_in_the_url_are_refused_and_never_shown(trained_run, tmp_path, capsys, caplog):
    """http://user:s3cret@host/dicom-web authenticated, then printed the password in every error line (and every
    --watch poll's warning); it is refused at once, on one line that shows neither user nor password."""
    from pneumonia_cnn.interop.dicomweb_session import connect
    url = f"http://ai-node:s3cret@127.0.0.1:{free_port()}/dicom-web"
    assert main(["pacs", str(trained_run), "--dicomweb", url, "--state", str(tmp_path / "s.sqlite"), *FAST]) == 2
    out, err = capsys.readouterr()
    assert "s3cret" not in out + err + caplog.text and "ai-node" not in err
    assert err.count("\n") == 1 and err.startswith("error: --dicomweb http://***@127.0.0.1:"), err
    assert "--user" in err and "PNEUMONIA_CNN_DICOMWEB_PASSWORD" in err
    for given in (url, "https://token@pacs.example/dicom-web"):  # a library user is refused alike
        with pytest.raises(PneumoniaCNNError, match="credentials in the URL are refused") as refused:
            connect(given)
        assert "s3cret" not in str(refused.value) and "token@" not in str(refused.value)
    for malformed in ("http:ai-node:s3cret@127.0.0.1:9/dicom-web", "http:///dicom-web", "ftp://pacs/dicom-web"):
        # dicomweb-client's "Malformed URL" error had repeated the first, password included
        with pytest.raises(PneumoniaCNNError, match="not an http:// or https:// URL with a host") as refused:
            connect(malformed)
        assert "s3cret" not in str(refused.value)
    assert not (tmp_path / "s.sqlite").exists()  # nothing done before the refusal


def test_a_header_note_is_one_line_naming_the_file(trained_run, xray_sources, tmp_path):
    """A SOP Instance UID that is not a UID: ``predict --format fhir`` printed pydicom's "Invalid value for VR UI"
    warning naming no file, read outside the per-file collection of pydicom's notes."""
    path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "bad_uid.dcm", "DX", patient_id="MRN-3",
                      SOPInstanceUID="not-a-uid")
    run = cli("predict", str(trained_run), str(path), "--device", "cpu", "--format", "fhir", stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    noted = [line for line in err.splitlines() if "Invalid value for VR UI" in line]
    assert len(noted) == 1 and noted[0].startswith(f"warning: {path}: Invalid value for VR UI: 'not-a-uid'"), err
    observation = json.loads(out)["contained"][0]
    assert observation["subject"]["identifier"]["value"] == "MRN-3"
    assert [link["type"] for link in observation["derivedFrom"]] == ["ImagingStudy"]  # no instance: not a UID


def test_an_unreadable_dicom_is_linked_to_its_patient_study_and_instance(trained_run, xray_sources, tmp_path,
                                                                        capsys):
    """The cancelled Observation of a DICOM without pixel data had no subject and no derivedFrom, though its
    header names the patient, the study and the instance."""
    import pydicom
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "no_pixels.dcm", "DX", patient_id="MRN-4",
                      pixel_data=False)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    capsys.readouterr()
    main(["predict", str(trained_run), str(path), str(tmp_path / "gone.dcm"), "--device", "cpu", "--format", "fhir"])
    document = json.loads(capsys.readouterr().out)
    DiagnosticReport.model_validate(document)
    unreadable, gone = document["contained"]
    assert unreadable["status"] == gone["status"] == "cancelled"
    assert unreadable["subject"] == {"type": "Patient", "identifier": {"value": "MRN-4"}}
    assert [link["identifier"]["value"] for link in unreadable["derivedFrom"]] == [
        f"urn:oid:{header.StudyInstanceUID}", f"urn:oid:{header.SOPInstanceUID}"]
    assert "subject" not in gone and "derivedFrom" not in gone  # no header to read
    assert document["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{header.StudyInstanceUID}"


def test_a_deflated_bomb_is_not_opened_to_link_it(tmp_path, monkeypatch):
    """Unreadable files are linked now, and pydicom inflates a deflated data set whole on opening it: one the
    header guard refuses is left unlinked, never opened; a fine deflated file is linked."""
    import pydicom

    from pneumonia_cnn.interop import fhir
    from tests.serving.dicoms import dicom_file
    fine, bomb = tmp_path / "fine.dcm", tmp_path / "bomb.dcm"
    fine.write_bytes(dicom_file(64, 64, deflate=True))
    bomb.write_bytes(dicom_file(64, 64, pixel_bytes=48 << 20, deflate=True))
    assert fhir.dicom_links(fine) == {}  # read, and it names no patient or study: nothing to link
    opened, dcmread = [], pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda path, **kw: opened.append(path) or dcmread(path, **kw))
    assert fhir.dicom_links(fine) == {} and opened == [fine]
    assert fhir.dicom_links(bomb) == {} and opened == [fine]


@pytest.mark.parametrize("stop_signal, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_stops_watch_between_polls_with_one_line(trained_run, tmp_path, stop_signal, status):
    """SIGTERM (systemd's stop) killed ``pacs --watch`` (exit -15) with no word; now it stops, as listen does: exit 0
    for SIGTERM, 130 for Ctrl-C, one line saying so."""
    log = tmp_path / "pacs.log"
    with open(log, "w") as sink:
        job = cli("pacs", str(trained_run), "--dicomweb", f"http://127.0.0.1:{free_port()}/dicom-web", "--state",
                  str(tmp_path / "s.sqlite"), "--watch", "--interval", "60", *FAST, stdout=sink,
                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while "polling again in 60 s" not in log.read_text():  # the PACS is down: between polls now
                assert job.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            started = time.monotonic()
            job.send_signal(stop_signal)
            job.wait(timeout=30)
        finally:
            job.kill()
    text = log.read_text()
    assert job.returncode == status, text
    assert time.monotonic() - started < 10  # not after the 60 s interval
    name = signal.Signals(stop_signal).name
    assert text.splitlines()[-1] == f"{name}: stopped between polls; the next run scores what arrives meanwhile"
    assert "Traceback" not in text and "interrupted" not in text


def test_a_signal_mid_poll_stops_after_the_instance_in_hand(orthanc, trained_run, xray_sources, tmp_path, caplog):
    """A SIGTERM while a poll scores: the instance in hand is stored and recorded, the rest are left for the next
    run (not recorded, so not lost), and the handlers are put back."""
    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.interop.dicomweb import PacsJob, PacsOptions
    caplog.set_level(logging.INFO)
    for index, source in enumerate(xray_sources["NORMAL"] + xray_sources["PNEUMONIA"][:1]):
        orthanc.upload(xray_dicom(source, tmp_path / f"{index}.dcm", "DX", patient_id=f"S{index}",
                                  study_date="20230707"))
    options = PacsOptions(orthanc.dicomweb, str(tmp_path / "state.sqlite"), study_date="20230707", batch_size=1,
                          attempts=1)
    job = PacsJob(Predictor(trained_run, "cpu"), options)
    score, summaries = job.scorer.score, []

    def score_then_signal(datasets):
        results = score(datasets)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the first instance is in hand
        return results
    job.scorer.score = score_then_signal
    def ignore(*_):  # without the fix, this handler takes the signal (the default would end pytest)
        pass
    before, interrupt = signal.signal(signal.SIGTERM, ignore), signal.getsignal(signal.SIGINT)
    try:
        stopped = job.watch(0.05, 2, summaries.append)
        assert signal.getsignal(signal.SIGTERM) is ignore and signal.getsignal(signal.SIGINT) is interrupt  # put back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped == "SIGTERM" and len(summaries) == 1
    assert (summaries[0]["scored"], summaries[0]["left"]) == (1, 2)
    assert "SIGTERM: stopped after the instances in hand; 2 new instance(s) left for the next run" in caplog.text
    job.scorer.score = score
    assert job.run_once()["scored"] == 2  # the next run scores what was left


@pytest.mark.parametrize("value", ["D\\X", "*", "CR,DX", "", "   ", "C?", "ABCDEFGHIJKLMNOPQ", "CR\n", "CR DX", "D X"])
def test_a_modality_that_is_no_dicom_code_is_refused_before_any_work(value, orthanc, trained_run, tmp_path, capsys):
    """--modality 'D\\X' went into the QIDO-RS query as it was: "0 new instance(s)", exit 0, on every run. Refused
    before the PACS is asked, and before the model is loaded (a model that does not exist is not reported)."""
    for model in (trained_run, tmp_path / "none.pt"):
        assert main(["pacs", str(model), "--dicomweb", orthanc.dicomweb, "--state", str(tmp_path / "s.sqlite"),
                     "--modality", "CR", value, *FAST]) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith("error: --modality '") and not out, err
        assert "': not a DICOM modality code (" in err and "several as separate values: --modality CR DX)" in err
    assert not (tmp_path / "s.sqlite").exists()


def test_modality_codes_are_read_in_any_case():
    from pneumonia_cnn.cli.interop import modality_codes
    assert modality_codes(["cr", "dx", "OT", "RG_X", " CR "]) == ("CR", "DX", "OT", "RG_X", "CR")


def test_listen_refuses_a_modality_that_is_no_dicom_code_before_it_listens(tmp_path, capsys):
    """listen --modality "CR DX" (one value, as a unit file may quote it) would have left every X-ray unscored
    ("modality DX is not one of CR DX"); refused as pacs refuses it, before the model loads or a port is bound."""
    for value in ("CR DX", "D\\X"):
        assert main(["listen", str(tmp_path / "none.pt"), "--send-to", "127.0.0.1:11112:PACS", "--spool",
                     str(tmp_path / "spool"), "--modality", "CR", value]) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith(f"error: --modality '{value}': not a DICOM modality code"), err
    assert not (tmp_path / "spool").exists()
