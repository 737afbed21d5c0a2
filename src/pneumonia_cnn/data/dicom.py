"""DICOM reading with pydicom: VOI LUT / windowing, MONOCHROME1 inversion, scaling of 12-16-bit data."""
from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ImageReadError, one_line
from .dicom_guard import dicom_problem
from .image import MAX_PIXELS, MIN_SIDE, ImageMeta, scale_to_uint8


class _DropDecoderTracebacks(logging.Filter):
    """pydicom logs the full traceback of every decoder plugin that fails before it raises one error listing
    them all; that error becomes the one-line reason given for the file, so the tracebacks are dropped (a
    server would otherwise log dozens of lines per corrupt upload)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_DropDecoderTracebacks())
# pydicom's GDCM plugin reads the buffer of a failed decode, which GDCM leaves empty, and reports that instead
GDCM_FAILURE = ("gdcm: 'NoneType' object has no attribute 'encode'", "gdcm: cannot decode the compressed data")


def _tag(dataset, name):
    """The element's value as text; a multi-valued one as DICOM writes it, values joined by a backslash."""
    value = getattr(dataset, name, None)
    if value is None:
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # pydicom's MultiValue
        value = "\\".join(str(v).strip() for v in value)
    return str(value).strip() or None


def read_dicom(path: Path, source=None, strict: bool = False):
    try:
        return _read_dicom(path, source, strict)
    except ImageReadError:
        raise
    except Exception as error:  # pydicom parses lazily: a corrupt element can raise almost anything, later
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImageReadError(path, f"corrupt DICOM ({type(error).__name__}: {message[:160]})") from None


def _read_dicom(path: Path, source=None, strict: bool = False):
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise ImageReadError(path, "DICOM support needs pydicom (pip install pydicom)") from None
    data = source.getvalue() if hasattr(source, "getvalue") else Path(path).read_bytes()
    problem = dicom_problem(data)  # frames x rows x columns from the header, before anything is inflated
    if problem:
        raise ImageReadError(path, problem)
    dataset = pydicom.dcmread(io.BytesIO(data), force=not strict)
    if data[128:132] != b"DICM" and "Rows" not in dataset:  # force=True reads any bytes as some element
        raise ImageReadError(path, "not a DICOM file (no DICM header and no image description)")
    if not any(name in dataset for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM has no pixel data")
    rows, cols = int(getattr(dataset, "Rows", 0) or 0), int(getattr(dataset, "Columns", 0) or 0)
    if rows * cols > MAX_PIXELS:
        raise ImageReadError(path, f"DICOM is {cols}x{rows} pixels, above the {MAX_PIXELS:,}-pixel limit")
    if rows < MIN_SIDE or cols < MIN_SIDE:  # as for other images: nothing to see, yet it would be scored
        raise ImageReadError(path, f"DICOM is only {cols}x{rows} pixels")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # missing decoders and bad data raise many types
        reason = one_line(error).replace(*GDCM_FAILURE)
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({reason})") from None
    if pixels.ndim == 3 and getattr(dataset, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    photometric = _tag(dataset, "PhotometricInterpretation") or "MONOCHROME2"
    if photometric == "PALETTE COLOR":  # the stored values are indices into the palette, not intensities
        pixels = _through_palette(path, dataset, pixels)
    if pixels.ndim == 3:
        pixels = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        photometric = "MONOCHROME2"
    try:
        values = apply_modality_lut(pixels, dataset)
        values = apply_voi_lut(values, dataset, index=0)
    except Exception:  # a broken LUT: fall back to the stored values rather than refuse the image
        values = pixels
    gray = scale_to_uint8(np.asarray(values))
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    tags = {key: _tag(dataset, key) for key in
            ("Modality", "BodyPartExamined", "ViewPosition", "PatientAge", "PatientSex", "PatientID",
             "PatientBirthDate", "StudyDate", "AcquisitionDate")}  # the dates give the age when PatientAge is absent
    return gray, ImageMeta(source_format="DICOM", original_size=gray.shape, tags={k: v for k, v in tags.items() if v})


def _through_palette(path, dataset, indices):
    from pydicom.pixels import apply_color_lut
    if "RedPaletteColorLookupTableDescriptor" not in dataset:
        raise ImageReadError(path, "PALETTE COLOR DICOM without its palette (no Red Palette Color Lookup Table "
                                   "Descriptor): its values are indices, not intensities")
    try:
        return apply_color_lut(indices, dataset)
    except Exception as error:  # a palette that does not fit the data: refused, never read as gray
        raise ImageReadError(path, f"PALETTE COLOR DICOM with an unusable palette ({one_line(error)})") from None
