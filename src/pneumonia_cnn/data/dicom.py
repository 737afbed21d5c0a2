"""DICOM reading with pydicom: VOI LUT / windowing, MONOCHROME1 inversion, scaling of 12-16-bit data."""
from __future__ import annotations

import collections
import io
import logging
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ImageReadError, one_line
from .dicom_guard import FRAME_MARKERS, HEADER_LIMIT, _fragments, compressed_frame_problem, dicom_problem, pydicom_notes
from .image import MAX_PIXELS, MIN_SIDE, ImageMeta, scale_to_uint8

log = logging.getLogger(__name__)
NOT_DICOM = "not a DICOM file (no DICM header and no image description)"


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


def read_dicom(path: Path, data: bytes | None = None):
    """``data``: an upload's bytes (None: the file at ``path`` is read). What pydicom and the decoders say while
    reading is reported once, naming the file, when it is read; a refused file's reason says enough."""
    with pydicom_notes() as notes:
        try:
            result = _read_dicom(path, data, notes)
        except ImageReadError:
            raise
        except Exception as error:  # pydicom parses lazily: a corrupt element can raise almost anything, later
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ImageReadError(path, f"corrupt DICOM ({type(error).__name__}: {message[:160]})") from None
    if notes:
        log.warning("warning: %s: %s", path, "; ".join(note.strip() for note in notes))
        SAID.extend((str(path), note.strip()) for note in notes)
    return result


# (file, note) pairs said when read: a second read of the same header (FHIR's links) says only what is new
SAID: collections.deque = collections.deque(maxlen=4096)


