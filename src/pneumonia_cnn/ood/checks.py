"""Checks that need no model: blank, noise, colour; DICOM modality, body part, view, age; and what the flag
means in words."""
from __future__ import annotations

import re
import unicodedata

import numpy as np
from pydicom.uid import UID

from ..data.age import patient_age_years

NOT_XRAY = "not an X-ray"
AGE_OUTSIDE = "patient age"
TOO_SMALL = "too small for the model"  # a thumbnail or preview: enlarged to the input, its detail is missing
SMALLEST_LIMIT = 112  # pixels: the size flag's limit is half the model's input, at most this
NOT_FRONTAL_CHEST = "not a frontal chest radiograph"  # what the model was trained on: DICOM modality, body part, view
OTHER_VIEW = f"{NOT_FRONTAL_CHEST}: DICOM view"  # still a chest X-ray: it keeps its label beside the flag
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR", "RG")
# secondary captures and "other" often hold a scanned or exported radiograph: the header cannot tell, so these
# are only warned about
UNKNOWN_KIND_MODALITIES = ("SC", "OT")
CHEST_WORDS = ("CHEST", "THORAX", "TORAX", "TORAC", "LUNG")  # TORAC: Italian TORACE, Spanish TORÁCICO
FRONTAL_VIEWS = ("PA", "AP")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# the image classes of a projection radiograph: any other known image class (CT, MR, mammography, ultrasound,
# nuclear medicine, PET, intra-oral, angiography...) is another modality's image, whatever its Modality says
XRAY_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
                      "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
                      "1.2.840.10008.5.1.4.1.1.1.1.1"}  # Digital X-Ray Image Storage - For Processing
NO_LABEL = "no label"  # printed for an image that is not a chest X-ray (JSON null, an empty CSV cell)
FLAG_MEANING = "outside the training population ({population}): the probability is not reliable"
DEFAULT_POPULATION = "children 1–5 years, one hospital"


# ------------------------------------------------------------------ checks that need no model
# Roughness: mean |Laplacian| / std, at the image's pixels and on 2 x 2 means. Noise and textures stay rough when
# averaged (pixel noise 3.8 / 3.7, salt and pepper 1.5-2.6 / 2.4-3.2, noise resized from another size 2.2 / 3.1,
# gravel 1.3 / 2.3, grass 1.7 / 2.4); an X-ray's added noise averages out: X-rays blurred, darkened and noised as
# benchmarks/decision.py's simulated site read up to 2.03 at the pixels (the pixel bound alone gave 19 of 520 of
# them no label, and 12% of the test X-rays under noise of 0.05) but at most 1.15 averaged; the shared X-rays at
# most 0.29 (0.86 at 64 pixels with CLAHE, whose means read up to 1.7)
NOISE_ROUGHNESS, NOISE_COARSE_ROUGHNESS = 1.2, 2.0


def image_statistics(gray: np.ndarray) -> dict:
    values = gray.astype(np.float32)
    height, width = values.shape[0] // 2 * 2, values.shape[1] // 2 * 2
    coarse = values[:height, :width].reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
    return {"std": float(values.std()), "roughness": _roughness(values),
            "coarse_roughness": _roughness(coarse) if min(coarse.shape) >= 3 else 0.0}


def _roughness(values: np.ndarray) -> float:
    smooth = (values[1:-1, 1:-1] * 4 - values[:-2, 1:-1] - values[2:, 1:-1] - values[1:-1, :-2] - values[1:-1, 2:])
    return float(np.abs(smooth).mean() / (values.std() + 1e-6))


def input_warnings(gray: np.ndarray, meta=None, intended_use: dict | None = None) -> list[str]:
    """Checks that need no model: blank, noise, colour photographs; DICOM modality, body part, view, age."""
    warnings = []
    stats = image_statistics(gray)
    if stats["std"] < 3:
        warnings.append(f"{NOT_XRAY}: the image is blank (almost uniform)")
    elif stats["roughness"] > NOISE_ROUGHNESS and stats["coarse_roughness"] > NOISE_COARSE_ROUGHNESS:
        warnings.append(f"{NOT_XRAY}: the image looks like noise, not anatomy")
    if meta is not None and getattr(meta, "saturation", 0) > 0.15:
        warnings.append(f"{NOT_XRAY}: the image is in colour (X-rays are grayscale)")
    warnings += size_warnings(gray, meta)
    frames = int(getattr(meta, "frames", 1) or 1)
    if frames > 1:  # a second view, a tomosynthesis stack: the model read the first alone
        warnings.append(f"the file holds {frames} frames or pages: only the first was scored")
    tags = getattr(meta, "tags", {}) or {}
    warnings += dicom_kind_warnings(tags)
    age = patient_age_years(tags)
    age_range = (intended_use or {}).get("age_range_years")
    if age is not None and age_range and not (age_range[0] <= age <= age_range[1]):
        warnings.append(f"{AGE_OUTSIDE} {age:.3g} years is outside the training population "
                        f"({age_range[0]:g}-{age_range[1]:g} years)")
    return warnings


def size_warnings(gray: np.ndarray, meta=None) -> list[str]:
    """A file under half the model's input (``gray``'s height or width) was enlarged more than twice: what the
    model reads is missing, and normal X-rays drift towards pneumonia without another sign (a thumbnail or a
    preview sent by mistake). The limit is never above 112 pixels, so that a model with a large input is not
    flagged on the 224-pixel images it may well have been trained on."""
    size = getattr(meta, "original_size", None)
    if not size:
        return []
    height, width = int(size[0]), int(size[1])
    input_height, input_width = gray.shape[-2:]
    if height < min(input_height / 2, SMALLEST_LIMIT) or width < min(input_width / 2, SMALLEST_LIMIT):
        return [f"{TOO_SMALL}: {width}x{height} pixels, under half its {input_width}x{input_height} input (the "
                f"detail it reads is missing)"]
    return []


