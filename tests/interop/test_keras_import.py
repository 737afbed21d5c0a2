import numpy as np
import pytest
import torch

from pneumonia_cnn.checkpoint import load_model
from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.interop.keras_import import import_keras
from tests.conftest import KERAS_FIXTURES


def fixture(name):
    path = KERAS_FIXTURES / name
    if not path.exists():
        pytest.skip(f"Keras fixtures absent: {path} (../shared is provided beside the project)")
    return path


def keras_predictions(model, expected_file):
    data = np.load(fixture(expected_file))
    x = torch.from_numpy(data["images_uint8_nhwc"]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        ours = torch.sigmoid(model(x)).numpy()
    return ours, data["keras_sigmoid"][:, 0]


@pytest.mark.parametrize("name,size", [("seed_cnn_64x64.h5", None), ("seed_cnn_64x64.keras", None),
                                       ("seed_cnn_64x64.weights.h5", 64), ("seed_cnn_96x80.h5", None)])
def test_predictions_equal_keras(name, size, tmp_path):
    expected = "seed_cnn_96x80_expected.npz" if "96x80" in name else "seed_cnn_64x64_expected.npz"
    model, payload = import_keras(fixture(name), tmp_path / "k.pt", size=size)
    ours, theirs = keras_predictions(model, expected)
    assert np.abs(ours - theirs).max() < 1e-5
    reloaded = load_model(tmp_path / "k.pt")  # the saved checkpoint gives the same
    ours_again, _ = keras_predictions(reloaded, expected)
    assert np.abs(ours_again - theirs).max() < 1e-5
    assert payload["parameters"] == (1_404_225 if "96x80" in name else 683_329)


def test_weights_only_needs_a_size():
    with pytest.raises(PneumoniaCNNError, match="--size"):
        import_keras(fixture("seed_cnn_64x64.weights.h5"))
    with pytest.raises(PneumoniaCNNError, match="wrong --size"):
        import_keras(fixture("seed_cnn_64x64.weights.h5"), size=96)


def test_not_a_keras_file(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"nope")
    with pytest.raises(PneumoniaCNNError, match="not a readable Keras model"):
        import_keras(tmp_path / "x.h5")
