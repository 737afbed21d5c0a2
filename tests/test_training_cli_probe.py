"""A probe of ``train``'s edges: an interruption during the end-of-run steps, a run's config.json edited before
``--resume``, lenient config files, and two errors that did not name their file."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from pneumonia_cnn.errors import ConfigError, PneumoniaCNNError
from pneumonia_cnn.training.config import make_config
from tests.conftest import KERAS_FIXTURES
from tests.test_cli_guards import run

# --- 5: an interruption after the last epoch says how to resume -------------------------------------------------

@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_interrupt_during_end_of_run_steps_says_how_to_resume(signal_name, small_root, cache_dir, tmp_path,
                                                               monkeypatch, capsys, caplog):
    from pneumonia_cnn.signals import Terminated
    from pneumonia_cnn.training import loop

    def interrupted(*_args, **_kwargs):  # the signal arriving while calibration and the OOD detector are fitted
        raise Terminated if signal_name == "SIGTERM" else KeyboardInterrupt
    monkeypatch.setattr(loop, "finish_run", interrupted)
    monkeypatch.setattr("pneumonia_cnn.cli.end_by_sigterm", lambda: None)  # never this test process killed
    left = []  # the tracker closed and the process group left even so (they were skipped)
    monkeypatch.setattr(loop, "finish_distributed", left.append)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        status, err = run(capsys, "train", "--data", small_root, "--out", out, "--epochs", 1, "--size", 64,
                          "--batch-size", 16, "--cache-dir", cache_dir, "--no-progress", "--min-val-images", 10)
    said = caplog.text + err
    assert status == 130
    assert f"interrupted by {signal_name}: stopped early; resume with: pneumonia-cnn train --resume" in said
    assert "Traceback" not in said and (out / "last.pt").is_file() and len(left) == 1


# --- 6: an edited config.json is named on --resume, not silently ignored ----------------------------------------

def test_resume_names_an_edited_config_json(trained_run, tmp_path, capsys, caplog):
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    config = json.loads((run_dir / "config.json").read_text())
    saved_lr = config["lr"]
    (run_dir / "config.json").write_text(json.dumps({**config, "lr": 0.1}))
    with caplog.at_level(logging.WARNING):
        run(capsys, "train", "--resume", run_dir, "--no-progress")  # finished: then refused, after the line
    line = next(line for line in caplog.text.splitlines() if "config.json" in line)
    assert "differs from the run's saved config" in line and f"lr 0.1 vs {saved_lr}" in line
    assert "resuming with the saved one" in line and "rewritten" in line
    assert json.loads((run_dir / "config.json").read_text())["lr"] == saved_lr  # as the line said


def test_resume_says_nothing_of_an_unedited_config_json(trained_run, tmp_path, caplog):
    from pneumonia_cnn.experiment import say_edited_config
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    with caplog.at_level(logging.WARNING):
        say_edited_config(run_dir, {"epochs": None})
    assert "config.json" not in caplog.text


# --- 7: config files are read strictly, and each of their values is checked --------------------------------------

@pytest.mark.parametrize("name, text, said", [
    ("dup.json", '{"epochs": 1, "epochs": 2}', "'epochs' is given twice"),
    ("dup.yaml", "epochs: 1\nepochs: 2\n", "'epochs' is given twice"),
    ("nested.yaml", "augment: {flip: true, flip: false}\n", "'flip' is given twice"),
    ("quoted.toml", 'lr = "0.01"\n', "lr: expected float (not quoted text), got '0.01'"),
    ("quoted.yaml", 'epochs: "1"\n', "epochs: expected int (not quoted text), got '1'"),
    ("ages.yaml", 'age_range_years: ["1", 5]\n', "age_range_years: expected numbers (not quoted text)"),
    ("sched.json", '{"size": 64, "size_schedule": {"48": "2"}}', "size_schedule: expected {size: epochs} with whole"),
    ("half.yaml", "size: 64\nsize_schedule: {48: 2.5}\n", "size_schedule: expected {size: epochs} with whole"),
    ("flag.yaml", "size: 64\nsize_schedule: {48: true}\n", "size_schedule: expected {size: epochs} with whole"),
    ("kw.json", '{"model": "resnet18_narrow", "model_kwargs": {"width": "32"}}',
     "model_kwargs: model resnet18_narrow: width must be an integer (its default is 16), got '32'"),
    ("kw.yaml", "model: resnet18_narrow\nmodel_kwargs: {dropout: '0.5'}\n",
     "dropout must be a number (its default is 0.0), got '0.5'"),
    ("kw.toml", "model = 'resnet18_narrow'\nmodel_kwargs = {width = true}\n",
     "width must be an integer (its default is 16), got True"),
])
def test_config_file_refuses_duplicates_and_quoted_numbers(tmp_path, name, text, said):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        make_config(None, str(path))
    assert str(error.value).split(": ")[0].endswith(path.name)  # names the file first
    assert said in str(error.value)


def test_config_file_value_hidden_by_a_flag_is_still_refused(tmp_path):
    path = tmp_path / "lim.yaml"
    path.write_text("limit_images: -5\nepochs: 1\n")
    with pytest.raises(ConfigError, match=r"lim\.yaml: limit_images: -5 is below the minimum 0"):
        make_config(None, str(path), limit_images=40)


def test_config_file_numbers_still_read(tmp_path):
    """YAML's 1e-3 (text to YAML 1.1) stays a number; a float with an integer value stays an int."""
    path = tmp_path / "ok.yaml"
    path.write_text("lr: 1e-3\nepochs: 5.0\nthreshold: 0.3\nsize: 64\nsize_schedule: {48: 2.0, '32': 1}\n"
                    "model: resnet18_narrow\nmodel_kwargs: {width: 8, dropout: 0}\n")
    config = make_config(None, str(path))
    assert (config.lr, config.epochs, config.threshold) == (1e-3, 5, "0.3")
    assert config.size_schedule == {"48": 2, "32": 1} and config.model_kwargs == {"width": 8, "dropout": 0}


