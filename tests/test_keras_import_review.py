"""Found by a probe of ``import-keras`` (2026-11-28): a Keras file whose final Dense layer has 2 units gave
load_state_dict's 22-line traceback ("size mismatch for fc2.weight"), exit 1, in both the full-model and the
weights-only form; an int64 bias was cast to float silently (a checkpoint refuses integer weights where the model
holds floats); ``--out x.onnx`` wrote a PyTorch checkpoint under an ONNX name; and ``info`` of the imported model
said "epoch None", "trained on: {}" and "not recorded (a checkpoint of an earlier version)". The Keras fixtures
written by real Keras 3 (../shared/fixtures/keras), edited with h5py; the CLI in this process."""
import hashlib
import io
import shutil
import zipfile

import h5py
import numpy as np
import pytest
import torch

from pneumonia_cnn.checkpoint import load_checkpoint
from tests.interop.test_keras_import import edited_copy, fixture, keras_predictions
from tests.test_cli_guards import run

FULL, WEIGHTS = "seed_cnn_64x64.h5", "seed_cnn_64x64.weights.h5"


def layer_arrays(handle, layer: str) -> tuple[str, str]:
    """The dataset paths of ``layer``'s kernel and bias, in either file layout (``model_weights/dense_1/
    sequential/dense_1/kernel`` or ``layers/dense_1/vars/0``)."""
    group = handle["model_weights" if "model_weights" in handle else "layers"][layer]
    found = []
    group.visititems(lambda name, item: found.append(item) if isinstance(item, h5py.Dataset) else None)
    kernel = next(item.name for item in found if item.ndim >= 2)
    bias = next(item.name for item in found if item.ndim == 1)
    return kernel, bias


def replace(handle, name: str, data: np.ndarray) -> None:
    del handle[name]
    handle[name] = data


def widened(layer: str, units: int, next_layer: str | None = None):
    """An edit giving ``layer`` ``units`` outputs (its kernel's outputs and its bias repeated or cut), and the
    layer after it as many inputs."""
    def edit(handle):
        kernel, bias = layer_arrays(handle, layer)
        chosen = np.arange(units) % handle[bias].shape[0]
        replace(handle, kernel, np.take(handle[kernel][()], chosen, axis=-1))
        replace(handle, bias, handle[bias][()][chosen])
        if next_layer:
            following, _ = layer_arrays(handle, next_layer)
            replace(handle, following, np.take(handle[following][()], chosen, axis=-2))
    return edit


@pytest.mark.parametrize("name,size", [(FULL, None), (WEIGHTS, 64)])
def test_a_final_layer_of_two_units_is_one_line_naming_the_layer(capsys, tmp_path, name, size):
    path = edited_copy(name, tmp_path, widened("dense_1", 2))
    out = tmp_path / "o.pt"
    status, error = run(capsys, "import-keras", path, "--out", out, *(("--size", size) if size else ()))
    assert (status, error) == (2, f"error: {path}: not the tutorial's layers: dense_1 has 2 units, where the "
                                  f"tutorial's final layer has 1")
    assert not out.exists()


@pytest.mark.parametrize("edit,message", [
    (widened("conv2d_1", 48, "conv2d_2"), "conv2d_1 has 48 filters, where the tutorial's second Conv2D has 64"),
    (widened("conv2d_2", 96), "conv2d_2 has 96 filters, where the tutorial's third Conv2D has 128"),
    (widened("dense", 64, "dense_1"), "dense has 64 units, where the tutorial's first Dense layer has 128"),
])
def test_each_layer_of_other_filters_or_units_is_named(capsys, tmp_path, edit, message):
    path = edited_copy(WEIGHTS, tmp_path, edit)
    status, error = run(capsys, "import-keras", path, "--out", tmp_path / "o.pt", "--size", 64)
    assert (status, error) == (2, f"error: {path}: not the tutorial's layers: {message}")
    assert not (tmp_path / "o.pt").exists()


