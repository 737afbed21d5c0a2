"""Crash-safe training and safe loading."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.errors import CheckpointError

TRAIN_ARGS = ["--size", "64", "--batch-size", "4", "--no-ood", "--no-progress", "--deterministic", "--seed", "2"]


def start_training(small_root, out, cache, epochs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "train", "--data", str(small_root), "--out",
                             str(out), "--epochs", str(epochs), "--cache-dir", str(cache), *TRAIN_ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def resume_run(out):
    resumed = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "train", "--resume", str(out), "--no-progress"],
                             capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def wait_for_epochs(out, count, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            if len(json.loads((out / "history.json").read_text())) >= count:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def test_sigkill_mid_epoch_then_resume_loses_no_completed_epoch(small_root, tmp_path):
    out = tmp_path / "run"
    process = start_training(small_root, out, tmp_path / "cache", epochs=4)
    wait_for_epochs(out, 1, process)
    time.sleep(0.5)  # into the second epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = load_checkpoint(out / "last.pt")  # loads: never half-written
    completed = state["history"]
    assert len(completed) >= 1 and state["training_state"]["epoch"] == len(completed)
    resume_run(out)
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert history[: len(completed)] == completed  # the completed epochs are kept as they were
    assert not list(out.glob(".*.tmp"))


def test_sigterm_saves_the_position_inside_the_epoch_and_resumes_to_the_same_weights(small_root, tmp_path):
    out = tmp_path / "run"
    process = start_training(small_root, out, tmp_path / "cache", epochs=3)
    wait_for_epochs(out, 1, process)
    time.sleep(0.3)  # into the second epoch: SIGTERM lets the step finish, then saves
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "finishing the current step" in stderr and "Traceback" not in stderr
    last = load_checkpoint(out / "last.pt")
    state = last["training_state"]
    # saved inside an epoch; or, when the signal lands while an epoch's end is being written (its curves), at
    # that epoch's end, before the next one starts (it used to go on into one more step)
    assert state["epoch"] in (1, 2) and state["step_in_epoch"] >= 0 and len(last["history"]) == state["epoch"]
    # the sums of the steps it did: batches of 4, the epoch's last one holding what is left (the signal can land
    # on it: 42 training images once val's 20 are too few and a tenth of train's patients is carved, 11 steps)
    images = last["intended_use"]["trained_on"]["images"]
    assert images == 42
    assert state["epoch_sums"]["count"] == min(4 * state["step_in_epoch"], images)
    resume_run(out)
    reference = tmp_path / "reference"
    uninterrupted = start_training(small_root, reference, tmp_path / "cache", epochs=3)
    assert uninterrupted.wait(timeout=600) == 0
    resumed, straight = load_checkpoint(out / "last.pt"), load_checkpoint(reference / "last.pt")
    assert all(torch.equal(resumed["state_dict"][k], straight["state_dict"][k]) for k in straight["state_dict"])
    losses = [[r["train_loss"] for r in run["history"]] for run in (resumed, straight)]
    assert losses[0] == pytest.approx(losses[1])


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"format": "pneumonia-cnn/1", "state_dict": {}, "payload": Exploit(marker)}, tmp_path / "evil.pt",
               pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a pneumonia-cnn checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_size_just_over_a_limit_is_not_shown_at_or_under_it():
    """"2.0 MB, above the 2 MB limit" (a file 300 bytes over) and "0.0 MB, above the 0.04 MB limit" read as
    nonsense: where one decimal hides the excess, the bytes are given."""
    from pneumonia_cnn.fileio import over_limit
    assert over_limit(48 * 2**20, 40) == "48.0 MB, above the 40 MB limit"
    assert over_limit(2 * 2**20 + 300, 2) == "2,097,452 bytes, above the 2 MB limit (2,097,152 bytes)"
    assert over_limit(19_456, 0.04) == "19,456 bytes, above the 0.04 MB limit (41,943 bytes)"
