"""Model-free flags for X-rays too small or too noisy for the model: a probe found normal children's X-rays sent as
thumbnails (20-64 pixels) or under heavy noise scored up to 0.98 with no warning."""
import json

import numpy as np
import pytest
from PIL import Image

from pneumonia_cnn.cli import main
from pneumonia_cnn.data.readers import ImageMeta
from pneumonia_cnn.inference import Predictor
from pneumonia_cnn.ood import flag_reasons, input_warnings
from tests.conftest import SHARED_DATA, require_shared

MODEL_INPUT = np.zeros((192, 192), np.uint8) + np.arange(192, dtype=np.uint8)  # a ramp: neither blank nor noise


@pytest.mark.parametrize("height, width, flagged, said", [
    (64, 64, True, "too small for the model: 64x64 pixels, under half its 192x192 input (the detail it reads is "
                   "missing)"),
    (224, 40, True, "too small for the model: 40x224 pixels, under half its 192x192 input (the detail it reads is "
                    "missing)"),
    (95, 300, True, "too small for the model: 300x95 pixels, under half its 192x192 input (the detail it reads is "
                    "missing)"),
    (96, 96, False, "the image is 96x96 pixels, smaller than the model's 192x192 input: it was enlarged"),
    (191, 2000, False, "the image is 2000x191 pixels, smaller than the model's 192x192 input: it was enlarged"),
    (192, 192, False, None), (2048, 1700, False, None)])
def test_a_file_under_half_the_input_side_is_flagged_one_under_it_warned_about(height, width, flagged, said):
    meta = ImageMeta("JPEG", (height, width))
    assert input_warnings(MODEL_INPUT, meta) == ([said] if said else [])
    assert flag_reasons(MODEL_INPUT, meta) == ([said] if flagged else [])


def test_without_a_file_size_nothing_is_said():
    assert input_warnings(MODEL_INPUT) == [] and input_warnings(MODEL_INPUT, ImageMeta("JPEG", ())) == []


@pytest.fixture(scope="module")
def builtin():
    require_shared()
    return Predictor("builtin", "cpu")


def noisy(path, sigma, folder):
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    pixels += np.random.default_rng(0).normal(0, sigma, pixels.shape)
    target = folder / f"{path.stem}_noise{sigma}.png"
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target)
    return target


def test_heavy_noise_is_flagged_and_no_shared_xray_is(builtin, tmp_path):
    shared = sorted((SHARED_DATA / "test").glob("*/*.jpeg"))
    said = [w for path in shared for w in input_warnings(*builtin.preprocess_path(path)) if "noisy" in w]
    assert said == []  # the 520 X-rays of the shared test folder: none (the noisiest has 0.29 of the 0.6 bound)
    flags = [flag_reasons(*builtin.preprocess_path(noisy(path, 30, tmp_path))) for path in shared[::26]]
    too_noisy = "too noisy for the model: noise from pixel to pixel twice any seen in chest X-rays covers the anatomy"
    assert len(flags) == 20 and all(found in ([too_noisy], ["not an X-ray: the image looks like noise, not anatomy"])
                                    for found in flags)
    assert flags.count([too_noisy]) == 17  # the noise-only check (above twice this bound) alone flagged 3 of them


def test_predict_flags_a_thumbnail_of_an_xray_it_does_not_flag_at_full_size(builtin, tmp_path, capsys):
    source = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]
    Image.open(source).convert("L").resize((48, 48), Image.BILINEAR).save(tmp_path / "thumbnail.png")
    assert main(["predict", str(source), str(tmp_path / "thumbnail.png"), "--format", "json"]) == 0
    full, thumbnail = json.loads(capsys.readouterr().out)
    assert full["in_distribution"] is True and full["warnings"] == []
    assert thumbnail["in_distribution"] is False
    assert thumbnail["warnings"][0] == ("too small for the model: 48x48 pixels, under half its 192x192 input (the "
                                        "detail it reads is missing)")
