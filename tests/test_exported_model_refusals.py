"""Found by a probe of the deployment commands (2026-11-28): an exported model given to ``predict`` was read
as an image and the built-in model scored the rest (exit 0); a TorchScript export named ``.pt`` got torch's
warning and its API history in two lines; ``export`` wrote into the built-in model's package folder."""
from pathlib import Path

import pytest

from pneumonia_cnn import builtin
from pneumonia_cnn.cli import main
from tests.conftest import SHARED, SHARED_DATA, require_shared

EXAMPLE = Path(builtin.checkpoint_path()).parent / "examples" / "NORMAL_IM-0128-0001.jpeg"
KERAS = SHARED / "fixtures" / "keras" / "seed_cnn_64x64.h5"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("exported")
    files = {"onnx": folder / "model.onnx", "torchscript": folder / "model.pt"}
    for fmt, out in files.items():
        assert main(["export", "builtin", "--format", fmt, "--out", str(out)]) == 0
    return files


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("command", [["predict"], ["explain", "--out", "heat"]])
def test_an_exported_onnx_model_before_the_images_is_refused_not_read_as_an_image(exported, command, capsys,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*command, str(exported["onnx"]), str(EXAMPLE)]) == 2
    assert list(tmp_path.iterdir()) == []
    assert one_line_error(capsys) == (f"error: {exported['onnx']}: an exported model, which pneumonia-cnn does not "
                                      f"score; give the checkpoint it was exported from")


def test_a_keras_model_before_the_images_says_to_import_it(capsys):
    require_shared()
    assert main(["predict", str(KERAS), str(EXAMPLE)]) == 2
    assert one_line_error(capsys) == (f"error: {KERAS}: a Keras model; import it first (pneumonia-cnn import-keras "
                                      f"FILE --out model.pt) and give model.pt")


@pytest.mark.parametrize("command", [["predict", "{}", str(EXAMPLE)], ["info", "{}"],
                                     ["export", "{}", "--out", "x.onnx"]])
def test_a_torchscript_export_named_pt_is_one_line_naming_what_it_is(exported, command, capsys, tmp_path,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([part.format(exported["torchscript"]) for part in command]) == 2
    assert one_line_error(capsys) == (f"error: {exported['torchscript']}: a TorchScript export (export --format "
                                      f"torchscript), not a checkpoint; give the checkpoint it was exported from")
    assert not (tmp_path / "x.onnx").exists()


def test_export_never_writes_into_the_builtin_models_package_folder(capsys):
    target = Path(builtin.checkpoint_path()).parent / "probe-export.onnx"
    try:
        assert main(["export", "builtin", "--format", "onnx", "--out", str(target)]) == 2
        assert one_line_error(capsys) == (f"error: {target}: --out is inside the built-in model's package folder; "
                                          f"choose another path")
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.parametrize("command", [["stress", "{model}", "--data", "{data}"],
                                     ["drift", "{model}", "--data", "{data}"],
                                     ["evaluate", "--checkpoint", "{model}", "--data", "{data}"],
                                     ["compare", "builtin", "{model}", "--data", "{data}"], ["info", "{model}"]])
def test_a_keras_file_given_as_the_checkpoint_of_any_command_is_sent_to_import_keras(command, capsys):
    """predict said so; stress, drift, evaluate and compare said torch's "not a readable checkpoint (file in archive
    is not in a subdirectory: metadata.json)" or "(not a PyTorch file)"."""
    from tests.interop.test_keras_import import fixture
    for name in ("seed_cnn_64x64.keras", "seed_cnn_64x64.h5"):
        model = fixture(name)
        argv = [part.format(model=model, data=SHARED_DATA) for part in command]
        assert main(argv) != 0
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: {model}: a Keras model; import it first (pneumonia-cnn import-keras FILE --out model.pt) and "
            "give model.pt")
