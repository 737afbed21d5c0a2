"""`train`'s options refused or said before any work (found by a probe of train's options: each test here failed
before its fix): a seed numpy cannot take, a missing --weights file, a warm-up as long as the run, and the
messages for a finished run folder and for --resume given a checkpoint file."""
from __future__ import annotations

import json
import logging

import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import ConfigError, DatasetError
from pneumonia_cnn.training import make_config, start_run
from tests.test_cli_guards import run

TINY = ["--epochs", "1", "--size", "32", "--batch-size", "16", "--no-progress", "--min-val-images", "10"]



def test_a_seed_numpy_cannot_take_is_refused_before_any_work(capsys, tmp_path, small_root):
    """`--seed 4294967296` trained an epoch, then failed in the end-of-run steps ("Seed must be between 0 and
    2**32 - 1", not naming --seed), and --resume met the same error; 1e20 gave "Overflow when unpacking long long"."""
    assert make_config(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(ConfigError, match=r"^seed: 4294967296 is above the maximum 4294967295$"):
        make_config(seed=2**32)
    out = tmp_path / "run"
    for seed in ("4294967296", "99999999999999999999"):
        status, error = run(capsys, "train", "--data", small_root, "--out", out, "--seed", seed, *TINY)
        assert (status, error) == (2, f"error: seed: {seed} is above the maximum 4294967295")
    config = tmp_path / "c.json"
    for written, shown in (("1e10", "10000000000"), ("1e20", "100000000000000000000")):
        config.write_text(f'{{"seed": {written}}}')
        status, error = run(capsys, "train", "--data", small_root, "--out", out, "--config", config, *TINY)
        assert (status, error) == (2, f"error: {config}: seed: {shown} is above the maximum 4294967295")
    assert not out.exists()


def test_the_largest_seed_trains_to_the_end(capsys, tmp_path, small_root, cache_dir):
    """The bound is numpy's: a run at 2**32 - 1 gets through its end-of-run steps (OOD detector, test scoring)."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_root), "--out", str(out), "--seed", str(2**32 - 1),
                 "--cache-dir", str(cache_dir), *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 2**32 - 1 and (out / "test_metrics.json").exists()


def test_a_missing_weights_file_is_refused_before_the_data_are_read(capsys, tmp_path, small_root):
    """It was found only after the data scan ("train: 80 images ..."), as a checkpoint, not as --weights."""
    missing, out = tmp_path / "nowhere.pt", tmp_path / "run"
    status, error = run(capsys, "train", "--data", small_root, "--out", out, "--weights", missing, *TINY)
    assert (status, error) == (2, f"error: weights: {missing}: not a readable checkpoint (No such file or directory)")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"weights": str(missing)}))
    status, error = run(capsys, "train", "--data", small_root, "--out", out, "--config", config, *TINY)
    assert (status, error) == (2, f"error: {config}: weights: {missing}: not a readable checkpoint (No such file or "
                                  f"directory)")
    assert not out.exists()


@pytest.mark.parametrize(("warmup", "said"), [(5, True), (1, True), (0.5, False)])
def test_a_warmup_as_long_as_the_run_is_said_before_the_data_are_read(tmp_path, caplog, warmup, said):
    """`--warmup-epochs 5 --schedule cosine --epochs 1` trained the whole run in warm-up without a word."""
    config = make_config(data=str(tmp_path / "nowhere"), out=str(tmp_path / "run"), epochs=1, size=32,
                         warmup_epochs=warmup, schedule="cosine", progress=False)
    caplog.set_level(logging.WARNING)
    with pytest.raises(DatasetError, match="folder not found"):  # the warning came first
        start_run(config)
    warned = [r.getMessage() for r in caplog.records if "--warmup-epochs" in r.getMessage()]
    expected = [f"--warmup-epochs {warmup:g} is not shorter than --epochs 1: the whole run is warm-up (the learning "
                f"rate climbs toward --lr 0.001 and the cosine schedule never starts); give fewer warm-up epochs or "
                f"more epochs"]
    assert warned == (expected if said else [])


def test_a_finished_run_folder_says_to_resume_with_more_epochs(capsys, trained_run, small_root):
    """`train --out FINISHED` said "continue it with --resume FINISHED", which refuses a finished run."""
    before = (trained_run / "best.pt").read_bytes()
    status, error = run(capsys, "train", "--data", small_root, "--out", trained_run, *TINY)
    assert (status, error) == (2, f"error: {trained_run}: already holds a run that finished after 2 epochs; train it "
                                  f"further with --resume {trained_run} --epochs N (N more than 2), or give another "
                                  f"--out")
    assert (trained_run / "best.pt").read_bytes() == before


def test_resume_given_a_checkpoint_file_names_the_run_folder(capsys, trained_run):
    """`train --resume RUN/best.pt` said "RUN/best.pt: nothing to resume (no last.pt)"."""
    status, error = run(capsys, "train", "--resume", trained_run / "best.pt")
    assert (status, error) == (2, f"error: --resume {trained_run / 'best.pt'}: a file; --resume takes the run folder "
                                  f"(--resume {trained_run})")


def test_resuming_a_run_whose_stored_seed_no_longer_passes_names_the_run(capsys, trained_run, tmp_path):
    """A run whose last.pt stored a seed above the bound (written before it was checked) said only "seed: ...
    is above the maximum", naming neither the run nor where the value came from."""
    import shutil

    import torch

    from pneumonia_cnn.checkpoint import save_checkpoint
    copy = tmp_path / "old_run"
    shutil.copytree(trained_run, copy)
    last = torch.load(copy / "last.pt", weights_only=False)
    last["config"]["seed"] = 2**32
    save_checkpoint(last, copy / "last.pt")
    done = int(last["training_state"]["epoch"])
    status, error = run(capsys, "train", "--resume", copy, "--epochs", done + 1)
    assert (status, error) == (2, f"error: --resume {copy}: seed: 4294967296 is above the maximum 4294967295 (its "
                                  f"last.pt's configuration with the options given)")


def test_a_resume_does_not_read_the_weights_file_again(capsys, trained_run, tmp_path):
    """last.pt holds the weights: a --weights file moved or deleted since the run started had stopped its resume
    ("not a readable checkpoint"), as --init's never did."""
    import shutil

    import torch

    from pneumonia_cnn.checkpoint import save_checkpoint
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    last = torch.load(copy / "last.pt", weights_only=False)
    last["config"]["weights"] = str(tmp_path / "moved_away.pt")
    save_checkpoint(last, copy / "last.pt")
    done = int(last["training_state"]["epoch"])
    status, error = run(capsys, "train", "--resume", copy, "--epochs", done + 1, "--no-progress")
    assert status == 0, error
    assert int(torch.load(copy / "last.pt", weights_only=False)["training_state"]["epoch"]) == done + 1
