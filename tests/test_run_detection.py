"""What makes a folder a training run's, and a file show-samples' own picture, for the output guards
(cli/outputs.py): judged by what the files hold, not by their names."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.cli.outputs import check_replaceable, run_folder_of
from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.plots import SAMPLES_TITLE, plt, save_figure  # plots chooses the display-free backend
from tests.test_cli_guards import digest, run

SAMPLES = ["show-samples", "--per-class", "1", "--data"]


# ---------- a training run's folder

@pytest.fixture()
def user_history(tmp_path) -> Path:
    """A folder of a user's own files: a spreadsheet that happens to be called history.csv, and a history.json
    of something else."""
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "history.csv").write_text("date,patient,finding\n2024-01-02,17,clear\n")
    (folder / "history.json").write_text(json.dumps([{"date": "2024-01-02", "note": "follow-up"}]))
    return folder


@pytest.mark.parametrize("name, kind", [("test_metrics.json", "metrics"), ("curves.png", "samples"),
                                        ("calibration.png", "samples"), ("best.pt", "checkpoint")])
def test_a_users_history_file_does_not_make_a_folder_a_run(user_history, name, kind):
    assert not run_folder_of(user_history / name)
    check_replaceable(str(user_history / name), kind)  # new files beside the user's: nothing to refuse


def test_show_samples_writes_beside_a_users_history_csv(capsys, user_history, small_root):
    out = user_history / "curves.png"
    assert run(capsys, *SAMPLES, small_root, "--out", out)[0] == 0
    assert out.stat().st_size > 0


# which of a real run's files are left: finished, stopped early (no test metrics), stopped in its first epoch
# (config.json only), its config.json or history lost (resumed elsewhere, cleaned up by hand), only last.pt
REAL_RUN_FILES = {
    "finished": None,
    "stopped early": ("config.json", "best.pt", "last.pt", "history.csv", "history.json", "curves.png"),
    "stopped in its first epoch": ("config.json",),
    "only last.pt": ("last.pt",),
    "only history.csv": ("history.csv",),
    "only history.json": ("history.json",),
    "no config.json": ("best.pt", "last.pt", "history.csv", "history.json"),
}


@pytest.mark.parametrize("left", REAL_RUN_FILES, ids=list(REAL_RUN_FILES))
def test_every_real_run_still_counts_as_one(tmp_path, trained_run, left):
    folder = tmp_path / "run"
    shutil.copytree(trained_run, folder, ignore=lambda _, names: [] if REAL_RUN_FILES[left] is None else
                    [n for n in names if n not in REAL_RUN_FILES[left]])
    for name in ("best.pt", "test_metrics.json", "curves.png"):
        assert run_folder_of(folder / name), (left, name)
        with pytest.raises(PneumoniaCNNError, match=f"would replace the {name} of the training run in"):
            check_replaceable(str(folder / name), "samples")


def test_a_standalone_checkpoint_named_last_pt_is_no_run(tmp_path, trained_run):
    """evaluate --save-as and adapt drop the training state: their last.pt, written again, is theirs."""
    saved = {k: v for k, v in load_checkpoint(trained_run / "last.pt").items() if k not in ("path", "training_state")}
    torch.save(saved, tmp_path / "last.pt")
    assert not run_folder_of(tmp_path / "last.pt")
    check_replaceable(str(tmp_path / "last.pt"), "checkpoint")


# ---------- show-samples' own picture

def _text_file(path: Path) -> Path:
    path.write_text("notes: regenerate with `pneumonia-cnn show-samples --per-class 4`\n")
    return path


@pytest.mark.parametrize("suffix", ["png", "jpg", "tif", "pdf", "svg"])
def test_a_text_file_naming_show_samples_is_not_its_picture(tmp_path, suffix):
    notes = _text_file(tmp_path / f"notes.{suffix}")
    with pytest.raises(PneumoniaCNNError, match=r"exists and is not a show-samples picture \(--out would replace"):
        check_replaceable(str(notes), "samples")


def test_an_svg_named_file_of_other_xml_is_not_its_picture(tmp_path):
    page = tmp_path / "page.svg"
    page.write_text('<?xml version="1.0"?>\n<html><title>pneumonia-cnn show-samples</title></html>\n')
    with pytest.raises(PneumoniaCNNError, match="exists and is not a show-samples picture"):
        check_replaceable(str(page), "samples")


@pytest.mark.parametrize("suffix", ["png", "jpg", "jpeg", "tif", "tiff", "pdf", "svg"])
def test_show_samples_own_picture_of_every_titled_format_is_known(tmp_path, suffix):
    figure, axis = plt.subplots()
    axis.imshow([[0, 255], [255, 0]], cmap="gray")
    save_figure(figure, tmp_path / f"grid.{suffix}", SAMPLES_TITLE)
    check_replaceable(str(tmp_path / f"grid.{suffix}"), "samples")


def test_show_samples_refuses_to_replace_a_text_file_named_like_a_picture(capsys, tmp_path, small_root):
    notes = _text_file(tmp_path / "notes.png")
    before = digest(notes)
    status, error = run(capsys, *SAMPLES, small_root, "--out", notes)
    assert (status, error) == (2, f"error: {notes}: exists and is not a show-samples picture (--out would replace "
                                  f"it); choose another path, or remove it")
    assert digest(notes) == before
