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
