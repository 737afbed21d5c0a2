"""Refuse DICOM bombs from the header, before pydicom decodes or inflates anything.

pydicom inflates a deflate-compressed data set whole when it opens it, and decodes every frame when asked for
the pixels, so the reader's Rows x Columns check comes too late: a 1 MB upload can claim gigabytes. Here the
file meta and the image description (group 0028) are read first, inflating at most ``HEAD_BYTES`` of a
deflated data set, and the upload is refused when frames x rows x columns x samples passes the pixel limit,
or when a deflated data set inflates to more than its header declares.
"""
from __future__ import annotations

import io
import zlib

from .image import MAX_PIXELS

HEAD_BYTES = 1 << 20  # elements before the pixel data: tags, a few sequences, maybe an icon
CHUNK = 1 << 20
DEFLATED = "1.2.840.10008.1.2.1.99"


def looks_like_dicom(data: bytes) -> bool:
    """The 'DICM' magic, or a data set without the preamble starting at group 0002 or 0008 (no image format
    the readers know starts with these bytes)."""
    return data[128:132] == b"DICM" or data[:2] in (b"\x02\x00", b"\x08\x00")


def dicom_problem(source, max_pixels: int = MAX_PIXELS) -> str | None:
    """A one-line reason to refuse ``source`` (bytes, or a binary file open at its start) before decoding it, or
    None (also for non-DICOM data, and for headers too broken to read, which the reader then reports in its own
    words). A file is read only as far as its header, and a deflated one inflated in chunks, never kept whole."""
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    start = stream.tell()
    if not looks_like_dicom(stream.read(132)):
        return None
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
