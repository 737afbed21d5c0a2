"""Chest X-ray studies as a modality writes them, made with pydicom from the shared real X-rays: CR or DX,
MONOCHROME2 or MONOCHROME1 (inverted), 12-bit, with the patient's age, the view and the body part."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def xray_dicom(source_image, target: Path, modality: str = "DX", photometric: str = "MONOCHROME2",
               patient_id: str = "P001", age: str | None = "003Y", sex: str = "F", view: str = "PA",
               body_part: str = "CHEST", study_date: str = "20240315", study_uid: str | None = None,
               pixel_data: bool = True, **extra) -> Path:
    """Write one X-ray instance (its own study unless ``study_uid`` is given) from an image file or a uint8
    array; returns the path."""
    gray = source_image if isinstance(source_image, np.ndarray) else np.asarray(Image.open(source_image).convert("L"))
    gray = gray.astype(np.uint16) * 16  # 8-bit -> 12-bit
    if photometric == "MONOCHROME1":
        gray = 4095 - gray  # MONOCHROME1: bright is low; a correct reader inverts it back
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(target), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = patient_id, f"Test^{patient_id}", sex, ""
    if age:
        ds.PatientAge = age
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = study_date, "101500", "1", f"A{patient_id}"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 1, 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, body_part, view
    ds.Manufacturer, ds.InstitutionName = extra.pop("Manufacturer", "TestRay"), extra.pop("InstitutionName", "Site A")
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality == "DX":
        ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    if pixel_data:
        ds.PixelData = gray.astype(np.uint16).tobytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target
