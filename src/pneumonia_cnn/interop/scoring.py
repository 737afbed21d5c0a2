"""DICOM instances received over the network -> the predictor's decision -> an SR (and, on request, the Grad-CAM
overlay as a Secondary Capture), shared by ``pacs`` (DICOMweb) and ``listen`` (DIMSE).

Each instance is decoded from its own bytes by the same reader as ``predict`` (so the figures are the same as
for the file), and the batch is scored in one pass; an instance that cannot be decoded gets its one-line
reason and the others go on.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from ..calibration import shown_probability
from ..errors import ImageReadError
from ..ood.checks import SECONDARY_CAPTURE, XRAY_IMAGE_CLASSES, known_sop_class, other_sop_class, shown_label
from .dicom_sr import ModelIdentity, build_overlay, build_sr, pixels_digest
from .uids import is_uid

IMAGE_MODALITIES_NEVER_SCORED = {"SR", "KO", "PR", "SEG", "RTSTRUCT"}


@dataclass
class ScoredInstance:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    entry: dict | None = None  # probability, label, threshold, in_distribution, ood_score, warnings
    error: str | None = None
    outputs: list = field(default_factory=list)  # the SR, then the overlay when asked
    overlay_refused: str | None = None  # why the PACS refused the overlay (the report was stored)
    overlay_error: str | None = None  # why no overlay could be made (the report goes without it)

    @property
    def report_uid(self) -> str | None:
        return str(self.outputs[0].SOPInstanceUID) if self.outputs else None

    @property
    def overlay_uid(self) -> str | None:
        """The overlay stored with the report: None when none was asked for or the PACS refused it."""
        return str(self.outputs[1].SOPInstanceUID) if len(self.outputs) > 1 and not self.overlay_refused else None


def shown_result(entry: dict) -> str:
    """"p=0.0336 NORMAL" for a log or a terminal: the probability apart from the threshold, or "no label"."""
    return f"p={shown_probability(entry['probability'], entry['threshold'])} {shown_label(entry['label'])}"


def uids_of(dataset: Dataset) -> tuple[str, str, str]:
    return (str(getattr(dataset, "SOPInstanceUID", "?")), str(getattr(dataset, "StudyInstanceUID", "?")),
            str(getattr(dataset, "SeriesInstanceUID", "?")))




def shown_uid(uid) -> str:
    """A UID for a log line: at most 64 characters of it (a UID has no more), the rest counted."""
    uid = str(uid)
    return uid if len(uid) <= 64 else f"{uid[:64]}… ({len(uid)} characters)"


def uid_problem(dataset: Dataset) -> str | None:
    """Why a report could not reference this instance: a UID missing or not a UID ("not-a-uid\\n../x" was
    reported as "not-a-uid../x", a reference to nothing)."""
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not is_uid(getattr(dataset, keyword, None)):
            return f"its {keyword} is not a valid UID ({shown_uid(getattr(dataset, keyword, None))}): a report " \
                   "could not reference it"
    return None


IDENTIFIER_LIMITS = {"PatientID": 64, "IssuerOfPatientID": 64, "AccessionNumber": 16, "StudyID": 16}  # LO, SH


def identifier_problem(dataset: Dataset) -> str | None:
    """Why a report could not carry this instance's identifiers as they are: one longer than DICOM allows was cut
    to fit, and the report, under a PatientID or AccessionNumber the RIS and PACS do not know, was filed away from
    its image (another patient). Names and descriptions are still cut; an identifier never."""
    for keyword, limit in IDENTIFIER_LIMITS.items():
        value = getattr(dataset, keyword, None)
        if isinstance(value, MultiValue) and len(value) > 1:  # VM 1: copied as two values, the report was invalid
            return f"its {keyword} holds {len(value)} values, where DICOM allows one: a report could not name the " \
                   f"one it belongs to; correct it at the source"
        longest = max((len(str(v or "")) for v in (value if isinstance(value, MultiValue) else [value])), default=0)
        if longest > limit:
            return f"its {keyword} is {longest} characters, over DICOM's {limit}: a report could not carry it " \
                   f"whole, and under a shortened one it would be filed away from the image; correct it at the source"
    return None


def not_an_xray(dataset: Dataset) -> str | None:
    """Why an instance is not something to score (a report, our own output, another modality's image), or None."""
    return not_an_image(dataset) or other_modality_class(dataset)


def not_an_image(dataset: Dataset) -> str | None:
    """Why an instance is not an image to score (a report, our own output), or None. A PACS that forwards
    every new instance would otherwise send our reports and overlays back to be scored."""
    if str(getattr(dataset, "Modality", "")).upper() in IMAGE_MODALITIES_NEVER_SCORED:
        return f"modality {dataset.Modality} is not an image"
    if str(getattr(dataset, "Manufacturer", "")) == "pneumonia-cnn":
        return "written by pneumonia-cnn itself"
    sop_class = str(getattr(dataset, "SOPClassUID", "") or "")
    name = known_sop_class(sop_class)
    if sop_class == SECONDARY_CAPTURE or "Secondary Capture" in (name or ""):  # the multi-frame classes too
        return "a secondary capture, not an acquired X-ray"
    if name and "Image" not in name:
        return other_sop_class(name, "")  # a report or document, whatever its Modality claims
    return None


def other_modality_class(dataset: Dataset) -> str | None:
    """Why an image's SOP class is another modality's (a CT slice with Modality CR, a mammogram with DX were
    scored as chest X-rays), whatever its Modality claims; None for CR, DX, Secondary Captures (refused by
    ``not_an_image``) and a class pydicom does not know (a vendor's private one: left to the reader)."""
    sop_class = str(getattr(dataset, "SOPClassUID", "") or "")
    name = known_sop_class(sop_class)
    if not name or "Image" not in name or sop_class in XRAY_IMAGE_CLASSES or "Secondary Capture" in name:
        return None
    return other_sop_class(name, str(getattr(dataset, "Modality", "") or ""))


def dataset_bytes(dataset: Dataset) -> bytes:
    """The instance as a DICOM file in memory (the reader recognises DICOM by its file header)."""
    if not getattr(dataset, "file_meta", None) or "TransferSyntaxUID" not in dataset.file_meta:
        dataset.file_meta = FileMetaDataset(getattr(dataset, "file_meta", None) or {})
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


class DicomScorer:
    def __init__(self, predictor, overlay: bool = False):
        self.predictor, self.overlay = predictor, overlay
        logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every attribute copy at INFO
        # Their warnings about a header quote its values (a patient's name) into the log, over several lines;
        # what matters to the node is whether the instance could be read, which its own line says.
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(highdicom|pydicom)(\.|$)")
        self.model = ModelIdentity.of(predictor)
        self._explain_model = None

    def score(self, datasets: list[Dataset]) -> list[ScoredInstance]:
        results, pixels, metas, readable = [], [], [], []
        for dataset in datasets:
            result = ScoredInstance(*uids_of(dataset))
            results.append(result)
            result.error = uid_problem(dataset) or identifier_problem(dataset)
            if result.error:
                continue
            try:
                gray, meta = self.predictor.preprocess_bytes(dataset_bytes(dataset),
                                                             f"instance {result.sop_instance_uid}")
            except ImageReadError as error:
                result.error = error.reason
                continue
            except Exception as error:  # noqa: BLE001 - a dataset pydicom cannot even write back is unreadable too
                result.error = f"cannot encode the instance ({type(error).__name__}: {str(error)[:160]})"
                continue
            pixels.append(gray), metas.append(meta), readable.append((result, dataset))
        if readable:
            entries, _ = self.predictor.assess(np.stack(pixels), metas)
            for (result, dataset), entry, gray in zip(readable, entries, pixels):
                try:
                    result.outputs = [build_sr(dataset, entry, self.model, pixels_digest(gray, dataset))]
                    result.entry = entry
                except Exception as error:  # noqa: BLE001 - a header highdicom refuses spoils this report only
                    result.error = f"cannot write its report ({type(error).__name__}: {str(error)[:160]})"
                    continue
                if self.overlay:
                    self._add_overlay(result, dataset, gray)
        return results

    def _add_overlay(self, result: ScoredInstance, dataset: Dataset, gray: np.ndarray):
        """The optional overlay: one that cannot be made never costs the report (it did, for a header only the
        Secondary Capture refused)."""
        try:
            result.outputs.append(build_overlay(dataset, self._overlay_pixels(gray), self.model,
                                                pixels_digest(gray, dataset)))
        except Exception as error:  # noqa: BLE001 - whatever the cause, the report goes on without it
            result.overlay_error = f"overlay not made ({type(error).__name__}: {str(error)[:160]})"
            logging.getLogger("pneumonia_cnn").warning("instance %s: %s; the report is sent without it",
                                                       result.sop_instance_uid, result.overlay_error)

    def _overlay_pixels(self, gray: np.ndarray) -> np.ndarray:
        from ..explanation import grad_cam, overlay
        if self._explain_model is None:  # a private copy: Grad-CAM's hooks never touch the scorer's models
            self._explain_model = self.predictor.bundle.explain_model().to(self.predictor.device)
        return overlay(gray, grad_cam(self._explain_model, gray, self.predictor.device))
