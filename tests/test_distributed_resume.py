"""Resuming data-parallel runs: each rank continues with its own random states and sums, and only in the layout
(number of processes) the run started in; ``--init`` of weights of another shape is one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pneumonia_cnn.checkpoint import load_checkpoint, save_checkpoint
from pneumonia_cnn.cli import main
from tests.test_distributed import free_port

AUGMENT = '{"shear": 0.2, "zoom": 0.2, "flip": true}'  # drawn from each rank's own generator

STOP_MID_EPOCH = """
import os, signal, sys
from pneumonia_cnn.training import loop
original = loop.train_step
def signalled_after_three_steps(run, pixels, labels):  # rank 0 alone is signalled; the ranks agree to stop
    result = original(run, pixels, labels)
    if run.dist.main and (run.state.epoch, run.state.step_in_epoch) == (0, 2):
        os.kill(os.getpid(), signal.SIGINT)
    return result
loop.train_step = signalled_after_three_steps
from pneumonia_cnn.cli import entry
sys.exit(entry())  # as `python -m pneumonia_cnn` ends
"""


def torchrun(script, args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PNEUMONIA_CNN_DIST_TIMEOUT="120")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port()), *script, "train", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes_to_the_uninterrupted_weights(small_root, tmp_path):
    """last.pt held rank 0's augmentation generator and partial sums only: on resume rank 1 drew rank 0's
    transforms and the epoch's train_loss summed rank 0's sums twice. Each rank now gets its own back."""
    args = ["--data", str(small_root), "--epochs", "2", "--size", "48", "--batch-size", "4", "--augment", AUGMENT,
            "--no-ood", "--no-evaluate-test", "--no-progress", "--cache-dir", str(tmp_path / "c"), "--seed", "7",
            "--amp", "off", "--device", "cpu"]
    reference = torchrun(["-m", "pneumonia_cnn"], ["--out", str(tmp_path / "ref"), *args], tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    (tmp_path / "stop.py").write_text(STOP_MID_EPOCH)
    stopped = torchrun([str(tmp_path / "stop.py")], ["--out", str(tmp_path / "r"), *args], tmp_path)
    assert stopped.returncode != 0 and "resume with" in stopped.stderr + stopped.stdout, stopped.stderr[-3000:]
    state = load_checkpoint(tmp_path / "r" / "last.pt")["training_state"]
    assert (state["epoch"], state["step_in_epoch"], state["world_size"]) == (0, 3, 2)
    assert not torch.equal(state["ranks"][0]["generator"], state["ranks"][1]["generator"])
    resumed = torchrun(["-m", "pneumonia_cnn"], ["--resume", str(tmp_path / "r"), "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = json.loads((tmp_path / "ref" / "history.json").read_text())
    two = json.loads((tmp_path / "r" / "history.json").read_text())
    for a, b in zip(one, two, strict=True):  # the loss summed in two parts: another float32 rounding
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-6 and a["train_accuracy"] == b["train_accuracy"]
        assert a["val_loss"] == b["val_loss"]
    for name in ("best.pt", "last.pt"):
        expected = load_checkpoint(tmp_path / "ref" / name)["state_dict"]
        got = load_checkpoint(tmp_path / "r" / name)["state_dict"]
        assert all(torch.equal(expected[k], got[k]) for k in expected), name  # bit-identical, as two full runs


@pytest.fixture(scope="module")
def tiny_run(small_root, tmp_path_factory):
    """One process, one step: a last.pt and a best.pt at 48x48."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--data", str(small_root), "--out", str(out), "--epochs", "1", "--size", "48",
                 "--max-steps-per-epoch", "1", "--no-ood", "--no-evaluate-test", "--no-progress", "--device", "cpu",
                 "--cache-dir", str(out.parent / "c")]) == 0
    return out


def test_a_resume_with_another_number_of_processes_is_refused_in_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    """A 2-process run resumed in 1 process went on silently at half the global batch."""
    run = tmp_path / "two"
    shutil.copytree(tiny_run, run)
    last = load_checkpoint(run / "last.pt")
    assert last["training_state"]["world_size"] == 1
    last["training_state"]["world_size"] = 2  # as a 2-process run saves it
    save_checkpoint(last, run / "last.pt")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and err[0].endswith(
        "two: started with 2 processes, resumed with 1; its global batch and saved position in the epoch belong "
        "to 2: resume it with 2 processes (torchrun --nproc-per-node 2), or start a new run"), err
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before torchrun's process group is joined
    assert main(["train", "--resume", str(tiny_run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "started with 1 process, resumed with 2; " in err and "resume it without torchrun" in err, err
    assert load_checkpoint(tiny_run / "last.pt")["training_state"]["epoch"] == 1  # nothing was trained


def test_init_from_weights_of_a_non_square_input_is_one_line(tiny_run, small_root, tmp_path, capsys):
    """A 96x80 Keras import given to --init passed the size check (its first side) and crashed in
    load_state_dict with a 30-line traceback."""
    from pneumonia_cnn.models import create_model
    checkpoint = load_checkpoint(tiny_run / "best.pt")
    kwargs = dict(checkpoint["model"]["kwargs"], image_size=[48, 40])
    checkpoint["model"]["kwargs"], checkpoint["preprocessing"]["size"] = kwargs, [48, 40]
    checkpoint["state_dict"] = create_model("seed", **kwargs).state_dict()
    save_checkpoint(checkpoint, tmp_path / "wide.pt")
    code = main(["train", "--data", str(small_root), "--out", str(tmp_path / "r"), "--init", str(tmp_path / "wide.pt"),
                 "--epochs", "1", "--no-ood", "--no-evaluate-test", "--no-progress", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert err[0].startswith("error: --init ") and "wide.pt: weights do not fit model seed at --size 48 (" in err[0]
    assert "size mismatch: " in err[0] and err[0].endswith("; it was trained at 48x40 input"), err[0]