def test_inputs_channels_and_biases_that_do_not_chain_are_named(capsys, tmp_path):
    def final_takes_64(handle):
        kernel, _ = layer_arrays(handle, "dense_1")
        replace(handle, kernel, handle[kernel][()][:64])

    def four_channels(handle):
        kernel, _ = layer_arrays(handle, "conv2d")
        k = handle[kernel][()]
        replace(handle, kernel, np.concatenate([k, k[:, :, :1]], axis=2))

    def bias_of_two(handle):
        _, bias = layer_arrays(handle, "dense_1")
        replace(handle, bias, np.zeros(2, np.float32))
    for edit, message in (
            (final_takes_64, "dense_1 takes 64 inputs, where the tutorial's final layer takes the 128 units of the "
                             "Dense layer before"),
            (four_channels, "conv2d takes 4 channels, where the tutorial's first Conv2D takes 3 (RGB) or 1 (gray)"),
            (bias_of_two, "dense_1's bias has 2 values, where its kernel has 1 output")):
        (tmp_path / edit.__name__).mkdir()
        path = edited_copy(WEIGHTS, tmp_path / edit.__name__, edit)
        status, error = run(capsys, "import-keras", path, "--out", tmp_path / "o.pt", "--size", 64)
        assert (status, error) == (2, f"error: {path}: not the tutorial's layers: {message}")
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("name,layer,role,dtype", [(WEIGHTS, "dense_1", "bias", np.int64),
                                                   (FULL, "conv2d_1", "kernel", np.int32)])
def test_integer_weights_are_refused_not_cast(capsys, tmp_path, name, layer, role, dtype):
    """The bias 0.05 stored as int64 0: cast silently before, every probability moved."""
    def to_integers(handle):
        kernel, bias = layer_arrays(handle, layer)
        target = bias if role == "bias" else kernel
        replace(handle, target, np.round(handle[target][()] * 10).astype(dtype))
    path = edited_copy(name, tmp_path, to_integers)
    status, error = run(capsys, "import-keras", path, "--out", tmp_path / "o.pt", *(("--size", 64) if
                                                                                     name == WEIGHTS else ()))
    assert (status, error) == (2, f"error: {path}: weights do not fit model seed ({layer}'s {role} holds "
                                  f"{np.dtype(dtype).name} values, the model float32)")
    assert not (tmp_path / "o.pt").exists()


def test_an_integer_array_of_a_layer_without_weights_is_left_alone(tmp_path):
    """Keras 3 stores a Dropout layer's seed generator state as uint32 (2,): not a weight, and the model imports
    as before (refusing every integer array on reading would refuse such a model)."""
    from pneumonia_cnn.interop.keras_import import import_keras

    def add_seed_state(handle):
        handle["layers/dropout/seed_generator/vars/0"] = np.array([7, 0], dtype=np.uint32)
    path = edited_copy(WEIGHTS, tmp_path, add_seed_state)
    model, _ = import_keras(path, tmp_path / "k.pt", size=64)
    ours, theirs = keras_predictions(model, "seed_cnn_64x64_expected.npz")
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize("out", ["x.onnx", "x.h5", "x.PT", "x"])
def test_an_out_not_named_as_a_checkpoint_is_refused(capsys, tmp_path, out):
    status, error = run(capsys, "import-keras", fixture(FULL), "--out", tmp_path / out)
    assert (status, error) == (2, f"error: {tmp_path / out}: import-keras writes a checkpoint, a file ending in .pt "
                                  f"or .pth; give --out such a name")
    assert list(tmp_path.iterdir()) == []
    for good in ("k.pt", "k.pth"):
        assert run(capsys, "import-keras", fixture(FULL), "--out", tmp_path / good)[0] == 0