def _read_dicom(path: Path, data: bytes | None, notes: list):
    try:
        import pydicom
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise ImageReadError(path, "DICOM support needs pydicom (pip install pydicom)") from None
    # a file is read by pydicom from its handle, after its header: never read whole first (nor held twice)
    try:
        source = io.BytesIO(data) if data is not None else open(path, "rb")
    except OSError as error:
        raise ImageReadError(path, error.strerror or str(error)) from None
    with source:
        problem = dicom_problem(source)  # frames x rows x columns from the header, before anything is inflated
        if problem:
            raise ImageReadError(path, problem)
        source.seek(0)
        dataset = pydicom.dcmread(source, force=True)
    if dataset.preamble is None and "Rows" not in dataset:  # force=True reads any bytes as some element
        raise ImageReadError(path, NOT_DICOM)
    if not any(name in dataset for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM has no pixel data")
    if "TransferSyntaxUID" not in dataset.file_meta:  # a bare data set: the encoding pydicom found is its syntax
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                               ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    rows, cols = int(getattr(dataset, "Rows", 0) or 0), int(getattr(dataset, "Columns", 0) or 0)
    if rows * cols > MAX_PIXELS:
        raise ImageReadError(path, f"DICOM is {cols}x{rows} pixels, above the {MAX_PIXELS:,}-pixel limit")
    if rows < MIN_SIDE or cols < MIN_SIDE:  # as for other images: nothing to see, yet it would be scored
        raise ImageReadError(path, f"DICOM is only {cols}x{rows} pixels")
    problem = excess_pixel_data(dataset, rows, cols)
    if problem:
        raise ImageReadError(path, problem)
    return _to_gray(path, dataset, _first_frame(path, dataset, notes), notes)


def number_of_frames(dataset) -> int:
    """NumberOfFrames, 1 when absent or unreadable (pydicom warns of a 0, and reads one frame)."""
    try:
        return max(int(str(getattr(dataset, "NumberOfFrames", 1) or 1).strip() or 1), 1)
    except ValueError:
        return 1


def excess_pixel_data(dataset, rows: int, cols: int) -> str | None:
    """Uncompressed pixel data holding a whole row or more beyond what the header declares: the header does not
    describe the image. 112 rows declared over 224 rows of data were scored as the top half of the chest, the
    rest dropped with a pydicom warning that ``listen`` and ``pacs`` did not show. A pad byte is not a row."""
    bits = int(getattr(dataset, "BitsAllocated", 0) or 0)
    if "PixelData" not in dataset or dataset.file_meta.TransferSyntaxUID.is_compressed or bits < 8 or bits % 8:
        return None
    frames = number_of_frames(dataset)
    row_bytes = cols * max(int(getattr(dataset, "SamplesPerPixel", 1) or 1), 1) * bits // 8
    held, declared = len(dataset.PixelData), frames * rows * row_bytes
    if held - declared < row_bytes:
        return None
    return (f"DICOM pixel data holds {held:,} bytes, {(held - declared) // row_bytes:,} row(s) of {cols} pixels more "
            f"than its header's {frames} frame(s) of {cols}x{rows}: the header does not describe the image")


def _to_gray(path: Path, dataset, pixels: np.ndarray, notes: list):
    photometric = _tag(dataset, "PhotometricInterpretation") or "MONOCHROME2"
    if photometric == "PALETTE COLOR":  # the stored values are indices into the palette, not intensities
        pixels = _through_palette(path, dataset, pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        pixels = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        photometric = "MONOCHROME2"
    if pixels.ndim != 2:
        raise ImageReadError(path, f"DICOM pixel data decoded to an array of shape {pixels.shape}, not one image")
    gray = scale_to_uint8(np.asarray(_through_luts(dataset, pixels, notes)))
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    tags = {key: _tag(dataset, key) for key in
            ("Modality", "SOPClassUID", "BodyPartExamined", "ViewPosition", "PatientAge", "PatientSex", "PatientID",
             "PatientBirthDate", "StudyDate", "AcquisitionDate")}  # the dates give the age when PatientAge is absent
    return gray, ImageMeta(source_format="DICOM", original_size=gray.shape, tags={k: v for k, v in tags.items() if v},
                           frames=number_of_frames(dataset))


def _through_luts(dataset, pixels: np.ndarray, notes: list) -> np.ndarray:
    """The modality LUT (rescale), then the first VOI LUT or window. A broken one is not a reason to refuse the
    image: the stored values are used instead (the window too is skipped, being in the rescaled values' units),
    or the rescaled values where only the window is broken; either way the file's note says what was skipped and
    why (it was silent, and the window dropped). Broken: a value that is no finite number, or a result that is
    (a RescaleSlope of 1e308 overflowed to an all-black image, with numpy's warning naming no file), or that
    makes every pixel alike (a slope of 0, a window far from the values, a width of 1e308)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    try:
        values = _applied(apply_modality_lut, pixels, dataset, RESCALE, "ModalityLUTSequence")
    except Exception as error:
        notes.append(f"modality LUT not applied ({one_line(error, 200)}): stored pixel values used, without the "
                     f"window")
        return pixels
    try:
        return _applied(lambda data, ds: apply_voi_lut(data, ds, index=0), values, dataset, WINDOW, "VOILUTSequence")
    except Exception as error:
        notes.append(f"VOI LUT / window not applied ({one_line(error, 200)}): the full range of values used")
        return values


RESCALE, WINDOW = ("RescaleSlope", "RescaleIntercept"), ("WindowCenter", "WindowWidth")


def _applied(apply, values: np.ndarray, dataset, names: tuple, table: str) -> np.ndarray:
    """``apply(values, dataset)``, or ValueError saying why its result is not used. pydicom skips, without a word,
    a rescale or window it cannot read unless both values are present; a LUT table (``table``) comes first."""
    bad = "" if table in dataset else _not_numbers(dataset, names)
    if bad:
        raise ValueError(bad)
    with np.errstate(all="ignore"):  # an overflow is found in the result, and said once, naming the file
        result = np.asarray(apply(values, dataset))
    lost = _lost(values, result)
    if lost:
        given = ", ".join(f"{name} {_first_value(dataset, name)}" for name in names if name in dataset)
        raise ValueError(f"{table if table in dataset or not given else given}: {lost}")
    return result


def _lost(before: np.ndarray, after: np.ndarray) -> str:
    """How a LUT's result lost the image ("" when it did not): values beyond floating point, or all contrast. No
    full-size copy is made where the values are all finite (as integer pixel data always is)."""
    if after is before or after.shape != before.shape or after.size == 0:
        return ""
    with np.errstate(all="ignore"):
        finite_after = np.count_nonzero(np.isfinite(after))
        if finite_after < (before.size if before.dtype.kind in "biu" else np.count_nonzero(np.isfinite(before))):
            return "the values overflow to inf or NaN"
        if finite_after == 0:
            return ""
        finite = after if finite_after == after.size else after[np.isfinite(after)]
        low, high = float(finite.min()), float(finite.max())
        if high > low and not np.isfinite([high - low, 255.0 / (high - low)]).all():  # 1e308 wide, or 1e-320
            return f"the values span {high - low:g}, beyond floating point"
        if low == high and float(np.nanmin(before)) != float(np.nanmax(before)):
            return f"every pixel becomes {low:g}"
    return ""


def _first_value(dataset, name: str) -> str:
    return (_tag(dataset, name) or "").split("\\")[0]


def _not_numbers(dataset, names) -> str:
    """Which of these elements, when present, has a first value that is no finite number ("" when none)."""
    bad = []
    for name in names:
        text = _first_value(dataset, name) if name in dataset else "0"
        try:
            finite = bool(np.isfinite(float(text)))
        except ValueError:
            finite = False
        if not finite:
            bad.append(f"{name} {text!r} is not a number")
    return "; ".join(bad)


def _codestream_syntaxes() -> frozenset:
    from pydicom import uid
    return frozenset(uid.JPEGTransferSyntaxes + uid.JPEGLSTransferSyntaxes + uid.JPEG2000TransferSyntaxes
                     + [uid.HTJ2K, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL])


def _first_frame(path: Path, dataset, notes: list) -> np.ndarray:
    """The first frame's pixels, the only one decoded (gray or colour alike: a colour multi-frame file gave a
    4-D array that ended the whole run). The decoders that keep quiet go first; GDCM, whose libjpeg prints its
    warnings on the process's stderr from C, last. Its C output is left there: pointing file descriptor 2
    elsewhere for the call took what other threads logged meanwhile (a server's log lines), and a temporary
    file for it made every fallback fail where TMPDIR is not writable."""
    plugins = _plugins(dataset)
    if not plugins:  # native (uncompressed) data, or a syntax nothing here decodes: pydicom's own path and words
        dataset.pixel_array_options(index=0)
        try:
            return dataset.pixel_array
        except Exception as error:  # missing decoders and bad data raise many types
            raise ImageReadError(path, f"cannot decode DICOM pixel data ({one_line(error, 400)})") from None
    if dataset.file_meta.TransferSyntaxUID in _codestream_syntaxes():  # RLE states no size; its decoder follows ours
        problem = compressed_frame_problem(dataset.PixelData, int(dataset.Rows), int(dataset.Columns)) or \
            _components_problem(dataset)
        if problem:
            raise ImageReadError(path, problem)
    reasons = {}
    for plugin in sorted(plugins, key=lambda name: name == "gdcm"):
        dataset.pixel_array_options(index=0, decoding_plugin=plugin)
        try:
            pixels = dataset.pixel_array
        except Exception as error:
            reasons[plugin] = _plugin_reason(plugin, error)
            continue
        notes += _refusals_before(plugin, reasons)
        return pixels
    said = "; ".join(reasons[name] for name in plugins if name in reasons).replace(*GDCM_FAILURE)
    if all("does not support" in reason for reason in reasons.values()):  # pydicom names what would read it
        said += _install_hint(dataset)
    raise ImageReadError(path, f"cannot decode DICOM pixel data ({said})")


def _refusals_before(plugin: str, reasons: dict) -> list[str]:
    """The note of a file read by ``plugin`` after decoders that support its syntax refused its data (likely
    damaged: GDCM reads a JPEG without its end marker); [] when none did. pydicom's log of each failure is not
    the file's note: the file was read."""
    refused = {name: reason.removeprefix(f"{name}: ") for name, reason in reasons.items()
               if "does not support" not in reason}
    if not refused:
        return []
    return [f"read by {plugin} after {' and '.join(refused)} refused it ({'; '.join(refused.values())})"]


def _plugins(dataset) -> list[str]:
    """The decoder plugins pydicom has for the data's transfer syntax, in its order; [] for native data."""
    from pydicom.pixels import get_decoder
    try:
        decoder = get_decoder(dataset.file_meta.TransferSyntaxUID)
        return [] if decoder.is_native else list(decoder.available_plugins)
    except Exception:  # no or an unknown transfer syntax: pydicom's own path says so
        return []


def _plugin_reason(plugin: str, error: Exception) -> str:
    """pydicom's "Unable to decode as exceptions were raised by all available plugins:" then "  NAME: REASON"."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    reason = " ".join(lines) if lines else f"{plugin}: {one_line(error)}"
    return reason if len(reason) <= 200 else reason[:199] + "…"


def _install_hint(dataset) -> str:
    """pydicom's names for the decoders it lacks ("pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1")
    as the command that installs them."""
    from pydicom.pixels import get_decoder
    packages = []
    for missing in get_decoder(dataset.file_meta.TransferSyntaxUID).missing_dependencies:
        needs = missing.partition(" - requires ")[2]
        packages += [re.split(r"[<>=!~ ]", name.strip())[0] for name in re.split(r",|\band\b", needs)]
    packages = [name for name in dict.fromkeys(packages) if name and name != "numpy"]
    return f"; to read it: pip install {' '.join(packages)}" if packages else ""


def _through_palette(path, dataset, indices):
    from pydicom.pixels import apply_color_lut
    if "RedPaletteColorLookupTableDescriptor" not in dataset:
        raise ImageReadError(path, "PALETTE COLOR DICOM without its palette (no Red Palette Color Lookup Table "
                                   "Descriptor): its values are indices, not intensities")
    try:
        return apply_color_lut(indices, dataset)
    except Exception as error:  # a palette that does not fit the data: refused, never read as gray
        raise ImageReadError(path, f"PALETTE COLOR DICOM with an unusable palette ({one_line(error)})") from None


def _components_problem(dataset) -> str | None:
    """Why a compressed frame whose codestream has another number of components than the header's SamplesPerPixel
    is not decoded: the header and the pixels disagree (a 3-component JPEG under SamplesPerPixel 1 was refused by
    Pillow, then read by GDCM and scored as some gray image). None when they agree or either is unreadable."""
    try:
        samples = int(str(getattr(dataset, "SamplesPerPixel", 1)).strip() or 1)
    except ValueError:
        return None
    components = codestream_components(dataset.PixelData)
    if components is None or components == samples:
        return None
    return (f"compressed frame has {components} colour component(s), but the DICOM header says SamplesPerPixel "
            f"{samples} (not decoded: the header and the pixels disagree)")


def codestream_components(pixel_data: bytes) -> int | None:
    """The number of components the first compressed frame states (JPEG, JPEG-LS: its frame header; JPEG 2000:
    SIZ's Csiz), reading its fragments' bytes as they double, up to ``HEADER_LIMIT``; None where none is found."""
    head, next_look = bytearray(), 4096
    for fragment in _fragments(pixel_data):
        head += fragment[:HEADER_LIMIT - len(head)]
        if len(head) >= next_look or len(head) >= HEADER_LIMIT:
            found, next_look = _components(head), 2 * len(head)
            if found is not None or len(head) >= HEADER_LIMIT:
                return found
    return _components(head)


def _components(head: bytes | bytearray) -> int | None:
    if head[:2] == b"\xff\x4f":  # JPEG 2000: SOC, SIZ (marker, length, Rsiz, eight 32-bit sizes), then Csiz
        return struct.unpack_from(">H", head, 40)[0] if len(head) >= 42 and head[2:4] == b"\xff\x51" else None
    if head[4:8] == b"jP  ":  # a JP2 file: its codestream box
        at = head.find(b"jp2c")
        return _components(head[at + 4:]) if at >= 0 else None
    offset = 2 if head[:2] == b"\xff\xd8" else len(head)
    while offset + 4 <= len(head) and head[offset] == 0xFF:  # the segments up to the frame header
        marker = head[offset + 1]
        if marker in FRAME_MARKERS:
            return head[offset + 9] if offset + 10 <= len(head) else None
        if marker in (0xD8, 0xD9, 0xDA):
            return None
        standalone = marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7
        offset += 1 if marker == 0xFF else 2 if standalone else 2 + struct.unpack_from(">H", head, offset + 2)[0]
    return None
