"""``predict --format fhir``: one FHIR R4 ``DiagnosticReport`` holding an ``Observation`` per image (contained
resources, referenced from ``result``), with the same fields as the JSON and CSV outputs.

Per Observation: ``valueQuantity`` the probability of pneumonia; ``interpretation`` POS/NEG (the label at
the threshold); components for the label, the threshold, the rate and where it came from, the scoring engine and
precision, batch adaptation, ``in_distribution`` and the out-of-distribution score; each warning (the
out-of-distribution reason included) as a ``note``; the model id in ``device``; an unreadable file as status
``cancelled`` with ``dataAbsentReason`` error and the reason as a note. The document is checked against the
FHIR schema with ``fhir.resources`` (its R4B models: DiagnosticReport and Observation are unchanged from R4 4.0.1
in R4B 4.3.0).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from ..errors import PneumoniaCNNError
from .uids import is_uid

log = logging.getLogger("pneumonia_cnn")
CODE_SYSTEM = "urn:pneumonia-cnn:result"
UCUM = "http://unitsofmeasure.org"
SNOMED, LOINC = "http://snomed.info/sct", "http://loinc.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DISCLAIMER = "Research and teaching software, not a medical device: never the sole basis of a clinical decision."
DICOM_UID = "urn:dicom:uid"  # FHIR's system for DICOM UIDs, written urn:oid:UID (as ImagingStudy.identifier)
LINK_TAGS = ("PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SOPInstanceUID")


def dicom_links(path) -> dict:
    """The identifiers a DICOM file gives its result (patient, study, instance), read from its header alone, for
    an unreadable file too when its header can be read; {} for other images or a header that cannot be read.
    What pydicom says of the header (a UID that is not one) is one line naming the file, unless the reader said it
    when scoring the file (pydicom's own line named no file)."""
    from ..data.dicom_guard import pydicom_notes
    from ..data.readers import looks_like_dicom
    if not looks_like_dicom(Path(path)):
        return {}
    with pydicom_notes() as notes:
        values = _header_values(path)
    from ..data.dicom import SAID
    new = [note.strip() for note in notes if (str(path), note.strip()) not in SAID]
    if new:  # what the scoring read said already is not said twice (an escape sequence in a PatientID was)
        log.warning("warning: %s: %s", path, "; ".join(new))
    for tag in ("StudyInstanceUID", "SOPInstanceUID"):
        if not is_uid(values.get(tag, "")):
            values[tag] = ""
    return {tag: value for tag, value in values.items() if value}


def _header_values(path) -> dict:
    """LINK_TAGS' values; {} for a header that cannot be read, or a deflated file the guard refuses (pydicom
    inflates a deflated data set whole on opening it: a bomb among unreadable files is not opened here)."""
    try:
        import pydicom
        from pydicom.filereader import read_file_meta_info
        from pydicom.uid import DeflatedExplicitVRLittleEndian

        from ..data.dicom_guard import dicom_problem
        try:  # a file without the preamble has no file meta, and is not read as deflated
            deflated = read_file_meta_info(path).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        except Exception:  # noqa: BLE001 - no preamble, or a broken meta: not deflated as pydicom reads it
            deflated = False
        if deflated:
            with open(path, "rb") as handle:
                if dicom_problem(handle):
                    return {}
        # force: as predict reads it (a file without the 128-byte preamble is still DICOM)
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(LINK_TAGS), force=True)
        return {tag: _first(getattr(header, tag, "")) for tag in LINK_TAGS}
    except Exception:  # noqa: BLE001 - the row already says whether the file could be read
        return {}


def _first(value) -> str:
    """One value: a PatientID given twice ("A\\B", against its VM of 1) is its first, as a viewer shows it."""
    from pydicom.multival import MultiValue
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else ""
    return str(value or "").strip()


def _patient(links: dict) -> dict:
    identifier = {"value": links["PatientID"]}
    if links.get("IssuerOfPatientID"):
        identifier["assigner"] = {"display": links["IssuerOfPatientID"]}
    return {"type": "Patient", "identifier": identifier}


