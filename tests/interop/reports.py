"""What the tests compare: ``predict``'s JSON for files, and the reports stored in Orthanc read back."""
from __future__ import annotations

import io
import json
import time

import pydicom

from pneumonia_cnn.cli import main
from pneumonia_cnn.interop.dicom_sr import read_sr


def predict_json(checkpoint, paths, capsys) -> dict:
    capsys.readouterr()
    assert main(["predict", str(checkpoint), *map(str, paths), "--format", "json", "--device", "cpu"]) == 0
    return {row["path"]: row for row in json.loads(capsys.readouterr().out)}


def reports_in(orthanc) -> dict:
    """Every SR in Orthanc, read back from its stored file: {source SOP Instance UID: figures}."""
    found = {}
    for orthanc_id in orthanc.instances_of_modality("SR"):
        figures = read_sr(pydicom.dcmread(io.BytesIO(orthanc.file(orthanc_id))))
        assert figures["source_sop_instance_uid"] not in found, "two reports for one image"
        found[figures["source_sop_instance_uid"]] = figures
    return found


def wait_for_reports(orthanc, sop_uids, timeout: float = 90) -> dict:
    """The reports of ``sop_uids`` once all have arrived in Orthanc (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        reports = reports_in(orthanc)
        if set(sop_uids) <= set(reports):
            return reports
        assert time.monotonic() < deadline, f"reports missing for {set(sop_uids) - set(reports)}"
        time.sleep(0.3)
