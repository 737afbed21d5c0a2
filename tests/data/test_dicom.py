import numpy as np
import pytest

from pneumonia_cnn.data.readers import read_image
from pneumonia_cnn.errors import ImageReadError
from tests.data.dicom_factory import jpeg2000_head, jpeg_head, write_dicom

RAMP = (np.tile(np.linspace(0, 4095, 64), (64, 1))).astype(np.uint16)


def test_12_bit_data_scaled_to_full_range(tmp_path):
    gray, meta = read_image(write_dicom(tmp_path / "a.dcm", RAMP, BodyPartExamined="CHEST", ViewPosition="PA"))
    assert gray.dtype == np.uint8 and gray[0, 0] == 0 and gray[0, -1] == 255
    assert meta.source_format == "DICOM" and meta.tags["BodyPartExamined"] == "CHEST"


def test_monochrome1_is_inverted(tmp_path):
    normal, _ = read_image(write_dicom(tmp_path / "m2.dcm", RAMP))
    inverted, _ = read_image(write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1"))
    assert np.abs(inverted.astype(int) - (255 - normal.astype(int))).max() <= 1


def test_voi_window_is_applied(tmp_path):
    gray, _ = read_image(write_dicom(tmp_path / "w.dcm", RAMP, window=(1024, 512)))
    columns = np.linspace(0, 4095, 64)
    assert gray[0, columns < 700].max() == 0 and gray[0, columns > 1350].min() == 255


def test_dicom_without_pixels_or_corrupt(tmp_path):
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(write_dicom(tmp_path / "e.dcm", RAMP, pixel_data=False))
    (tmp_path / "text.dcm").write_text("This is a text file, not a DICOM.\n")
    with pytest.raises(ImageReadError, match=r"text.dcm: not a DICOM file \(no DICM header and no image "
                                             r"description\)$"):
        read_image(tmp_path / "text.dcm")
    with pytest.raises(ImageReadError, match=r"one.dcm: DICOM is only 1x1 pixels$"):  # as a 1x1 PNG is refused
        read_image(write_dicom(tmp_path / "one.dcm", np.array([[4095]], np.uint16)))
    good = write_dicom(tmp_path / "c.dcm", RAMP).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[:400])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(tmp_path / "cut.dcm")