def _study(uid: str) -> dict:
    return {"type": "ImagingStudy", "identifier": {"system": DICOM_UID, "value": f"urn:oid:{uid}"},
            "display": f"DICOM study {uid}"}


def _concept(code: str, display: str, system: str = CODE_SYSTEM) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _number(value: float | None) -> dict:
    return {"value": float(value), "unit": "1", "system": UCUM, "code": "1"}


def _components(row: dict) -> list[dict]:
    label = {"code": _concept("label", "Label at the operating threshold")}
    if row["label"] is None:  # not a chest X-ray (ood.withholds_label): no label to give
        label["dataAbsentReason"] = _concept("not-applicable", "Not Applicable", ABSENT_REASON)
    else:
        label["valueCodeableConcept"] = {"text": row["label"]}
    components = [label, {"code": _concept("threshold", "Operating threshold"),
                          "valueQuantity": _number(row["threshold"])}]
    if row.get("prevalence") is not None:
        components.append({"code": _concept("prevalence", "Pneumonia rate the probability is stated for"),
                           "valueQuantity": _number(row["prevalence"])})
    inside = {"code": _concept("in-distribution", "Within the training population")}
    if row["in_distribution"] is None:
        inside["dataAbsentReason"] = _concept("unknown", "Unknown", ABSENT_REASON)
    else:
        inside["valueBoolean"] = bool(row["in_distribution"])
    components.append(inside)
    if row.get("ood_score") is not None:
        components.append({"code": _concept("ood-score", "Out-of-distribution score"),
                           "valueQuantity": _number(row["ood_score"])})
    if row.get("ood_threshold") is not None:  # a score above it is flagged
        components.append({"code": _concept("ood-threshold", "Out-of-distribution score cut-off"),
                           "valueQuantity": _number(row["ood_threshold"])})
    return components + _how_decided(row)  # after the earlier components, in their order


def _how_decided(row: dict) -> list[dict]:
    """Components for what decided the result beside the model: where the rate came from, the engine and precision
    that scored it, and whether the image's batch was adapted (a report with --adapt-batch said only the rate)."""
    texts = [("prevalence-source", "Where the pneumonia rate came from", row.get("prevalence_source")),
             ("scoring-engine", "Engine that scored the image", row.get("engine")),
             ("scoring-precision", "Numeric precision of the scoring", row.get("precision"))]
    components = [{"code": _concept(code, display), "valueString": value} for code, display, value in texts if value]
    if row.get("batch_adapted") is not None:
        components.append({"code": _concept("batch-adapted", "Batch-norm statistics re-estimated on the image's batch"),
                           "valueBoolean": bool(row["batch_adapted"])})
    if row.get("batch_adaptation"):
        components.append({"code": _concept("batch-adaptation", "Batch adaptation of the image's batch"),
                           "valueString": row["batch_adaptation"]})
    return components


