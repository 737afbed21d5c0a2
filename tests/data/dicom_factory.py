"""Write small DICOM files with pydicom for tests."""
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid


def write_dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", bits_stored=12, window=None, pixel_data=True,
                **tags):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = tags.pop("Modality", "DX")
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_head(rows: int, columns: int, marker: int = 0xC0, precision: int = 8) -> bytes:
    """SOI and a one-component frame header stating ``rows`` x ``columns``: what the readers check before any
    decoder runs (a codestream of another size, or none, is refused first), so that what follows reaches them."""
    return (b"\xff\xd8\xff" + bytes([marker]) + b"\x00\x0b" + bytes([precision]) + rows.to_bytes(2, "big")
            + columns.to_bytes(2, "big") + b"\x01\x01\x11\x00")


def jpeg2000_head(rows: int, columns: int) -> bytes:
    """SOC and a one-component SIZ segment stating ``rows`` x ``columns`` (one tile, no offsets)."""
    body = (0).to_bytes(2, "big") + b"".join(value.to_bytes(4, "big") for value in
                                             (columns, rows, 0, 0, columns, rows, 0, 0)) + b"\x00\x01\x07\x01\x01"
    return b"\xff\x4f\xff\x51" + (len(body) + 2).to_bytes(2, "big") + body
