"""Refuse DICOM bombs from the header, before pydicom decodes or inflates anything.

pydicom inflates a deflate-compressed data set whole when it opens it, and decodes every frame when asked for
the pixels, so the reader's Rows x Columns check comes too late: a 1 MB upload can claim gigabytes. Here the
file meta and the image description (group 0028) are read first, inflating at most ``HEAD_BYTES`` of a
deflated data set, and the upload is refused when frames x rows x columns x samples passes the pixel limit,
or when a deflated data set inflates to more than its header declares.
"""
from __future__ import annotations

import io
import logging
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager

from .image import MAX_PIXELS

HEAD_BYTES = 1 << 20  # elements before the pixel data: tags, a few sequences, maybe an icon
CHUNK = 1 << 20
DEFLATED = "1.2.840.10008.1.2.1.99"


FIRST_GROUPS = frozenset(range(0x02, 0x29, 2))  # the even groups a data set with Rows (0028,0010) can start in
_reading = threading.local()  # the notes pydicom gives while this thread reads one file


class _KeepNotes(logging.Filter):
    """pydicom sends each warning to its logger and to ``warnings`` alike: the command line showed it three
    times, naming no file. While a thread reads a file the message is kept for that file instead, once. A record
    with a traceback is a decoder plugin's failure, which the reader words itself (the refusal, or the note of
    a file a later plugin read): left to the reader's filter, which drops it, never this file's note."""

    def filter(self, record: logging.LogRecord) -> bool:
        kept = getattr(_reading, "notes", None)
        if kept is None or record.exc_info is not None:
            return True
        message = record.getMessage()
        if message not in kept:
            kept.append(message)
        return False


for _name in ("pydicom", "pydicom.pixels.utils", "pydicom.pixels.decoders.base"):  # logger filters do not inherit
    logging.getLogger(_name).addFilter(_KeepNotes())
# The same messages as warnings: pydicom logs each before it warns, so they are on its logger above, where they
# can be told apart by thread (warnings.catch_warnings is process-wide, and files are read on many threads).
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


@contextmanager
def pydicom_notes():
    """The list of what pydicom says while this thread reads one file, each message once (the outer list when
    called inside another read)."""
    kept = getattr(_reading, "notes", None)
    if kept is not None:
        yield kept
        return
    _reading.notes = kept = []
    try:
        yield kept
    finally:
        _reading.notes = None


def looks_like_dicom(data: bytes) -> bool:
    """From a file's first 132 bytes: the 'DICM' magic, or a data set without the preamble (little endian), whose
    elements ascend from an even group between 0002 and 0028: the file meta, group 0008, or, where a writer left
    group 0008 out, the patient (0010), acquisition (0018), study (0020) or image (0028) groups. An image's data
    set holds Rows (0028,0010), so it starts by then; no image format the readers know starts with these bytes."""
    if data[128:132] == b"DICM":
        return True
    return len(data) >= 2 and data[0] in FIRST_GROUPS and data[1] == 0 and _elements_ascend(data)


def _elements_ascend(data: bytes) -> bool:
    """Whether the elements that start in ``data`` (little endian, explicit or implicit VR) have ascending tags,
    as DICOM requires: 20 MB of zeros after 08 00 read as a million empty elements, in 10 s, before pydicom
    found no image in them; here they are (0008,0000) then (0000,0000), refused from their first 16 bytes."""
    from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR
    offset, previous = 0, -1
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        tag = group << 16 | element
        if tag <= previous:
            return False
        code = data[offset + 4:offset + 6].decode("latin-1")
        if code in VR.__members__ and "_" not in code:
            if code in EXPLICIT_VR_LENGTH_32:
                if offset + 12 > len(data):
                    break
                header, length = 12, struct.unpack_from("<I", data, offset + 8)[0]
            else:
                header, length = 8, struct.unpack_from("<H", data, offset + 6)[0]
        else:  # implicit VR: a 4-byte length
            header, length = 8, struct.unpack_from("<I", data, offset + 4)[0]
        if length == 0xFFFFFFFF:  # a sequence of undefined length: its items follow, not the next element
            break
        previous, offset = tag, offset + header + length
    return True


