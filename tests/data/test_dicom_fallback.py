"""GDCM as the fallback decoder, and data sets without preamble, from a review of the readers (2026-11-28): the
stderr GDCM's fallback held took other threads' log lines and needed a writable TMPDIR, a file GDCM read after
Pillow refused it was reported as truncated, and a bare data set without group 0008 was no longer read."""
import io
import logging
import tempfile
import threading

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from pneumonia_cnn.data.readers import read_image, read_image_bytes
from tests.data.test_reader_defects import write_dicom

GRADIENT = ((np.add.outer(np.arange(128), np.arange(128))) // 2).astype(np.uint8)


@pytest.fixture
def no_eoi(tmp_path):
    """A JPEG baseline DICOM whose stream lacks its end marker (FF D9): Pillow refuses it ("image file is
    truncated"), GDCM reads it whole."""
    pytest.importorskip("gdcm")
    buffer = io.BytesIO()
    Image.fromarray(GRADIENT).save(buffer, format="JPEG", quality=90)
    path = write_dicom(tmp_path / "no_eoi.dcm", GRADIENT)
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([buffer.getvalue()[:-2]])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    for plugin, reads in (("pillow", False), ("gdcm", True)):  # what the tests below rest on
        dataset = pydicom.dcmread(path)
        dataset.pixel_array_options(decoding_plugin=plugin)
        try:
            error = np.abs(dataset.pixel_array.astype(int) - GRADIENT).mean()
        except RuntimeError:
            error = None
        assert (error is not None and error < 2) if reads else error is None, plugin
    return path


def test_a_file_gdcm_reads_after_pillow_refused_it_says_so_not_that_it_is_truncated(no_eoi, caplog):
    """pydicom logs each failed plugin's exception before trying the next; that record was kept as the file's
    note, so a file that was read printed "warning: …: image file is truncated (4 bytes not processed)"."""
    caplog.set_level(logging.WARNING)
    pixels, meta = read_image(no_eoi)
    assert meta.source_format == "DICOM" and np.abs(pixels.astype(int) - GRADIENT).mean() < 2
    warned = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"warning: {no_eoi}: read by gdcm after pillow refused it "
                                                     f"(image file is truncated ("), warned
    assert not [record for record in caplog.records if record.exc_info], "a decoder traceback reached the log"


def test_a_file_pillow_reads_has_no_note(tmp_path, caplog):
    buffer = io.BytesIO()
    Image.fromarray(GRADIENT).save(buffer, format="JPEG", quality=90)
    path = write_dicom(tmp_path / "good.dcm", GRADIENT)
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    caplog.set_level(logging.WARNING)
    read_image(path)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_line_another_thread_logs_during_gdcms_fallback_reaches_stderr(no_eoi, capfd, monkeypatch):
    """File descriptor 2 pointed at a temporary file while GDCM's fallback decoded: what another thread wrote to
    stderr meanwhile (a server's log line about another request) was taken as this file's note, or lost."""
    from pydicom.pixels import get_decoder
    plugins = get_decoder(JPEGBaseline8Bit)._available
    decode = plugins["gdcm"]
    stream = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's stderr, as a handler has it
    other = logging.getLogger("tests.another_request")
    handler = logging.StreamHandler(stream)
    other.addHandler(handler)
    monkeypatch.setattr(other, "propagate", False)

    def while_gdcm_decodes(*arguments, **options):
        speaker = threading.Thread(target=other.warning, args=("another request's line",))
        speaker.start()
        speaker.join()
        return decode(*arguments, **options)
    monkeypatch.setitem(plugins, "gdcm", while_gdcm_decodes)
    try:
        read_image(no_eoi)
    finally:
        other.removeHandler(handler)
        stream.close()
    assert "another request's line" in capfd.readouterr().err.splitlines()


def test_gdcms_fallback_needs_no_writable_temporary_folder(no_eoi, monkeypatch):
    """Its stderr went to a temporary file: with TMPDIR missing or read-only every fallback decode failed
    ("gdcm: [Errno 2] No such file or directory") and the file was refused."""
    monkeypatch.setenv("TMPDIR", "/nonexistent/tmp")
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/tmp")
    pixels, meta = read_image(no_eoi)
    assert meta.source_format == "DICOM" and np.abs(pixels.astype(int) - GRADIENT).mean() < 2


# ---------- a data set without preamble, file meta or group 0008


def bare_data_set(implicit: bool) -> bytes:
    """What a writer leaves when it has nothing for group 0008: the patient, then the image description."""
    dataset = Dataset()
    dataset.PatientID = "P-17"
    dataset.Rows, dataset.Columns = GRADIENT.shape
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = (GRADIENT.astype(np.uint16) * 16).tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=implicit, little_endian=True)
    return buffer.getvalue()


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-vr", "explicit-vr"])
def test_a_bare_data_set_starting_at_group_0010_is_read(tmp_path, implicit):
    """It was read by its .dcm suffix; since the first bytes decide, only groups 0002 and 0008 were taken for
    DICOM, and it was "not a DICOM file"."""
    data = bare_data_set(implicit)
    assert data[:2] == b"\x10\x00"
    path = tmp_path / "bare.dcm"
    path.write_bytes(data)
    pixels, meta = read_image(path)
    assert meta.source_format == "DICOM" and meta.tags["PatientID"] == "P-17"
    assert (read_image_bytes(data, "upload")[0] == pixels).all() and pixels.std() > 10


@pytest.mark.parametrize("head", [b"\x30\x00\x10\x00", b"\x11\x00\x10\x00", b"BM\x36\x00\x0c\x00"],
                         ids=["group-0030", "odd-group", "bmp-like"])
def test_other_starts_are_not_dicom(head):
    from pneumonia_cnn.data.dicom_guard import looks_like_dicom
    assert not looks_like_dicom(head + bytes(128))
