"""The result of one X-ray as a DICOM Structured Report (highdicom), and the Grad-CAM overlay as a Secondary
Capture image, both in the source image's study; and the SR read back into plain figures.

The SR is a Comprehensive SR holding a TID 1500 Measurement Report with one TID 1501 measurement group:

- finding type Pneumonia (SCT 233604007); the source image by reference (in the group and the evidence);
- algorithm identification (TID 4019): name ``pneumonia-cnn <architecture>``, version = the model id (run id),
  parameters = software version, threshold policy, calibration;
- NUM items: probability of pneumonia, the operating threshold, the out-of-distribution score and its cut-off
  (above it, flagged), the pneumonia rate the probability is stated for (unit ``1``);
- CODE items: the finding (Pneumonia: Present/Absent, i.e. the label at the threshold; Unknown for an image that
  is not an X-ray, which gets no label) and whether the image is within the training population (Yes/No/Unknown);
- TEXT items: where the rate came from (``given``, ``calibration images``), then (Comment, DCM 121106) each
  warning, out-of-distribution reason included.

Numbers, threshold and flag have no standard code, so they use the private scheme ``99PNEUMOCNN`` (declared in
the Coding Scheme Identification Sequence). UIDs are derived from the source SOP Instance UID and the model
id and its decision, so scoring an instance again replaces its report instead of adding a second one.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

SCHEME = "99PNEUMOCNN"
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
CHEST_XRAY = Code("399208008", "SCT", "Plain X-ray of chest")
PRESENT, ABSENT = Code("52101004", "SCT", "Present"), Code("2667000", "SCT", "Absent")
YES, NO, UNKNOWN = Code("373066001", "SCT", "Yes"), Code("373067005", "SCT", "No"), Code("261665006", "SCT", "Unknown")
PROBABILITY = Code("PCNN-1", SCHEME, "Probability of pneumonia")
THRESHOLD = Code("PCNN-2", SCHEME, "Operating threshold")
OOD_SCORE = Code("PCNN-3", SCHEME, "Out-of-distribution score")
IN_DISTRIBUTION = Code("PCNN-4", SCHEME, "Within the training population")
# the pneumonia rate the probability is stated for, and where it came from (--prevalence), as predict's outputs
PREVALENCE = Code("PCNN-5", SCHEME, "Pneumonia rate the probability is stated for")
PREVALENCE_SOURCE = Code("PCNN-6", SCHEME, "Source of the pneumonia rate")
OOD_THRESHOLD = Code("PCNN-7", SCHEME, "Out-of-distribution score cut-off")  # a score above it is flagged
COMMENT = Code("121106", "DCM", "Comment")
NO_UNITS = Code("1", "UCUM", "no units")
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
DISCLAIMER = "pneumonia-cnn AI result, research use only, not for diagnosis"


@dataclass(frozen=True)
class ModelIdentity:
    """What the SR says about the model: name, version (the model id) and parameters. ``key`` also tells
    apart decisions refitted on the same weights (threshold, calibration): it names the result's UIDs and the
    ``pacs`` state, so another decision scores again while the same one never does."""
    name: str
    version: str
    parameters: tuple[str, ...]
    positive_class: str
    key: str = ""

    def __post_init__(self):
        if not self.key:
            object.__setattr__(self, "key", self.version)

    @classmethod
    def of(cls, predictor) -> ModelIdentity:
        checkpoint = predictor.bundle.checkpoints[0]
        architectures = "+".join(c["model"]["name"] for c in predictor.bundle.checkpoints)
        decision = predictor.bundle.decision
        return cls(name=f"pneumonia-cnn {architectures}", version=predictor.model_id,
                   parameters=(f"software pneumonia-cnn {software_version()}", f"threshold policy {decision.policy}",
                               f"calibration {decision.calibration.method}",
                               f"run {checkpoint.get('run_id', '?')}"),
                   positive_class=predictor.class_names[1], key=f"{predictor.model_id}@{decision_digest(decision)}")


def decision_digest(decision) -> str:
    text = json.dumps(decision.to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pneumonia-cnn")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


DATE_VRS = ("DA", "DT", "TM")
SEXES = ("M", "F", "O", "")  # what highdicom accepts in PatientSex


def result_uid(source_sop_uid: str, model_key: str, kind: str, scored: str = "") -> str:
    """The same UID every time one model scores one instance's pixels (``scored``: ``pixels_digest`` of them): a
    repeat replaces, never duplicates, whichever engine, device or batch scored it. An image changed and re-sent
    under its old UID gets a report of a new UID: under the old one, Orthanc (as most PACS) kept the first report
    and answered Success, and the new result was lost."""
    return generate_uid(entropy_srcs=[source_sop_uid, model_key, kind, *([scored] if scored else [])])


def pixels_digest(gray: np.ndarray, source: Dataset | None = None) -> str:
    """The pixels the model scored (decoded and preprocessed), and whose they are (``source``'s patient and study:
    ``REPORTED_IDENTITY``), as a digest: not the floats of the result, which move in their last bits from one
    engine or batch size to another. An image re-sent after a correction of its patient or study (the same UID and
    pixels) gets a report of a new UID: under the old one, the PACS held two reports of one UID under two
    patients (WADO-RS answered 404 for it), or answered "duplicate" and kept the wrong patient's."""
    digest = hashlib.sha256(np.ascontiguousarray(gray).tobytes())
    for keyword in REPORTED_IDENTITY if source is not None else ():
        digest.update(b"\0" + str(getattr(source, keyword, "") or "").encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


# what a report copies that says whose image it is: a correction of any of them is a new report
REPORTED_IDENTITY = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
                     "StudyInstanceUID", "AccessionNumber", "StudyID")


