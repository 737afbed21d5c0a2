"""The window recipe an exported model's metadata states reproduces the pixels exactly: written as
``round((gray - low) * 255 / (high - low))`` it moved 11,001 pixels of 33 of 300 test images by one level."""
import numpy as np

from pneumonia_cnn.data.intensity import INTENSITY_RECIPES, standardise_intensity
from pneumonia_cnn.data.readers import read_image
from tests.conftest import SHARED_DATA, require_shared


def test_the_window_recipe_as_written_gives_the_same_pixels():
    require_shared()
    assert "round((gray - low) * (255 / (high - low))) in float64" in INTENSITY_RECIPES["window"]
    moved = 0
    for path in sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:60]:
        gray = read_image(path, (192, 192), "bilinear")[0]
        low, high = np.percentile(gray, (1, 99))
        by_hand = np.clip(np.round((gray.astype(np.float64) - low) * (255 / (high - low))), 0, 255).astype(np.uint8)
        assert np.array_equal(by_hand, standardise_intensity(gray, "window")), path
        written_otherwise = np.round((gray.astype(np.float64) - low) * 255 / (high - low))
        moved += int((np.clip(written_otherwise, 0, 255).astype(np.uint8) != by_hand).sum())
    assert moved > 0  # the other order does differ on these images: the test tells the two apart
