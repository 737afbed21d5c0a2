"""The SR and the overlay without a PACS: contents read back, UIDs stable, the source referenced in its study;
the retry helper; the state file."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.interop.dicom_sr import ModelIdentity, build_overlay, build_sr, read_sr
from pneumonia_cnn.interop.network import TransferError, with_retries
from pneumonia_cnn.interop.state import SCHEMA, ScoredState

from .studies import xray_dicom

MODEL = ModelIdentity("pneumonia-cnn seed", "seed-run-1", ("software pneumonia-cnn 0.1.0",), "PNEUMONIA")
FLAGGED = {"probability": 0.8125, "label": "PNEUMONIA", "threshold": 0.43, "in_distribution": False,
           "ood_score": 3.5, "ood_threshold": 2.75,
           "warnings": ["outside the training population (children): the probability is not reliable"]}


def test_sr_holds_the_result_and_references_the_source(tmp_path):
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "CR"))
    report = build_sr(source, FLAGGED, MODEL)
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and report.Modality == "SR"  # Comprehensive SR
    assert report.StudyInstanceUID == source.StudyInstanceUID and report.PatientID == source.PatientID
    assert report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    figures = read_sr(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert figures == {**figures, "probability": 0.8125, "threshold": 0.43, "ood_score": 3.5, "ood_threshold": 2.75,
                       "finding": "Present",
                       "in_distribution": False, "warnings": FLAGGED["warnings"], "model_version": "seed-run-1",
                       "model_name": "pneumonia-cnn seed", "source_sop_instance_uid": source.SOPInstanceUID}
    again = build_sr(source, {**FLAGGED, "probability": 0.1, "label": "NORMAL"}, MODEL)
    assert again.SOPInstanceUID == report.SOPInstanceUID  # the same pixels scored again: replaces the report
    other = build_sr(source, FLAGGED, ModelIdentity("x", "another-run", (), "PNEUMONIA"))
    refit = build_sr(source, FLAGGED, ModelIdentity(MODEL.name, MODEL.version, (), "PNEUMONIA", key="seed-run-1@t2"))
    assert len({report.SOPInstanceUID, other.SOPInstanceUID, refit.SOPInstanceUID}) == 3  # another model or decision
    assert read_sr(again)["finding"] == "Absent"


def test_sr_for_a_header_with_only_the_uids():
    source = Dataset()
    source.SOPClassUID, source.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3.4.5"
    source.StudyInstanceUID, source.SeriesInstanceUID, source.Modality = "1.2.3", "1.2.3.4", "CR"
    source.Rows, source.Columns = 8, 8  # an image: the rest (patient, study dates) may be absent
    entry = {**FLAGGED, "in_distribution": None, "ood_score": None, "ood_threshold": None, "warnings": []}
    figures = read_sr(build_sr(source, entry, MODEL))
    assert figures["in_distribution"] is None and "ood_score" not in figures and "ood_threshold" not in figures
    assert figures["study_instance_uid"] == "1.2.3"


def test_a_malformed_date_is_left_empty_and_the_report_still_written(tmp_path):
    """StudyDate "2024" or a birth date "notadate" made highdicom refuse the SR, so a readable X-ray got no
    report and was filed as unreadable (a probe of listen); the report now carries them empty, the rest kept."""
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "CR",
                                        study_date="2024", PatientBirthDate="notadate", SeriesDate="20240315",
                                        sex="U"))
    report = build_sr(source, FLAGGED, MODEL)
    assert report.StudyDate == "" and report.PatientBirthDate == "" and report.StudyTime == "101500"
    assert report.PatientSex == ""
    source.PatientBirthDate, source.StudyTime, source.PatientSex = ["20240101", "20240102"], "25:00", "F"
    again = build_sr(source, FLAGGED, MODEL)  # two birth dates, an hour 25: empty too; a valid sex kept
    assert again.PatientBirthDate == "" and again.StudyTime == "" and again.PatientSex == "F"
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert read_sr(pydicom.dcmread(tmp_path / "sr.dcm"))["probability"] == 0.8125
    assert source.StudyDate == "2024"  # the image's own header is left as it was


@pytest.mark.parametrize("character_set", ["ISO_IR100", "ISO-8859-1", "ISO 2022 IR 100", ["ISO_IR 100", "ISO_IR 192"],
                                           "ISO_IR 100"])
def test_a_source_in_any_latin_1_spelling_gets_its_report_in_utf8(tmp_path, character_set):
    """A misspelt or mixed Specific Character Set (pydicom reads all of these as Latin-1) made highdicom refuse
    the report, so the scored X-ray was filed as unreadable (a probe of listen); the name keeps its letters."""
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "CR"))
    source.SpecificCharacterSet = character_set
    source.add_new(0x00100010, "PN", "Müller^Jürgen".encode("latin-1"))
    source.save_as(tmp_path / "latin.dcm")
    report = build_sr(pydicom.dcmread(tmp_path / "latin.dcm"), FLAGGED, MODEL)
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "sr.dcm")
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "Müller^Jürgen"
    assert read_sr(back)["probability"] == 0.8125


def test_values_longer_than_dicom_allows_are_cut_in_the_report(tmp_path):
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "CR"))
    source.PatientName, source.PatientID = "A" * 20_000 + "^B", "7" * 300
    report = build_sr(source, FLAGGED, MODEL)
    assert str(report.PatientName) == "A" * 64 and report.PatientID == "7" * 64
    assert source.PatientID == "7" * 300  # the source is not changed


def test_a_negative_instance_number_or_a_name_given_twice_still_gets_its_report(tmp_path):
    """A probe of listen and pacs: InstanceNumber -3 (a valid IS) and a PatientName or ReferringPhysicianName with
    two values made highdicom refuse the report and the overlay, so a readable X-ray was filed as unreadable."""
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "DX"))
    source.InstanceNumber, source.PatientName = "-3", ["Doe^Jane", "Roe^Ann"]
    source.add_new(0x00080090, "PN", ["Smith^A", "Jones^B"])
    source.save_as(tmp_path / "odd.dcm")
    source = pydicom.dcmread(tmp_path / "odd.dcm")
    report = build_sr(source, FLAGGED, MODEL)
    overlay = build_overlay(source, np.zeros((16, 16, 3), np.uint8), MODEL)
    assert report.InstanceNumber == overlay.InstanceNumber == 1
    assert str(report.PatientName) == str(overlay.PatientName) == "Doe^Jane"
    assert str(report.ReferringPhysicianName) == "Smith^A"
    source.InstanceNumber = "7"
    assert build_sr(source, FLAGGED, MODEL).InstanceNumber == 7


@pytest.mark.parametrize("orientation, stated", [(["R", "H"], ["R", "H"]), (["A", "FL"], ["A", "FL"]),
                                                 (None, []), (["X", "F"], []), (["L"], [])])
def test_the_overlay_states_the_sources_orientation_or_none(tmp_path, orientation, stated):
    """It always said L\\F: a viewer's markers on the heat map could show the patient's sides the wrong way round."""
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "DX"))
    if orientation is None:
        source.pop(0x00200020, None)
    else:
        source.PatientOrientation = orientation
    overlay = build_overlay(source, np.zeros((16, 16, 3), np.uint8), MODEL)
    overlay.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "sc.dcm")
    assert "PatientOrientation" in back and list(back.PatientOrientation or []) == stated


def test_overlay_is_a_secondary_capture_in_the_study(tmp_path):
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "DX"))
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200
    overlay = build_overlay(source, rgb, MODEL)
    assert overlay.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and overlay.StudyInstanceUID == source.StudyInstanceUID
    assert overlay.Manufacturer == "pneumonia-cnn" and overlay.pixel_array[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("shape, expected", [((600, 300), (600, 300)), ((3000, 2000), (1024, 683)),
                                             ((192, 192), (192, 192))])
def test_the_overlay_has_the_sources_shape_and_names_its_source(tmp_path, shape, expected):
    """A probe of pacs --overlay: a 600 x 300 X-ray's overlay was 192 x 192 (the model's input: the chest squashed)
    and named no source image, so in a study of several images nothing said which one it was of."""
    source = pydicom.dcmread(xray_dicom(np.full(shape, 100, np.uint8), tmp_path / "s.dcm", "DX"))
    rgb = np.zeros((192, 192, 3), np.uint8)
    rgb[:, 96:, 2] = 250  # the right half blue: still the right half at the source's shape
    overlay = build_overlay(source, rgb, MODEL)
    overlay.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "sc.dcm")
    assert (back.Rows, back.Columns) == expected
    pixels = back.pixel_array
    assert pixels[:, : expected[1] // 2 - 2, 2].max() == 0 and pixels[:, expected[1] // 2 + 2:, 2].min() == 250
    (reference,) = back.SourceImageSequence
    assert (reference.ReferencedSOPInstanceUID, reference.ReferencedSOPClassUID) == (source.SOPInstanceUID,
                                                                                    source.SOPClassUID)


def test_retries_back_off_then_name_the_failure():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        raise ConnectionError("connection refused")
    with pytest.raises(TransferError, match=r"^instance 1\.2: ConnectionError: connection refused "
                                            r"\(after 4 attempts\)$"):
        with_retries(flaky, "instance 1.2", attempts=4, backoff=0.5, sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0] and len(calls) == 4
    calls.clear()
    with pytest.raises(TransferError, match="KeyError"):  # not a network error: not retried
        with_retries(lambda: calls.append(1) or {}["x"], "instance 1.3", sleep=waits.append)
    assert len(calls) == 1


def test_state_remembers_per_model(tmp_path):
    state = ScoredState(tmp_path / "s.sqlite")
    state.record("1.1", "m1", "done", "9", "8", {"probability": 0.7, "label": "PNEUMONIA", "in_distribution": True},
                 report_uid="5.5")
    state.record("1.2", "m1", "failed", error="timeout")
    state.record("1.3", "m1", "unreadable", error="no pixel data")
    assert state.finished("m1") == {"1.1", "1.3"} and state.finished("m2") == set()
    assert state.produced() == {"5.5"} and state.counts("m1") == {"done": 1, "failed": 1, "unreadable": 1}
    state.record("1.2", "m1", "done", report_uid="5.6")
    row = next(r for r in state.rows("m1") if r["sop_instance_uid"] == "1.2")
    assert row["attempts"] == 2 and row["status"] == "done"
    state.close()


def test_state_counts_refusals_and_opens_a_file_written_before_them(tmp_path):
    import sqlite3
    path = tmp_path / "old.sqlite"
    old_schema = SCHEMA.replace("    refusals INTEGER NOT NULL DEFAULT 0,\n", "").replace("    refused_at REAL,\n", "")
    assert "refus" not in old_schema
    with sqlite3.connect(path) as db:
        db.execute(old_schema)
        db.execute("INSERT INTO instances (sop_instance_uid, model, status, attempts, updated) "
                   "VALUES ('1.1', 'm1', 'failed', 3, '2026-01-01T00:00:00+00:00')")
    state = ScoredState(path)
    assert state.refusals("1.1", "m1") == (0, None) and state.refusals("9.9", "m1") == (0, None)
    state.record("1.1", "m1", "given_up", error="HTTP 404", refusals=(3, 1700000000.5))
    state.record("1.2", "m1", "failed", error="HTTP 404", refusals=(1, 1700000001.0))
    assert state.refusals("1.1", "m1") == (3, 1700000000.5) and state.finished("m1") == set()
    assert state.finished("m1", ("given_up",)) == {"1.1"}
    assert state.retry_given_up("m2") == 0 and state.retry_given_up("m1") == 1
    assert state.finished("m1", ("given_up",)) == set() and state.refusals("1.1", "m1") == (0, None)
    row = next(r for r in state.rows("m1") if r["sop_instance_uid"] == "1.1")
    assert row["status"] == "failed" and row["attempts"] == 4
    state.record("1.2", "m1", "done", report_uid="5.7")  # a success ends the count
    assert state.refusals("1.2", "m1") == (0, None)
    state.close()
    ScoredState(path).close()  # opened again: nothing left to add


def test_a_state_file_that_cannot_be_written_is_one_line(tmp_path):
    import sqlite3
    ScoredState(tmp_path / "s.sqlite").close()
    state = ScoredState(tmp_path / "s.sqlite")
    state.db.close()
    state.db = sqlite3.connect(f"file:{tmp_path / 's.sqlite'}?mode=ro", uri=True)  # root ignores chmod
    with pytest.raises(PneumoniaCNNError, match=r"s\.sqlite: cannot write the state file \(attempt to write a "
                                                 r"readonly database\)$"):
        state.retry_given_up("m1")
    with pytest.raises(PneumoniaCNNError, match="cannot write the state file"):
        state.record("1.1", "m1", "done")
    state.close()


def test_an_overlay_that_cannot_be_made_never_costs_the_report(trained_run, tmp_path, monkeypatch):
    """With --overlay, a header that only the Secondary Capture refused sent the instance to unreadable/ with no
    report (one try covered both): the report now goes alone, and says why it has no overlay."""
    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.interop import scoring

    def refuses(*args, **kwargs):
        raise TypeError("Invalid type for a person name.")

    source = pydicom.dcmread(xray_dicom(np.full((64, 64), 90, np.uint8), tmp_path / "s.dcm", "DX"))
    scorer = scoring.DicomScorer(Predictor(trained_run, "cpu"), overlay=True)
    (made,) = scorer.score([source])
    assert made.error is None and len(made.outputs) == 2 and made.overlay_error is None
    monkeypatch.setattr(scoring, "build_overlay", refuses)
    (result,) = scorer.score([source])
    assert result.error is None and [o.Modality for o in result.outputs] == ["SR"]
    assert result.overlay_error == "overlay not made (TypeError: Invalid type for a person name.)"
    assert read_sr(result.outputs[0])["probability"] == pytest.approx(made.entry["probability"])
    assert result.overlay_uid is None and result.report_uid == made.report_uid


def test_changed_pixels_under_the_same_instance_get_reports_of_new_uids(tmp_path):
    """An image changed and re-sent under its old SOP Instance UID got its report under the old report's UID:
    Orthanc (as most PACS) kept the first and answered Success, so the new result was lost while the node said
    it was sent. The UIDs now come from the pixels scored too: the same pixels, the same UIDs whatever the result's
    last bits (an engine or batch size moves them), so a repeat replaces; other pixels, other UIDs."""
    from pneumonia_cnn.interop.dicom_sr import pixels_digest
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "DX"))
    pixels, changed_pixels = np.full((8, 8), 100, np.uint8), np.full((8, 8), 101, np.uint8)
    scored, changed = pixels_digest(pixels), pixels_digest(changed_pixels)
    assert scored == pixels_digest(pixels.copy()) != changed
    first = build_sr(source, FLAGGED, MODEL, scored)
    noise = build_sr(source, dict(FLAGGED, probability=0.8125 + 4.5e-9, ood_score=3.5 + 6e-6), MODEL, scored)
    other = build_sr(source, dict(FLAGGED, probability=0.0332, label="NORMAL"), MODEL, changed)
    assert first.SOPInstanceUID == noise.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID == other.SeriesInstanceUID  # one series of reports per source series
    overlay = np.zeros((16, 16, 3), np.uint8)
    assert build_overlay(source, overlay, MODEL, scored).SOPInstanceUID == \
        build_overlay(source, overlay, MODEL, pixels_digest(pixels.copy())).SOPInstanceUID != \
        build_overlay(source, overlay, MODEL, changed).SOPInstanceUID