def dicom_problem(source, max_pixels: int = MAX_PIXELS) -> str | None:
    """A one-line reason to refuse ``source`` (bytes, or a binary file open at its start) before decoding it, or
    None (also for non-DICOM data, and for headers too broken to read, which the reader then reports in its own
    words). A file is read only as far as its header, and a deflated one inflated in chunks, never kept whole."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    start = stream.tell()
    if not looks_like_dicom(stream.read(132)):
        return None
    with pydicom_notes():  # what the header says is reported by the reader of the whole file, if it is read
        return _header_problem(stream, start, max_pixels)


def _header_problem(stream, start: int, max_pixels: int) -> str | None:
    try:
        from pydicom.filereader import read_dataset, read_preamble
        stream.seek(start)
        read_preamble(stream, True)
        meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
        if str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
            return _deflated_problem(stream, max_pixels)
        import pydicom
        stream.seek(start)
        header = pydicom.dcmread(stream, force=True, stop_before_pixels=True, defer_size=CHUNK,
                                 specific_tags=["NumberOfFrames", "Rows", "Columns", "SamplesPerPixel",
                                                "BitsAllocated"])
    except Exception:  # broken headers: the reader explains them
        return None
    return _size_problem(header, max_pixels)[0]


def _size_problem(header, max_pixels: int) -> tuple[str | None, int]:
    """(reason or None, bytes the pixel data may take) from the image description."""
    def number(name, default):
        try:
            return int(str(getattr(header, name, default) or default).strip() or default)
        except ValueError:
            return default
    frames, rows, columns = number("NumberOfFrames", 1), number("Rows", 0), number("Columns", 0)
    samples, bits = number("SamplesPerPixel", 1), number("BitsAllocated", 16)
    pixels = max(frames, 1) * rows * columns * max(samples, 1)
    if pixels > max_pixels:
        return (f"DICOM is {frames} frame(s) of {columns}x{rows} pixels x {samples} sample(s) = {pixels:,} values, "
                f"above the {max_pixels:,} limit (checked before decoding)"), 0
    return None, pixels * max((bits + 7) // 8, 1)


def _deflated_problem(stream, max_pixels: int) -> str | None:
    from pydicom.filereader import read_dataset
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        head = _inflate(stream, inflater, HEAD_BYTES)
    except zlib.error as error:
        return f"corrupt deflated DICOM ({error})"
    header = read_dataset(io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag > 0x0028FFFF)
    complete = inflater.eof or len(head) < HEAD_BYTES
    if "Rows" not in header and not complete:
        return f"deflated DICOM without an image description in its first {HEAD_BYTES:,} bytes"
    reason, pixel_bytes = _size_problem(header, max_pixels)
    if reason:
        return reason
    budget, total = pixel_bytes + 2 * HEAD_BYTES, len(head)
    while not inflater.eof and total <= budget:  # count, never keep: what it inflates to is bounded first
        try:
            inflated = len(_inflate(stream, inflater, CHUNK))
        except zlib.error as error:
            return f"corrupt deflated DICOM ({error})"
        if not inflated and not inflater.eof:
            break  # truncated stream: the reader reports it
        total += inflated
    if total > budget:
        return (f"deflated DICOM inflates to more than {budget:,} bytes, more than its header declares "
                f"(decompression bomb)")
    return None


def _inflate(stream, inflater, size: int) -> bytes:
    """Up to ``size`` inflated bytes, reading the compressed stream a chunk at a time as the inflater needs it."""
    out = bytearray()
    while len(out) < size and not inflater.eof:
        compressed = inflater.unconsumed_tail or stream.read(CHUNK)
        if not compressed:
            break
        out += inflater.decompress(compressed, size - len(out))
    return bytes(out)


ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian: each fragment of encapsulated pixel data
# JPEG markers whose segment starts with precision, height, width: the start-of-frame markers (not DHT C4, JPG C8,
# DAC CC), JPEG-LS's SOF55 (F7) and hierarchical JPEG's DHP (DE)
FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7, 0xDE}
HEADER_LIMIT = 16 << 20  # bytes of a frame's codestream read for its size: its header segments, never its data
NEEDS_MORE = "more"


def compressed_frame_problem(pixel_data: bytes, rows: int, columns: int) -> str | None:
    """Why the first compressed frame (JPEG, JPEG-LS, JPEG 2000) is not decoded: its codestream states a size other
    than the header's Rows x Columns, or none at all, or its header is corrupt. Decoders follow the codestream, so
    an 18 MB file whose header said 224x224 over a 40000x40000 JPEG took 5 GB before the shapes were compared; a
    frame header in a later fragment, past large APP segments, or given by JPEG-LS's LSE had let such bombs through
    unchecked, and one stray byte after SOI made GDCM abort the whole process. None when the sizes agree."""
    head, shape, next_look = bytearray(), NEEDS_MORE, 4096
    for fragment in _fragments(pixel_data):
        head += fragment
        if len(head) >= next_look:  # parsed as the bytes double, not per fragment: 100,000 tiny fragments
            shape, next_look = codestream_shape(head), 2 * len(head)  # parsed each time were quadratic
            if shape != NEEDS_MORE or len(head) >= HEADER_LIMIT:
                break
    if shape == NEEDS_MORE:
        shape = codestream_shape(head, final=True)
    if isinstance(shape, tuple) and shape == (rows, columns):
        return None
    if isinstance(shape, tuple):
        return (f"compressed frame is {shape[1]}x{shape[0]} pixels, but the DICOM header says {columns}x{rows} "
                f"(not decoded)")
    return f"compressed frame {shape if shape != NEEDS_MORE else 'states no size in its header'} (not decoded)"


def _fragments(pixel_data: bytes):
    """The fragments of encapsulated pixel data after the basic offset table, in order (pydicom's parsing)."""
    from pydicom.encaps import generate_fragments
    if len(pixel_data) < 8 or pixel_data[:4] != ITEM_TAG:
        return iter(())
    return generate_fragments(memoryview(pixel_data)[8 + struct.unpack_from("<I", pixel_data, 4)[0]:].tobytes())


def codestream_shape(head: bytes | bytearray, final: bool = False):
    """(rows, columns) from the start of a JPEG, JPEG-LS or JPEG 2000 codestream (or JP2 file); ``NEEDS_MORE`` when
    ``head`` ends before the size (and ``final`` is False); otherwise a reason, such as "is not a JPEG codestream"."""
    shape = _jpeg2000_shape(head) if head[:2] == b"\xff\x4f" or head[4:8] == b"jP  " else \
        _jpeg_shape(head) if head[:2] == b"\xff\xd8" else ("is neither JPEG nor JPEG 2000" if len(head) >= 8 else
                                                       NEEDS_MORE)
    return "states no size in its header" if shape == NEEDS_MORE and final else shape


def _jpeg2000_shape(head: bytes):
    if head[:2] == b"\xff\x4f":  # a codestream: SOC, then at once SIZ with the reference grid and its offset
        if len(head) < 22:
            return NEEDS_MORE
        if head[2:4] != b"\xff\x51" or struct.unpack_from(">H", head, 4)[0] < 38:
            return "has a damaged JPEG 2000 header (no SIZ after SOC)"
        width, height, x_offset, y_offset = struct.unpack_from(">IIII", head, 8)
        return (height - y_offset, width - x_offset) if height > y_offset and width > x_offset else \
            "states an empty JPEG 2000 image"
    at = head.find(b"jp2c")  # a JP2 file: its codestream box, whose SIZ the decoders follow (not the ihdr box)
    return _jpeg2000_shape(head[at + 4:]) if at >= 0 and head[at + 4:at + 6] == b"\xff\x4f" else \
        NEEDS_MORE if at < 0 else "has a JP2 codestream box without a codestream"


def _jpeg_shape(head: bytes):
    """Segments one after another from SOI (fill bytes allowed) up to the frame header; anything else where a
    marker belongs is corrupt (libjpeg skips it with a warning, GDCM aborted the process)."""
    offset = 2
    while offset + 4 <= len(head):
        if head[offset] != 0xFF:
            return f"is corrupt: byte {head[offset]:#04x} at {offset} where a JPEG marker belongs"
        marker = head[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            offset += 2
        elif marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or the scan's start, before any frame header
            return "states no size before its data (not a plain JPEG frame header)"
        elif marker in FRAME_MARKERS:
            if offset + 9 > len(head):
                return NEEDS_MORE
            height, width = struct.unpack_from(">HH", head, offset + 5)
            # 0: given later (a DNL marker, or JPEG-LS's LSE for sizes over 65535): not checked, so not decoded
            return (height, width) if height and width else "states its size only after its header"
        else:
            offset += 2 + struct.unpack_from(">H", head, offset + 2)[0]
    return NEEDS_MORE