def build_sr(source: Dataset, entry: dict, model: ModelIdentity, scored: str = "") -> hd.sr.ComprehensiveSR:
    """The Structured Report for one scored image (``entry``: probability, label, threshold,
    in_distribution, ood_score, warnings), in the source image's study."""
    source = _header_of(source)
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                              parameters=list(model.parameters))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=result_uid(source.SOPInstanceUID, model.key, "group",
                                                                     scored),
                                                     identifier="pneumonia-cnn result"),
        finding_type=PNEUMONIA, algorithm_id=algorithm, measurements=_measurements(entry),
        qualitative_evaluations=_evaluations(entry, model),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])
    if entry.get("prevalence_source"):
        group[0].ContentSequence.append(hd.sr.TextContentItem(name=PREVALENCE_SOURCE,
                                                              value=str(entry["prevalence_source"])[:1024],
                                                              relationship_type="CONTAINS"))
    for warning in entry.get("warnings") or []:
        group[0].ContentSequence.append(hd.sr.TextContentItem(name=COMMENT, value=warning[:1024],
                                                              relationship_type="CONTAINS"))
    # a serial number (LO) holds 64 characters: the end of the model id keeps a refit's digest
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=result_uid("device", model.key, "observer"),
                                                       name="pneumonia-cnn", model_name=model.name,
                                                       serial_number=model.version[-64:])
    measurement_report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device)),
        procedure_reported=CHEST_XRAY, imaging_measurements=[group])
    report = hd.sr.ComprehensiveSR(
        evidence=[source], content=measurement_report[0], series_instance_uid=result_uid(source.SeriesInstanceUID,
                                                                             model.key, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(source.SOPInstanceUID, model.key, "sr", scored),
        instance_number=_instance_number(source), manufacturer="pneumonia-cnn",
        is_complete=True, is_final=False, is_verified=False, series_description=DISCLAIMER[:64],
        coding_schemes=[hd.coding_schemes.CodingSchemeIdentificationItem(SCHEME, name="pneumonia-cnn result codes",
                                                             responsible_organization="pneumonia-cnn")])
    report.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the warnings' text is not all ASCII ("1–5 years")
    return report


def _header_of(source: Dataset) -> Dataset:
    """The source's attributes without its pixels, with the patient and study attributes that a report must
    carry (type 2: present, possibly empty) added empty where the modality left them out."""
    header = Dataset()
    for element in source:  # text values are decoded with the source's character set as they are read
        if element.keyword in ("PixelData", "SpecificCharacterSet"):
            continue
        if element.VR in DATE_VRS and not _readable_date(element) or \
                element.keyword == "PatientSex" and str(element.value or "") not in SEXES:
            # "2024" as a StudyDate, two birth dates, sex "U": highdicom refuses them, and the report with them;
            # empty is allowed (type 2)
            header.add_new(element.tag, element.VR, "")
        elif element.VR in ("LO", "SH", "PN") and element.VM == 1 and len(str(element.value)) > TEXT_LIMIT[element.VR]:
            header.add_new(element.tag, element.VR, _shortened(str(element.value), element.VR))
        elif element.VR == "PN" and element.VM > 1:  # a name given twice ("A^B\\C^D"): highdicom refused the
            # report; the first, as a viewer shows it
            header.add_new(element.tag, "PN", _shortened(str(element.value[0]), "PN"))
        else:
            header.add(element)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in header:
            setattr(header, keyword, "")
    # and written in UTF-8, as the report is: a source's "ISO_IR100" (a common misspelling pydicom reads as
    # Latin-1), a code extension given alone or a multi-valued set mixing UTF-8 in were refused by highdicom
    header.SpecificCharacterSet = "ISO_IR 192"
    return header


TEXT_LIMIT = {"LO": 64, "SH": 16, "PN": 64}  # characters (a name: per component group)


def _shortened(value: str, vr: str) -> str:
    """A patient name or a text value longer than DICOM allows, cut to its limit (the report copies it; a
    validating PACS would refuse a report with a 20,000-character name, and the node set it aside)."""
    if vr == "PN":
        return "=".join(group[:TEXT_LIMIT["PN"]] for group in value.split("="))
    return value[:TEXT_LIMIT[vr]]


def _readable_date(element) -> bool:
    """One valid value (or none): the patient and study attributes a report copies hold one each."""
    from pydicom.valuerep import DA, DT, TM
    if element.VM > 1:
        return False
    value = element.value
    try:
        return value in (None, "") or {"DA": DA, "DT": DT, "TM": TM}[element.VR](str(value)) is not None
    except (ValueError, TypeError):
        return False


def _measurements(entry: dict) -> list:
    values = [(PROBABILITY, entry["probability"]), (THRESHOLD, entry["threshold"])]
    if entry.get("ood_score") is not None:
        values.append((OOD_SCORE, entry["ood_score"]))
    if entry.get("ood_threshold") is not None:
        values.append((OOD_THRESHOLD, entry["ood_threshold"]))
    if entry.get("prevalence") is not None:
        values.append((PREVALENCE, entry["prevalence"]))
    return [hd.sr.Measurement(name=name, value=float(value), unit=NO_UNITS) for name, value in values]


def _evaluations(entry: dict, model: ModelIdentity) -> list:
    # an image that is not a chest X-ray (ood.withholds_label) has no finding to state: Unknown
    finding = UNKNOWN if entry["label"] is None else PRESENT if entry["label"] == model.positive_class else ABSENT
    inside = {True: YES, False: NO, None: UNKNOWN}[entry.get("in_distribution")]
    return [hd.sr.QualitativeEvaluation(PNEUMONIA, finding), hd.sr.QualitativeEvaluation(IN_DISTRIBUTION, inside)]


def build_overlay(source: Dataset, overlay_rgb: np.ndarray, model: ModelIdentity, scored: str = "") -> hd.sc.SCImage:
    """The Grad-CAM overlay (RGB uint8, H x W x 3) as a Secondary Capture image in the source's study; ``scored``
    as for ``build_sr``."""
    source = _header_of(source)
    overlay = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=_at_source_shape(overlay_rgb, source),
        photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=result_uid(source.SeriesInstanceUID, model.key, "sc-series"),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=result_uid(source.SOPInstanceUID, model.key, "sc",
                                                                          scored),
        instance_number=_instance_number(source), manufacturer="pneumonia-cnn",
        patient_orientation=("L", "F"), series_description="pneumonia-cnn Grad-CAM, not for diagnosis")
    # highdicom needs an orientation to build the image; the overlay's rows and columns are the source's, so it
    # states the source's, or none (type 2: empty) when the source's is missing or unusable: never a guess
    overlay.PatientOrientation = _orientation(source)
    # which image of the study the heat map is of (a PA and a lateral in one study looked alike)
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    overlay.SourceImageSequence = [reference]
    overlay.DerivationDescription = "Grad-CAM heat map of the model's input, blended on it, at the source's shape"
    return overlay