def dicom_kind_warnings(tags: dict) -> list[str]:
    """What the DICOM header says the image is, when that is not a frontal chest radiograph. Sites write these
    freely, so the body part is matched as a word anywhere ("PORT CHEST"; accents removed: "TÓRAX") and the
    view by its first word ("AP SUPINE", "AP\\PORTABLE"); an empty tag says nothing."""
    found = []
    modality = str(tags.get("Modality") or "").strip().upper()
    if modality in UNKNOWN_KIND_MODALITIES:
        found.append(f"DICOM modality {modality} (secondary capture or other): check that the image is a "
                     f"frontal chest radiograph")
    elif modality and modality not in RADIOGRAPH_MODALITIES:
        found.append(f"{NOT_FRONTAL_CHEST}: DICOM modality {modality} (CR/DX/DR/RG expected)")
    found += sop_class_warnings(str(tags.get("SOPClassUID") or ""), modality)
    body = str(tags.get("BodyPartExamined") or "").strip().upper()
    plain = unicodedata.normalize("NFKD", body).encode("ascii", "ignore").decode()
    if body and not any(word in plain for word in CHEST_WORDS):
        found.append(f"{NOT_FRONTAL_CHEST}: DICOM body part {body}")
    view = str(tags.get("ViewPosition") or "").strip().upper()
    if view and (re.findall(r"[A-Z]+", view) or [""])[0] not in FRONTAL_VIEWS:
        found.append(f"{OTHER_VIEW} {view} (PA/AP expected)")
    return found


def sop_class_warnings(sop_class: str, modality: str) -> list[str]:
    """What the SOP class says, whatever the Modality claims: a CT slice with Modality CR, a mammogram with DX, or
    a structured report holding pixels were scored as chest X-rays by ``predict`` and ``serve`` (``pacs`` and
    ``listen`` refuse them, ``other_sop_class``). A class pydicom does not know (a vendor's) says nothing."""
    name = known_sop_class(sop_class)
    if not name or sop_class in XRAY_IMAGE_CLASSES or modality not in ("", *RADIOGRAPH_MODALITIES,
                                                                       *UNKNOWN_KIND_MODALITIES):
        return []  # a Modality CT, MR...: its own warning says it
    if sop_class == SECONDARY_CAPTURE or "Secondary Capture" in name:  # the multi-frame classes too
        return [] if modality in UNKNOWN_KIND_MODALITIES else [
            f"DICOM SOP class {name} (a secondary capture): check that the image is a frontal chest radiograph"]
    return [f"{NOT_FRONTAL_CHEST}: DICOM {other_sop_class(name, modality)}"]


def other_sop_class(name: str, modality: str) -> str:
    """Why the SOP class ``name`` (neither a radiograph's nor a secondary capture's) is not scored, in words."""
    if "Image" not in name:
        return f"SOP class {name} is not an image"  # a report or document, whatever its Modality claims
    return f"SOP class {name} is another modality's image, not an X-ray (its Modality {modality or 'missing'} " \
           f"notwithstanding)"


def known_sop_class(sop_class: str) -> str | None:
    """The name of a SOP class pydicom knows, or None."""
    name = UID(sop_class).name if sop_class else ""
    return name if name != sop_class and UID(sop_class).type == "SOP Class" else None


def withholds_label(warnings) -> bool:
    """The image is not a chest X-ray: not an X-ray at all (blank, noise, a colour photograph), or its DICOM header
    says another modality's image, no image, or another body part. The model's probability is computed, but no
    label is given: an interface that reads only the label recorded pneumonia for a blank image (0.9967) and for a
    head CT. A chest X-ray of another view (lateral) keeps its label beside the flag."""
    return any(str(warning).startswith(NOT_XRAY) or (str(warning).startswith(NOT_FRONTAL_CHEST) and
                                                      not str(warning).startswith(OTHER_VIEW)) for warning in warnings)


def shown_label(label: str | None) -> str:
    """The label, or what an image that is not an X-ray gets instead (``ood.withholds_label``)."""
    return NO_LABEL if label is None else label


def flag_reasons(gray: np.ndarray, meta=None, intended_use: dict | None = None) -> list[str]:
    """The input warnings that set the out-of-distribution flag whatever the score: the image is not an
    X-ray; it is too small for the model (``size_warnings``); its DICOM says it is not a frontal
    chest radiograph (another modality, body part or view: the model has never seen one, so its probability
    means nothing there); or it puts the patient's age outside the training population's range. A secondary
    capture is only warned about (its header cannot tell)."""
    return [w for w in input_warnings(gray, meta, intended_use)
            if w.startswith((NOT_XRAY, AGE_OUTSIDE, NOT_FRONTAL_CHEST, TOO_SMALL))]


def training_population(intended_use: dict | None = None) -> str:
    """The population in a few words, from the checkpoint's intended use (the Kaggle set's by default)."""
    use = intended_use or {}
    ages = use.get("age_range_years")
    if not ages:
        stated = str(use.get("population", ""))
        return DEFAULT_POPULATION if not use else stated if stated and not stated.startswith("not stated") \
            else "the training images' population, not stated"
    who = "children" if float(ages[1]) < 18 else "patients"
    sites = re.findall(r"\b(centers?|centres?|hospitals?)\b", str(use.get("population", "")).lower())
    one_site = len(sites) == 1 and not sites[0].endswith("s")
    return f"{who} {float(ages[0]):g}–{float(ages[1]):g} years" + (", one hospital" if one_site else "")


def flag_message(intended_use: dict | None = None) -> str:
    """What the flag means, as the outputs say it."""
    return FLAG_MEANING.format(population=training_population(intended_use))
