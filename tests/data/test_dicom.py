import numpy as np
import pytest

from pneumonia_cnn.data.readers import read_image
from pneumonia_cnn.errors import ImageReadError
from tests.data.dicom_factory import write_dicom

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
    good = write_dicom(tmp_path / "c.dcm", RAMP).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(good[:400])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(tmp_path / "cut.dcm")
