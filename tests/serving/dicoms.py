"""DICOM files built byte by byte for the bomb tests: the pixel data is streamed into the compressor, never
held, so a file that inflates to 490 MB costs the test a few seconds and little memory."""
from __future__ import annotations

import zlib

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid


def _explicit_little(write, value) -> bytes:
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = True, False
    write(stream, value)
    return stream.getvalue()


def _image_description(rows: int, columns: int, frames: int) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def dicom_file(rows: int, columns: int, frames: int = 1, pixel_bytes: int | None = None, deflate: bool = False,
               fill: int = 0) -> bytes:
    """A DICOM file whose pixel data holds ``pixel_bytes`` bytes of ``fill`` (default: what the header says)."""
    pixel_bytes = rows * columns * frames if pixel_bytes is None else pixel_bytes
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflate else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    head = (_explicit_little(write_dataset, _image_description(rows, columns, frames))
            + b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_bytes.to_bytes(4, "little"))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS) if deflate else None
    parts = [compressor.compress(head) if deflate else head]
    block = bytes([fill]) * (1 << 22)
    left = pixel_bytes
    while left:
        piece = block[:min(left, len(block))]
        parts.append(compressor.compress(piece) if deflate else piece)
        left -= len(piece)
    if deflate:
        parts.append(compressor.flush())
    file_meta = _explicit_little(lambda s, m: write_file_meta_info(s, m, enforce_standard=True), meta)
    return b"\0" * 128 + b"DICM" + file_meta + b"".join(parts)
