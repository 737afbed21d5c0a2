import numpy as np
import pytest
from PIL import Image

from pneumonia_cnn.data.readers import read_image
from pneumonia_cnn.errors import ImageReadError
from tests.conftest import SHARED_DATA, require_shared, write_image

GRADIENT = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))


def test_real_jpeg_is_gray_uint8_and_resized():
    require_shared()
    path = next((SHARED_DATA / "test" / "NORMAL").iterdir())
    gray, meta = read_image(path, (100, 80))
    assert gray.shape == (100, 80) and gray.dtype == np.uint8
    assert meta.original_size == (224, 224) and gray.std() > 10


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_png_modes_load(tmp_path, mode):
    image = Image.fromarray(GRADIENT).convert(mode)
    path = tmp_path / f"x_{mode}.png"
    image.save(path)
    gray, _ = read_image(path)
    assert gray.shape == (64, 64)
    assert abs(int(gray[0, -1]) - 252) <= 3 and gray[0, 0] <= 3


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    array = (GRADIENT.astype(np.uint16) * 257)
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    gray, _ = read_image(path)
    assert gray.max() >= 250 and gray.min() <= 2


def test_float_tiff_is_scaled_in_blocks_with_bounded_memory(tmp_path):
    """A float32 TIFF of 4000x4000 (64 MB of pixels, a few KB on disk) is scaled to 0..255 by its own
    finite minimum and maximum (NaN and -inf as the minimum, +inf as the maximum), without the full-size
    float64 copies (128 MB each, three at once) that a
    server decoding several such uploads would hold."""
    import tracemalloc

    from pneumonia_cnn.data.image import scale_to_uint8
    values = np.zeros((4000, 4000), np.float32)
    values[::5, ::5], values[1, 1], values[2, 2] = 1.5, -0.5, np.nan
    Image.fromarray(values).save(tmp_path / "f.tif", compression="tiff_adobe_deflate")
    decoded = np.asarray(Image.open(tmp_path / "f.tif"))
    tracemalloc.start()
    gray = scale_to_uint8(decoded)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 48e6, f"{peak / 1e6:.0f} MB"  # the uint8 result (16 MB), two 8 MB blocks and their masks
    assert gray.dtype == np.uint8 and gray.shape == (4000, 4000)
    assert (gray[1, 1], gray[0, 1], gray[5, 5], gray[2, 2]) == (0, 64, 255, 0)  # 0.5/2.0 of 255 = 63.75; NaN: min
    assert gray.sum() == 255 * 800 * 800 + 64 * (4000 * 4000 - 800 * 800 - 2)  # the grid, the zeros
    values[3, 3], values[4, 4] = np.inf, -np.inf  # one infinite pixel each way: the rest keeps its contrast
    gray = scale_to_uint8(values)
    assert (gray[3, 3], gray[4, 4], gray[0, 1], gray[5, 5], gray[1, 1]) == (255, 0, 64, 255, 0)

@pytest.mark.parametrize("values, expected", [
    ([0.0, 1e-317, 2e-317], [0, 128, 255]),  # a subnormal range: 255 / range overflowed (NaN, then garbage)
    ([-1e308, 0.0, 1e308], [0, 128, 255]),  # a range past float64's: high - low overflowed (all black)
    ([-1.7e308, np.nan, 1.7e308], [0, 0, 255]),
    ([0.0, 5e-324], [0, 255]),  # one subnormal step: two levels
    ([0.0, 0.5, 1.0], [0, 128, 255]),  # an ordinary range, unchanged
])
def test_float64_pixels_of_any_finite_range_scale_without_overflow(values, expected):
    """Double-precision pixels (DICOM Double Float Pixel Data) reach ``scale_to_uint8`` as they are: ranges whose
    width or its reciprocal leaves float64 gave NaN with numpy RuntimeWarnings, or a black image."""
    import warnings

    from pneumonia_cnn.data.image import scale_to_uint8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gray = scale_to_uint8(np.array([values], dtype=np.float64))
    assert gray.tolist() == [expected]


def test_palette_png_with_alpha(tmp_path):
    image = Image.fromarray(GRADIENT).convert("P")
    image.info["transparency"] = 0
    path = tmp_path / "pal.png"
    image.save(path, transparency=0)
    gray, _ = read_image(path)
    assert gray.shape == (64, 64)


@pytest.mark.parametrize("content,reason", [(b"", "empty file"), (b"hello, not an image", "not a readable image")])
def test_bad_files_give_one_line_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpeg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError) as error:
        read_image(path)
    assert reason in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_truncated_jpeg(tmp_path):
    path = write_image(tmp_path / "full.jpeg", GRADIENT, format="JPEG")
    data = path.read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpeg"):
        read_image(tmp_path / "cut.jpeg")


def test_unreadable_permissions(tmp_path):
    import os
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions cannot make a file unreadable")
    path = write_image(tmp_path / "locked.png", GRADIENT)
    path.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        read_image(path)


def test_16_bit_values_are_rounded_as_before(tmp_path):
    """Every 16-bit value maps to round(x / 257), computed now in integers by strips of rows."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "all.png")
    gray, _ = read_image(tmp_path / "all.png")
    assert (gray == np.round(values / 257.0).astype(np.uint8)).all()


def peak_memory_mb(path) -> float:
    """The growth of a fresh process's peak memory (VmHWM) while it reads ``path`` at 224 x 224."""
    import subprocess
    import sys
    script = ("import resource, sys; from pneumonia_cnn.data.readers import read_image; "
              "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; read_image(sys.argv[1], (224, 224)); "
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    return float(done.stdout)


def test_large_16_bit_and_transparent_images_are_converted_in_strips(tmp_path):
    """Legal 7000 x 7000 images (49 megapixels, a few hundred KB on disk): the 16-bit one took 936 MB to convert
    whole (float64 copies), the transparent one 889 MB (full-size RGBA copies); by strips of rows they take
    what Pillow's decoded image and the gray result hold (98 + 49 MB and 196 + 49 MB) and little more."""
    deep = np.zeros((7000, 7000), np.uint16)
    deep[:, 3500:] = 40000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    clear = np.zeros((7000, 7000, 4), np.uint8)
    clear[..., 3], clear[:, 3500:, :3] = 255, 200
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    assert peak_memory_mb(tmp_path / "deep.png") < 300
    assert peak_memory_mb(tmp_path / "clear.png") < 400
    gray, _ = read_image(tmp_path / "clear.png", (64, 64))
    assert gray[:, :30].max() == 0 and gray[:, 34:].min() == 200  # 200 gray, opaque, on black


def test_postscript_never_reaches_ghostscript(tmp_path, monkeypatch):
    """Pillow opens EPS by running Ghostscript on a temporary file of it; an upload called .png got there.
    Only JPEG, PNG, BMP, TIFF, GIF (and DICOM) are read, by content: here a Ghostscript that would leave a mark."""
    import os

    from tests.bad_inputs import EPS
    marker, ghostscript = tmp_path / "ghostscript-ran", tmp_path / "bin" / "gs"
    ghostscript.parent.mkdir()
    ghostscript.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    ghostscript.chmod(0o755)
    monkeypatch.setenv("PATH", f"{ghostscript.parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "xray.png").write_bytes(EPS)
    with pytest.raises(ImageReadError, match=r"xray.png: not a readable image \(content is not JPEG, PNG, BMP, "
                                             r"TIFF, GIF or DICOM\)$"):
        read_image(tmp_path / "xray.png")
    assert not marker.exists()