def observation(row: dict, index: int, positive_class: str = "PNEUMONIA", links: dict | None = None) -> dict:
    """One image's result (``row``: a prediction's fields) as an Observation; ``links``: its DICOM
    identifiers (``dicom_links``), which name the patient (``subject``), the study (``derivedFrom``) and the
    instance."""
    links = links or {}
    resource = {"resourceType": "Observation", "id": f"image-{index}",
                "identifier": [{"system": "urn:pneumonia-cnn:image", "value": row["path"]}],
                "category": [_concept("imaging", "Imaging",
                                      "http://terminology.hl7.org/CodeSystem/observation-category")],
                "code": _concept("pneumonia-probability", "Probability of pneumonia"),
                "bodySite": _concept("51185008", "Thoracic structure", SNOMED),
                "device": {"display": f"pneumonia-cnn model {row.get('model') or '?'}"}}
    if links.get("PatientID"):
        resource["subject"] = _patient(links)
    # what it was derived from, not what it is (an Observation's identifier would say it is the image)
    derived = [_study(links["StudyInstanceUID"])] if links.get("StudyInstanceUID") else []
    if links.get("SOPInstanceUID"):
        derived.append({"type": "Media", "identifier": {"system": DICOM_UID,
                                                        "value": f"urn:oid:{links['SOPInstanceUID']}"},
                        "display": f"DICOM instance {links['SOPInstanceUID']}"})
    if derived:
        resource["derivedFrom"] = derived
    if row.get("error"):
        resource.update(status="cancelled", dataAbsentReason=_concept("error", "Error", ABSENT_REASON),
                        note=[{"text": f"unreadable: {row['error']}"}])
        return resource
    # the label as decided: under a --prevalence rate the stated probability can sit 1 ulp below the stated
    # threshold of a positive label (Decision.positive), and the interpretation said NEG beside it
    positive = row["label"] == positive_class
    resource.update(status="preliminary", valueQuantity=_number(row["probability"]), component=_components(row))
    if row["label"] is not None:  # an image that is not an X-ray is neither positive nor negative
        resource["interpretation"] = [_concept("POS" if positive else "NEG", "Positive" if positive else "Negative",
                                               INTERPRETATION)]
    if row.get("warnings"):
        resource["note"] = [{"text": warning} for warning in row["warnings"]]
    return resource


def diagnostic_report(rows: list[dict], issued: datetime | None = None, positive_class: str = "PNEUMONIA",
                      links: list[dict] | None = None) -> dict:
    """All images of one ``predict`` run as one DiagnosticReport (status preliminary: not verified); its
    ``subject`` when every image names the same patient, its ``imagingStudy`` the studies they name."""
    links = links or [{} for _ in rows]
    observations = [observation(row, index, positive_class, link)
                    for index, (row, link) in enumerate(zip(rows, links), start=1)]
    scored = [row for row in rows if not row.get("error")]
    labels = sorted({row["label"] for row in scored}, key=lambda label: (label is None, label or ""))
    counts = ", ".join(f"{sum(r['label'] == label for r in scored)} "
                       f"{'without a label (not a chest X-ray)' if label is None else label}" for label in labels)
    outside = sum(row["in_distribution"] is False for row in scored)
    conclusion = (f"{len(rows)} image(s): {counts or 'none scored'}"
                  + (f"; {len(rows) - len(scored)} unreadable" if len(scored) < len(rows) else "")
                  + (f"; {outside} outside the training population (probability not reliable)" if outside else "")
                  + f". {DISCLAIMER}")
    report = {"resourceType": "DiagnosticReport", "status": "preliminary",
              "category": [_concept("RAD", "Radiology", "http://terminology.hl7.org/CodeSystem/v2-0074")],
              "code": _concept("18748-4", "Diagnostic imaging study", LOINC),
              "issued": (issued or datetime.now(timezone.utc)).isoformat(timespec="seconds"),
              "contained": observations, "result": [{"reference": f"#{o['id']}"} for o in observations],
              "conclusion": conclusion}
    patients = {(link.get("PatientID"), link.get("IssuerOfPatientID")) for link in links}
    if len(patients) == 1 and links[0].get("PatientID"):  # one patient, named by every image
        report["subject"] = _patient(links[0])
    studies = sorted({link["StudyInstanceUID"] for link in links if link.get("StudyInstanceUID")})
    if studies:
        report["imagingStudy"] = [_study(uid) for uid in studies]
    return report


def validate(document: dict) -> bool:
    """Check the document against the FHIR models of ``fhir.resources``; False when it is not installed,
    a one-line error when the document does not conform."""
    try:
        from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    except ImportError:
        return False
    try:
        DiagnosticReport.model_validate(document)
    except ValueError as error:  # pydantic's ValidationError: each error names the field and the rule
        first = error.errors()[0] if hasattr(error, "errors") else {"loc": (), "msg": str(error)}
        where = ".".join(str(part) for part in first["loc"]) or "document"
        raise PneumoniaCNNError(f"FHIR DiagnosticReport does not validate: {where}: {first['msg']}") from None
    return True
