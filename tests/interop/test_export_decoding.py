"""Found by a hostile probe (2026-11-27): the export's ``preprocessing_steps`` said "Pillow convert('L')" for every
image, but predict divides 16-bit images by 257 and scales 32-bit integer and float images by their minimum and
maximum; convert('L') by hand made the 16-bit PNG all white. Redone by hand from the stated steps, each mode gives
predict's pixels bit for bit (real X-ray, the built-in model)."""
import numpy as np
import onnx
import pytest
from PIL import Image
from skimage import exposure

from pneumonia_cnn.cli import main
from pneumonia_cnn.inference import Predictor
from tests.conftest import SHARED_DATA, require_shared


def gray_by_hand(image: Image.Image, steps: str) -> np.ndarray:
    """Step 1 as the metadata states it, for the modes of this test."""
    if image.mode.startswith("I;16"):
        assert ("16-bit modes ('I;16', 'I;16B', ...): (510 * x + L) // (2 * L) in integers (x * 255 / L rounded), "
                "L = 255 when the image's largest value is at most 255, 4095 when at most 4095 (12-bit data), else "
                "65535 (x / 257)") in steps
        x = np.asarray(image).astype(np.int64)
        levels = 255 if x.max() <= 255 else 4095 if x.max() <= 4095 else 65535
        return ((x * 510 + levels) // (2 * levels)).astype(np.uint8)
    assert ("'I' (32-bit integer; unsigned when the TIFF's SampleFormat says so, which Pillow reads as signed) and "
            "'F' (float): min-max") in steps
    assert ("min-max: over the finite values, round((x - min) * (255 / (max - min))) in float64 with numpy's round "
            "(half to even)") in steps
    x = np.asarray(image).astype(np.float64)
    low, high = x[np.isfinite(x)].min(), x[np.isfinite(x)].max()
    return np.round((x - low) * (255 / (high - low))).astype(np.uint8)


@pytest.mark.parametrize("mode", ["I;16", "12-bit", "I", "F"])
def test_the_stated_decoding_gives_predicts_pixels_for_16_bit_32_bit_and_float_images(tmp_path, mode):
    require_shared()
    out = tmp_path / "builtin.onnx"
    assert main(["export", "--out", str(out)]) == 0
    steps = {p.key: p.value for p in onnx.load(str(out)).metadata_props}["preprocessing_steps"]
    xray = np.asarray(Image.open(sorted((SHARED_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))[0]).convert("L"))
    values = {"I;16": xray.astype(np.uint16) * 251 + 3, "12-bit": xray.astype(np.uint16) * 16 + 5,
              "I": xray.astype(np.int32) * 1000 - 50000, "F": xray.astype(np.float32) / 255.0 * 3.7 - 1.1}[mode]
    path = tmp_path / ("x.png" if mode in ("I;16", "12-bit") else "x.tiff")
    Image.fromarray(values).save(path)
    image = Image.open(path)
    assert image.mode == ("I;16" if mode == "12-bit" else mode)
    gray = Image.fromarray(gray_by_hand(image, steps)).resize((192, 192), Image.BILINEAR)
    by_hand = np.clip(np.round(exposure.equalize_hist(np.asarray(gray), nbins=256) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(by_hand, Predictor("builtin", "cpu").preprocess_path(path)[0])