def test_corrupt_compressed_pixel_data_names_each_decoders_reason_without_logging_tracebacks(tmp_path, caplog):
    """pydicom raises one error whose first line says only that every plugin failed (the reasons follow on
    indented lines) and logs each plugin's traceback first: the reason must survive, the tracebacks must not."""
    import logging

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless
    path = write_dicom(tmp_path / "j2k.dcm", RAMP)
    import pydicom
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEG2000Lossless
    dataset.PixelData = encapsulate([jpeg2000_head(64, 64) + b"\0" * 200])  # a J2K header, then no tile
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageReadError) as raised:
        read_image(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: cannot decode DICOM pixel data (") and "\n" not in message
    assert "pillow: Marker length too small" in message  # the plugin's own reason
    assert not [r for r in caplog.records if r.exc_info], "a decoder traceback reached the log"

def test_a_corrupt_jpeg_dicom_names_gdcms_failure_not_its_plugins_bug(tmp_path):
    """GDCM leaves the buffer of a failed decode empty and pydicom's plugin then reports "'NoneType' object has
    no attribute 'encode'": the reason given is that GDCM could not decode the data."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    pytest.importorskip("gdcm")
    path = write_dicom(tmp_path / "jpeg.dcm", RAMP)
    import pydicom
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([jpeg_head(64, 64) + b"garbage" * 10])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError) as raised:
        read_image(path)
    assert "gdcm: cannot decode the compressed data" in str(raised.value)
    assert "NoneType" not in str(raised.value)


def test_predict_refuses_a_dicom_bomb_from_its_header(tmp_path):
    """The same guard as the server's, for files: a deflated 953 KB file claiming 10 frames of 7000x7000 is
    refused before pydicom inflates it (it would take about 490 MB)."""
    import resource
    import time

    from pneumonia_cnn.data.readers import read_image
    from pneumonia_cnn.errors import ImageReadError
    from tests.serving.dicoms import dicom_file
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(dicom_file(7000, 7000, 10, deflate=True))
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(ImageReadError, match="10 frame\\(s\\) of 7000x7000.*checked before decoding"):
        read_image(bomb, (64, 64))
    assert time.monotonic() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KB: no 490 MB inflation
    fine = tmp_path / "fine.dcm"
    fine.write_bytes(dicom_file(64, 64, 3, deflate=True, fill=90))
    assert read_image(fine, (32, 32))[0].shape == (32, 32)


class CountingFile:
    """A file opened for reading that counts the bytes read from it."""

    def __init__(self, path):
        self.file, self.count = open(path, "rb"), 0  # noqa: SIM115 - closed by the test

    def read(self, size=-1):
        data = self.file.read(size)
        self.count += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_the_header_guard_reads_a_file_only_as_far_as_it_needs(tmp_path):
    """``listen`` hands the guard its spooled file (it used to read the whole file into memory first): the
    guard gives the same answer as for the bytes, reading a plain file's header only and a deflated one a chunk
    at a time."""
    from pneumonia_cnn.data.dicom_guard import dicom_problem
    from tests.serving.dicoms import dicom_file
    cases = {"plain": dicom_file(4000, 4000), "bomb": dicom_file(64, 64, pixel_bytes=48 << 20, deflate=True),
             "too large": dicom_file(7000, 7000, 10, deflate=True), "fine": dicom_file(2000, 2000, deflate=True,
                                                                                         fill=90)}
    expected = {"plain": None, "bomb": "(decompression bomb)", "too large": "10 frame(s) of 7000x7000",
                "fine": None}
    for name, data in cases.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(data)
        stream = CountingFile(path)
        try:
            from_file = dicom_problem(stream)
        finally:
            stream.file.close()
        assert from_file == dicom_problem(data), name
        assert (from_file is None) if expected[name] is None else expected[name] in from_file, (name, from_file)
        if name == "plain":  # 16 MB of pixels behind a header of a few hundred bytes
            assert stream.count < 2 << 20, stream.count


def test_palette_color_goes_through_its_palette_or_is_refused(tmp_path):
    """The stored values of a PALETTE COLOR image are indices: read as gray they were scored as an X-ray. Here a
    palette that inverts: index 0 is white."""
    import pydicom
    indices = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (64, 1))
    path = write_dicom(tmp_path / "palette.dcm", indices, photometric="PALETTE COLOR", bits_stored=8)
    dataset = pydicom.dcmread(path)
    for offset in range(3):  # red, green, blue: the same 16-bit table
        dataset.add_new(0x00281101 + offset, "US", [256, 0, 16])
        dataset.add_new(0x00281201 + offset, "OW", (65535 - np.arange(256) * 257).astype(np.uint16).tobytes())
    dataset.save_as(path, enforce_file_format=True)
    gray, _ = read_image(path)
    assert gray[0, 0] == 255 and gray[0, -1] == 0 and (np.diff(gray[0].astype(int)) <= 0).all()
    with pytest.raises(ImageReadError, match=r"bare.dcm: PALETTE COLOR DICOM without its palette \(no Red Palette "
                                             r"Color Lookup Table Descriptor\): its values are indices"):
        read_image(write_dicom(tmp_path / "bare.dcm", indices, photometric="PALETTE COLOR", bits_stored=8))


def test_float_pixel_data_is_read(tmp_path):
    """Float Pixel Data (7FE0,0008) was refused as "no pixel data"."""
    import pydicom
    dataset = pydicom.dcmread(write_dicom(tmp_path / "f.dcm", RAMP))
    del dataset.PixelData, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation
    dataset.BitsAllocated = 32
    dataset.FloatPixelData = np.tile(np.linspace(-1000, 3000, 64, dtype=np.float32), (64, 1)).tobytes()
    dataset.save_as(tmp_path / "f.dcm", enforce_file_format=True)
    gray, _ = read_image(tmp_path / "f.dcm")
    assert gray[0, 0] == 0 and gray[0, -1] == 255 and (np.diff(gray[0].astype(int)) >= 0).all()


def test_a_decoders_reason_does_not_show_its_memory_address(tmp_path):
    """pydicom's Pillow plugin names the stream it read: "<_io.BytesIO object at 0x7f5a393fc400>" reached the
    server's answers."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    path = write_dicom(tmp_path / "jpeg.dcm", RAMP)
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelData = encapsulate([jpeg_head(64, 64) + bytes(100)])  # a JPEG's header, then nothing
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError) as raised:
        read_image(path)
    assert str(raised.value).endswith("pillow: cannot load this image)"), str(raised.value)
    assert " at 0x" not in str(raised.value)