def test_the_imported_checkpoint_says_what_it_is(capsys, tmp_path):
    """Where it came from (the file and its SHA-256), that it was trained elsewhere with no training data
    recorded, no fitted decision (the tutorial's 0.5, no calibration), no detector."""
    source = fixture("seed_cnn_64x64.keras")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert run(capsys, "import-keras", source, "--out", tmp_path / "k.pt")[0] == 0
    checkpoint = load_checkpoint(tmp_path / "k.pt")
    imported = checkpoint["imported"]
    assert (imported["from"], imported["file"], imported["sha256"]) == ("keras", "seed_cnn_64x64.keras", digest)
    assert imported["trained"] == "elsewhere, in Keras: no training data, epochs or history recorded"
    assert imported["decision"] == "none fitted: the tutorial's threshold 0.5 on the sigmoid, no calibration"
    assert "decision_fit" not in checkpoint and not checkpoint.get("ood")
    assert checkpoint["intended_use"]["trained_on"] == {"data": "not recorded: trained elsewhere, in Keras",
                                                        "imported_from": "seed_cnn_64x64.keras", "sha256": digest,
                                                        "input_size": [64, 64]}
    lines = main_output(capsys, "info", tmp_path / "k.pt")
    assert "classes: NORMAL, PNEUMONIA; threshold 0.5 (0.5); no calibration" in lines  # not "temperature"
    assert (f"trained on: not recorded: trained elsewhere, in Keras at 64x64; imported from seed_cnn_64x64.keras; "
            f"sha256 {digest}") in lines  # was "{}", then the record's dict
    assert "out-of-distribution flag: not fitted for this checkpoint" in lines
    assert "trained with: the tutorial's recipe, in Keras, elsewhere: not recorded" in lines  # was "preset=tutorial"
    assert lines[0].endswith(f"imported from Keras file seed_cnn_64x64.keras (SHA-256 {digest}), trained elsewhere")
    assert ("threshold and calibration fitted on: no images: the tutorial's threshold 0.5 and no calibration, as "
            "imported (pneumonia-cnn evaluate --threshold POLICY --calibration platt --save-as fits them on labelled "
            "validation images)") in lines  # was "not recorded (a checkpoint of an earlier version)"


def main_output(capsys, *argv) -> list[str]:
    from pneumonia_cnn.cli import main
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_the_digest_is_of_the_bytes_imported_and_a_keras_archive_with_an_integer_bias_is_refused(capsys, tmp_path):
    """The .keras form: model.weights.h5 inside the zip, edited and zipped again."""
    source = fixture("seed_cnn_64x64.keras")
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    weights = tmp_path / "w.h5"
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "r+") as handle:
        _, bias = layer_arrays(handle, "dense")
        replace(handle, bias, np.zeros(128, dtype=np.int64))
    members["model.weights.h5"] = weights.read_bytes()
    path = tmp_path / "int.keras"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    path.write_bytes(buffer.getvalue())
    status, error = run(capsys, "import-keras", path, "--out", tmp_path / "o.pt")
    assert (status, error) == (2, f"error: {path}: weights do not fit model seed (dense's bias holds int64 values, "
                                  f"the model float32)")
    shutil.copyfile(source, tmp_path / "copy.keras")
    assert run(capsys, "import-keras", tmp_path / "copy.keras", "--out", tmp_path / "k.pt")[0] == 0
    assert load_checkpoint(tmp_path / "k.pt")["imported"]["sha256"] == hashlib.sha256(
        source.read_bytes()).hexdigest()
    assert torch.load(tmp_path / "k.pt", weights_only=True)["state_dict"]["fc1.bias"].dtype == torch.float32


def _with_config(handle, change) -> None:
    """The .h5's model config, its layers changed in place by ``change(layers)``."""
    import json
    config = json.loads(handle.attrs["model_config"])
    change(config["config"]["layers"])
    handle.attrs["model_config"] = json.dumps(config)


def _keras_archive_with(tmp_path, change):
    import json
    with zipfile.ZipFile(fixture("seed_cnn_64x64.keras")) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    change(config["config"]["layers"])
    members["config.json"] = json.dumps(config).encode()
    path = tmp_path / "edited.keras"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _set(index: int, **settings):
    return lambda layers: layers[index]["config"].update(settings)


