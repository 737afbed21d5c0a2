"""Fuzz the image and DICOM readers: any bytes give an array or an ImageReadError, nothing else."""
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pneumonia_cnn.data.readers import read_image_bytes
from pneumonia_cnn.errors import ImageReadError
from tests.bad_inputs import XRAY_LIKE


def seeds():
    out = []
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(XRAY_LIKE[:32, :32]).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    import tempfile
    from pathlib import Path

    from tests.data.dicom_factory import write_dicom
    with tempfile.TemporaryDirectory() as folder:
        out.append(write_dicom(Path(folder) / "x.dcm", XRAY_LIKE[:32, :32].astype(np.uint16)).read_bytes())
    return out


SEEDS = seeds()


def check(data: bytes):
    try:
        gray, _ = read_image_bytes(data, "fuzz.bin", (16, 16))
    except ImageReadError as error:
        assert "\n" not in str(error)
        return
    assert gray.shape == (16, 16) and gray.dtype == np.uint8


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                    max_size=12), st.integers(0, 10_000))
def test_mutated_files(seed_index, flips, cut):
    data = bytearray(SEEDS[seed_index])
    for position, value in flips:
        data[position % len(data)] = value
    check(bytes(data[: max(1, len(data) - cut % len(data))]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    check(data)
