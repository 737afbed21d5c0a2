"""Refused too late or too loudly: a class folder whose name the checkpoint would refuse (found only after
training), one checkpoint twice as predict's or explain's "ensemble", and an output that could not be written
shown as a traceback under -v."""
import errno
import os
import shutil
from pathlib import Path

import pytest

from pneumonia_cnn import builtin
from pneumonia_cnn.cli import main
from tests.conftest import full_disk_for_temporary_files
from tests.test_cli_guards import run

EXAMPLE = Path(builtin.checkpoint_path()).parent / "examples" / "NORMAL_IM-0128-0001.jpeg"


def test_a_class_folder_with_a_control_character_is_refused_before_training(capsys, tmp_path, small_root):
    root = tmp_path / "data"
    shutil.copytree(small_root, root, symlinks=True)
    (root / "train" / "PNEUMONIA").rename(root / "train" / "PNEU\x1bMONIA")
    status, error = run(capsys, "train", "--data", root, "--out", tmp_path / "run", "--epochs", "1", "--size", "48",
                        "--cache-dir", tmp_path / "cache", "--no-progress", "--no-ood")
    assert (status, error) == (2, f"error: {root}/train/PNEU\\x1bMONIA: class folder name is not printable text (a "
                                  "control character, line break or non-UTF-8 byte); class names label every "
                                  "output: rename it")
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_predict_and_explain_refuse_one_checkpoint_twice(capsys, tmp_path):
    copy = Path(shutil.copyfile(builtin.checkpoint_path(), tmp_path / "copy.pt"))
    link = tmp_path / "link.pt"
    link.symlink_to(copy)
    for argv, item, said in (
            (["predict", "builtin", "builtin", "--", EXAMPLE], "builtin", "predict names it twice"),
            (["predict", copy, link, "--", EXAMPLE], link, f"predict names the file {copy} loads ({link}) again"),
            (["explain", copy, copy, "--", EXAMPLE, "--out", tmp_path / "maps"], copy, "explain names it twice")):
        assert run(capsys, *argv) == (2, f"error: {item}: {said}; give each model once")
    assert not (tmp_path / "maps").exists()


def test_an_output_that_cannot_be_written_is_one_line_under_verbose(capsys, tmp_path, small_root, monkeypatch):
    """-v shows tracebacks of what went wrong in the program; a full disk is the user's to fix, said in one line
    naming the output as without -v (simulated as in ``test_json_writers_on_a_full_disk_name_the_output``)."""
    full_disk_for_temporary_files(monkeypatch, tmp_path)
    out = tmp_path / "stress.json"
    status, error = run(capsys, "-v", "stress", "--data", small_root, "--out", out)
    assert status == 2 and "Traceback" not in error
    assert error.splitlines()[-1] == f"error: {out}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_an_unexpected_error_still_shows_its_traceback_under_verbose(capsys, monkeypatch):
    """What -v is for: a plain OSError from inside the program is a bug's trail, raised for its traceback."""
    from pneumonia_cnn import info

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "inner failure")
    monkeypatch.setattr(info, "describe_checkpoint", broken)
    assert run(capsys, "info") == (2, "error: [Errno 5] inner failure")
    with pytest.raises(OSError, match="inner failure"):
        main(["-v", "info"])


def test_an_ensemble_of_one_models_weights_under_two_names_is_refused(capsys, tmp_path):
    """A copy of a checkpoint is another file, so the path check lets it by; it averaged the model with itself
    and reported "an ensemble of 2"."""
    shutil.copyfile(builtin.checkpoint_path(), tmp_path / "copy.pt")
    image = builtin.example_paths()[0]
    status, error = run(capsys, "predict", "builtin", tmp_path / "copy.pt", "--", image)
    assert (status, error) == (2, f"error: {tmp_path / 'copy.pt'}: holds the same weights as "
                                  f"{builtin.checkpoint_path()}; an ensemble needs different models")