@pytest.mark.parametrize("change, reason", [
    (_set(-1, activation="linear"), "layer dense_1 (Dense) has activation 'linear', not the tutorial's 'sigmoid'"),
    (_set(1, activation="tanh"), "layer conv2d (Conv2D) has activation 'tanh', not the tutorial's 'relu'"),
    (_set(1, dilation_rate=[2, 2]), "layer conv2d (Conv2D) has dilation_rate [2, 2], not the tutorial's [1, 1]"),
    (_set(5, padding="same"), "layer conv2d_2 (Conv2D) has padding 'same', not the tutorial's 'valid'"),
    (lambda layers: layers[-1]["config"].pop("activation"),  # unstated: Keras' default, linear
     "layer dense_1 (Dense) has activation 'linear', not the tutorial's 'sigmoid'"),
    (_set(-2, activation={"module": "keras.activations", "class_name": "function", "config": "tanh"}),
     "layer dense (Dense) has activation 'tanh', not the tutorial's 'relu'"),
    (lambda layers: layers[2].update(class_name="AveragePooling2D"),
     "its layers are Conv2D, AveragePooling2D, Conv2D, MaxPooling2D, Conv2D, MaxPooling2D, Flatten, Dense, Dense, "
     "not the tutorial's Conv2D, MaxPooling2D, Conv2D, MaxPooling2D, Conv2D, MaxPooling2D, Flatten, Dense, Dense"),
])
def test_a_model_whose_config_is_not_the_tutorials_is_refused_in_one_line(capsys, tmp_path, change, reason):
    """Only shapes and units were checked: a linear output (trained from logits), tanh, average pooling or a
    dilation imported as the tutorial's model, exit 0, with other probabilities than Keras gives."""
    h5 = edited_copy(FULL, tmp_path, lambda handle: _with_config(handle, change))
    assert run(capsys, "import-keras", h5, "--out", tmp_path / "a.pt") == (2, f"error: {h5}: {reason}")
    archive = _keras_archive_with(tmp_path, change)
    assert run(capsys, "import-keras", archive, "--out", tmp_path / "b.pt") == (2, f"error: {archive}: {reason}")
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


def test_dropout_and_keras_defaults_left_unstated_are_the_tutorials(capsys, tmp_path):
    """A Dropout layer is nothing at inference, and a setting the config leaves out is Keras' default."""
    def change(layers):
        layers.insert(-1, {"class_name": "Dropout", "config": {"name": "dropout", "rate": 0.5}})
        del layers[2]["config"]["strides"]  # MaxPooling2D's default: the pool size
    h5 = edited_copy(FULL, tmp_path, lambda handle: _with_config(handle, change))
    status, _ = run(capsys, "import-keras", h5, "--out", tmp_path / "a.pt")
    assert status == 0 and (tmp_path / "a.pt").is_file()


def test_what_is_not_a_keras_file_is_named_for_what_it_is(capsys, tmp_path):
    (tmp_path / "folder.h5").mkdir()
    assert run(capsys, "import-keras", tmp_path / "folder.h5", "--out", tmp_path / "a.pt") == (
        2, f"error: {tmp_path / 'folder.h5'}: not a regular file")  # it said "file not found"
    checkpoint = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, checkpoint)
    assert run(capsys, "import-keras", checkpoint, "--out", tmp_path / "a.pt") == (
        2, f"error: {checkpoint}: not a Keras model (a zip archive without model.weights.h5: a PyTorch checkpoint)")


def test_drift_of_an_imported_model_says_why_it_has_no_reference(capsys, tmp_path):
    """It said "one of an earlier version, or adapted to a site", neither of which an imported model is."""
    from pneumonia_cnn.monitoring import no_reference_reason
    run(capsys, "import-keras", fixture(FULL), "--out", tmp_path / "k.pt")
    assert no_reference_reason(load_checkpoint(tmp_path / "k.pt")) == (
        "no validation scores in this checkpoint: it was imported from Keras, trained elsewhere; pneumonia-cnn "
        "evaluate --threshold POLICY --calibration platt --save-as fits a decision on validation images and keeps "
        "their scores")


def test_train_weights_given_a_keras_file_sends_it_to_import_keras():
    """train --weights model.keras gave torch's "file in archive is not in a subdirectory: metadata.json"."""
    from pneumonia_cnn.errors import CheckpointError
    from pneumonia_cnn.models.registry import read_weights_file
    for name in ("seed_cnn_64x64.keras", FULL):
        with pytest.raises(CheckpointError, match=r"a Keras model; import it first \(pneumonia-cnn import-keras"):
            read_weights_file(fixture(name))