OVERLAY_MAX_SIDE = 1024  # pixels: enough to read a heat map, a tenth of a full-size X-ray's RGB bytes


def _at_source_shape(overlay_rgb: np.ndarray, source: Dataset) -> np.ndarray:
    """The overlay (made at the model's square input) resized to the source's aspect ratio, its longer side the
    source's up to ``OVERLAY_MAX_SIDE``: a 600 x 300 X-ray's overlay was a square, the chest squashed."""
    from PIL import Image
    rows, columns = int(getattr(source, "Rows", 0) or 0), int(getattr(source, "Columns", 0) or 0)
    rgb = np.ascontiguousarray(overlay_rgb, dtype=np.uint8)
    if rows < 1 or columns < 1:
        return rgb
    scale = min(1.0, OVERLAY_MAX_SIDE / max(rows, columns))
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))  # Pillow: (width, height)
    return rgb if size == rgb.shape[1::-1] else np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def _orientation(source: Dataset) -> list[str]:
    value = getattr(source, "PatientOrientation", None)
    values = [str(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else [str(value or "")]
    return values if len(values) == 2 and all(v and set(v) <= set("APRLHF") for v in values) else []


def _instance_number(source: Dataset) -> int:
    """The source's InstanceNumber when it is a positive integer (highdicom refuses others; "-3" is a valid
    IS), else 1."""
    try:
        number = int(getattr(source, "InstanceNumber", 1) or 1)
    except (TypeError, ValueError):
        return 1
    return number if number >= 1 else 1


def read_sr(dataset: Dataset) -> dict:
    """The figures of a report written by :func:`build_sr`: probability, threshold, ood_score, finding,
    in_distribution, warnings, model name and version, and the referenced source SOP Instance UID."""
    result = {"warnings": [], "sop_instance_uid": str(dataset.SOPInstanceUID),
              "study_instance_uid": str(dataset.StudyInstanceUID)}
    numbers = {PROBABILITY.value: "probability", THRESHOLD.value: "threshold", OOD_SCORE.value: "ood_score",
               PREVALENCE.value: "prevalence", OOD_THRESHOLD.value: "ood_threshold"}
    for item in _walk(dataset):
        concept = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        code = concept.CodeValue if concept is not None else None
        if item.ValueType == "NUM" and code in numbers:
            measured = item.MeasuredValueSequence[0]
            result[numbers[code]] = float(getattr(measured, "FloatingPointValue", measured.NumericValue))
        elif item.ValueType == "CODE" and code == PNEUMONIA.value:
            result["finding"] = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "CODE" and code == IN_DISTRIBUTION.value:
            result["in_distribution"] = {YES.value: True, NO.value: False}.get(item.ConceptCodeSequence[0].CodeValue)
        elif item.ValueType == "TEXT" and code == COMMENT.value:
            result["warnings"].append(str(item.TextValue))
        elif item.ValueType == "TEXT" and code == PREVALENCE_SOURCE.value:
            result["prevalence_source"] = str(item.TextValue)
        elif item.ValueType == "TEXT" and code in ("111001", "111003"):
            result["model_name" if code == "111001" else "model_version"] = str(item.TextValue)
        elif item.ValueType == "IMAGE" and "source_sop_instance_uid" not in result:
            result["source_sop_instance_uid"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return result


def _walk(dataset: Dataset):
    for item in getattr(dataset, "ContentSequence", []):
        yield item
        yield from _walk(item)
