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


def edited_copy(name, tmp_path, edit):
    """A copy of a Keras fixture changed by ``edit(h5py.File)``."""
    import shutil

    import h5py
    copy = tmp_path / name
    shutil.copyfile(fixture(name), copy)
    with h5py.File(copy, "r+") as handle:
        edit(handle)
    return copy


def kernels(handle):
    import h5py
    found = []
    handle.visititems(lambda name, item: found.append(item) if isinstance(item, h5py.Dataset) and item.ndim == 4
                      else None)
    return found


def test_a_model_with_nan_weights_is_refused(tmp_path):
    """It was imported, and predict then labelled every image NORMAL (NaN exceeds no threshold), exit 0."""
    def poison(handle):
        kernel = kernels(handle)[0]
        kernel[...] = np.nan
    path = edited_copy("seed_cnn_64x64.weights.h5", tmp_path, poison)
    with pytest.raises(PneumoniaCNNError, match=r"seed_cnn_64x64.weights.h5: its weights hold NaN or infinite "
                                                r"values \(a model that diverged in training, or a damaged file\)$"):
        import_keras(path, tmp_path / "nan.pt", size=64)
    assert not (tmp_path / "nan.pt").exists()


@pytest.mark.parametrize("config", ['[1, 2]', '{"config": {"layers": ["dense", 3]}}',
                                    '{"config": {"layers": [{"config": {"batch_shape": [null, null, 64, 3]}}]}}'])
def test_an_unexpected_model_config_is_one_line(tmp_path, config):
    """A model_config that is a list, layers that are not objects, a shape holding null: tracebacks before."""
    def rewrite(handle):
        handle.attrs["model_config"] = config
    path = edited_copy("seed_cnn_64x64.h5", tmp_path, rewrite)
    # a list is unreadable; layers that are not the tutorial's (not objects, no class) are refused as such
    with pytest.raises(PneumoniaCNNError, match=r"^.*seed_cnn_64x64.h5: (not a readable Keras model \(|its layers "
                                                r"are (none|None), not the tutorial's Conv2D, MaxPooling2D)"):
        import_keras(path)


def test_other_layers_than_the_tutorials_are_one_line(tmp_path):
    """No Conv2D of 32 filters (a modified tutorial model) raised a bare StopIteration."""
    def widen(handle):
        first = kernels(handle)[0]
        name, data = first.name, first[()]
        del handle[name]
        handle[name] = np.concatenate([data, data], axis=3)  # 64 filters
    path = edited_copy("seed_cnn_64x64.weights.h5", tmp_path, widen)
    with pytest.raises(PneumoniaCNNError, match=r"not the tutorial's layers: no Conv2D with 32 filters$"):
        import_keras(path, size=64)
