"""``predict --format fhir``: a FHIR R4 DiagnosticReport with one Observation per image, valid against the FHIR
models of fhir.resources, carrying the same figures as ``predict --format json``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.interop.fhir import validate
from tests.conftest import write_image


def run(argv, capsys):
    capsys.readouterr()
    main(argv)
    return capsys.readouterr().out


def component(observation: dict, code: str) -> dict:
    return next(c for c in observation["component"] if c["code"]["coding"][0]["code"] == code)


def test_fhir_report_validates_and_matches_json(trained_run, xray_sources, tmp_path, capsys):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    blank = write_image(tmp_path / "blank.png", np.full((64, 64), 128, np.uint8))
    paths = [str(xray_sources["NORMAL"][0]), str(xray_sources["PNEUMONIA"][0]), str(blank), str(tmp_path / "gone.png")]
    base = ["predict", str(trained_run), *paths, "--device", "cpu"]
    expected = json.loads(run(base + ["--format", "json"], capsys))
    document = json.loads(run(base + ["--format", "fhir"], capsys))
    report = DiagnosticReport.model_validate(document)  # raises on any departure from the FHIR models
    assert report.status == "preliminary" and len(document["contained"]) == 4
    assert [r["reference"] for r in document["result"]] == [f"#{o['id']}" for o in document["contained"]]
    by_path = {o["identifier"][0]["value"]: o for o in document["contained"]}
    for row in expected:
        observation = by_path[row["path"]]
        assert row["model"] in observation["device"]["display"]
        if row["error"]:
            assert observation["status"] == "cancelled" and row["error"] in observation["note"][0]["text"]
            continue
        assert observation["valueQuantity"]["value"] == row["probability"]
        assert component(observation, "threshold")["valueQuantity"]["value"] == row["threshold"]
        if row["label"] is None:  # the blank image: not an X-ray, no label, neither POS nor NEG
            assert "interpretation" not in observation and "valueCodeableConcept" not in component(observation, "label")
            continue
        assert component(observation, "label")["valueCodeableConcept"]["text"] == row["label"]
        assert observation["interpretation"][0]["coding"][0]["code"] == ("POS" if row["label"] == "PNEUMONIA"
                                                                         else "NEG")
        assert component(observation, "in-distribution").get("valueBoolean") == row["in_distribution"]
        assert [n["text"] for n in observation.get("note", [])] == row["warnings"]
    flagged = by_path[str(blank)]
    assert [row["label"] for row in expected][2] is None
    assert component(flagged, "in-distribution")["valueBoolean"] is False
    assert any("the probability is not reliable" in n["text"] for n in flagged["note"])
    assert "1 unreadable" in document["conclusion"] and "1 outside the training population" in document["conclusion"]


def test_a_document_that_breaks_the_rules_is_refused():
    with pytest.raises(PneumoniaCNNError, match="does not validate: code: Field required"):
        validate({"resourceType": "DiagnosticReport", "status": "preliminary"})


def test_a_dicom_result_names_its_patient_study_and_instance(trained_run, xray_sources, tmp_path, capsys):
    """The DiagnosticReport for DICOM input had no subject and no study: it could not be filed against a
    patient's record, and its only identifier was a local path."""
    import pydicom
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    from .studies import xray_dicom
    first = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "a.dcm", patient_id="MRN-17", IssuerOfPatientID="H1")
    second = xray_dicom(xray_sources["PNEUMONIA"][0], tmp_path / "b.dcm", patient_id="MRN-17",
                        IssuerOfPatientID="H1", study_uid=pydicom.dcmread(first).StudyInstanceUID)
    other = xray_dicom(xray_sources["PNEUMONIA"][1], tmp_path / "c.dcm", patient_id="MRN-99")
    jpeg = str(xray_sources["NORMAL"][1])
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in (first, second, other)}
    document = json.loads(run(["predict", str(trained_run), str(first), str(second), "--device", "cpu",
                               "--format", "fhir"], capsys))
    DiagnosticReport.model_validate(document)
    study = headers[first].StudyInstanceUID
    assert document["subject"] == {"type": "Patient", "identifier": {"value": "MRN-17", "assigner": {"display": "H1"}}}
    assert [s["identifier"] for s in document["imagingStudy"]] == [{"system": "urn:dicom:uid",
                                                                    "value": f"urn:oid:{study}"}]
    for observation, path in zip(document["contained"], (first, second)):
        assert observation["subject"] == document["subject"]
        study_ref, instance_ref = observation["derivedFrom"]
        assert study_ref["type"] == "ImagingStudy" and study_ref["identifier"]["value"] == f"urn:oid:{study}"
        assert instance_ref["type"] == "Media" and instance_ref["identifier"] == {
            "system": "urn:dicom:uid", "value": f"urn:oid:{headers[path].SOPInstanceUID}"}
        assert [i["system"] for i in observation["identifier"]] == ["urn:pneumonia-cnn:image"]  # it is not the image
    # a DICOM without its 128-byte preamble, which predict reads, and a PatientID given twice
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(first.read_bytes()[128 + 4:])
    twice = pydicom.dcmread(other)
    twice.PatientID = ["MRN-5", "MRN-6"]
    twice.save_as(tmp_path / "twice.dcm")
    rows = json.loads(run(["predict", str(trained_run), str(bare), str(tmp_path / "twice.dcm"), "--device", "cpu",
                           "--format", "fhir"], capsys))["contained"]
    assert [o["subject"]["identifier"]["value"] for o in rows] == ["MRN-17", "MRN-5"]
    mixed = json.loads(run(["predict", str(trained_run), str(first), str(other), jpeg, "--device", "cpu",
                            "--format", "fhir"], capsys))
    DiagnosticReport.model_validate(mixed)
    assert "subject" not in mixed and len(mixed["imagingStudy"]) == 2  # two patients: each Observation names its own
    assert [o.get("subject", {}).get("identifier", {}).get("value") for o in mixed["contained"]] == \
        ["MRN-17", "MRN-99", None]
    assert "derivedFrom" not in mixed["contained"][2]  # a JPEG names no study


def test_a_header_note_is_said_once_in_a_fhir_report(xray_sources, tmp_path):
    """pydicom's note on a PatientID with a stray escape byte was printed twice: when the image was read for
    scoring, and again when its identifiers were read for the report's links."""
    import subprocess
    import sys

    from .studies import xray_dicom
    path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "p2.dcm", patient_id="PAT 2\x1b")
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "predict", "builtin", str(path), "--format", "fhir"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr.count("Found unknown escape sequence") == 1, done.stderr