def test_cli_config_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "dup.json"
    path.write_text('{"epochs": 1, "epochs": 2}')
    status, err = run(capsys, "train", "--data", tmp_path, "--config", path, "--out", tmp_path / "r")
    assert status == 2 and err.count("\n") == 0 and "dup.json" in err and "given twice" in err


# --- 8: errors that name their file ------------------------------------------------------------------------------

def test_import_keras_wrong_size_names_the_file(tmp_path, capsys):
    source = KERAS_FIXTURES / "seed_cnn_64x64.weights.h5"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    status, err = run(capsys, "import-keras", source, "--size", 96, "--out", tmp_path / "k.pt")
    assert status == 2 and err.startswith("error: ") and "seed_cnn_64x64.weights.h5: input 96x96" in err


def test_split_folders_in_other_case_are_named(tmp_path):
    from pneumonia_cnn.data.dataset import load_split
    for split in ("Train", "VAL", "test"):
        (tmp_path / split / "NORMAL").mkdir(parents=True)
    with pytest.raises(PneumoniaCNNError) as error:
        load_split(tmp_path, "train")
    assert "Train/ is there" in str(error.value) and "lower-case" in str(error.value)


@pytest.mark.parametrize("renamed", ["VAL", "Test"])
def test_train_refuses_a_val_or_test_folder_in_other_case_before_training(tmp_path, capsys, renamed):
    """train read a VAL/ as absent (it carved val from train instead, saying only that val/ was missing) and a
    Test/ as no test split (scored nothing after training): refused at start, naming the folder."""
    from tests.conftest import link_subset, require_shared
    require_shared()
    root = link_subset(tmp_path / "data", {"train": 6, "val": 3, "test": 3})
    (root / renamed.lower()).rename(root / renamed)
    status, err = run(capsys, "train", "--data", root, "--out", tmp_path / "run", "--epochs", 1, "--size", 64)
    assert status == 2 and err == (f"error: {root / renamed.lower()}: folder not found; {renamed}/ is there, but "
                                   f"split folders are lower-case (train, val, test): rename it {renamed.lower()}/")
    assert not (tmp_path / "run").exists()
