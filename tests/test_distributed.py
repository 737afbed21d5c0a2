"""Data-parallel training for real: 2 CPU processes, Gloo on loopback, launched by torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.cli import main
from tests.conftest import free_port


def worker_pids(launcher_pid):
    """Descendants of the torchrun launcher that run the training (read from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = [], [launcher_pid]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent:
                frontier.append(pid)
                try:
                    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
                except OSError:
                    continue
                if b"pneumonia_cnn" in cmdline and b"torch.distributed.run" not in cmdline:
                    found.append(pid)
    return sorted(found)


def common_args(root, cache, epochs=2):
    # fp32: the comparison is of the data-parallel arithmetic, which bf16 rounding (the CPU default where
    # the CPU has bf16 instructions) would blur beyond the stated tolerances
    return ["--data", str(root), "--epochs", str(epochs), "--size", "48", "--augment", "{}", "--no-ood",
            "--no-progress", "--cache-dir", str(cache), "--seed", "7", "--lr", "0.0005", "--amp", "off",
            "--device", "cpu"]  # Gloo on CPUs, also on a machine with a GPU


def test_two_processes_match_one_with_the_same_global_batch(small_root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PNEUMONIA_CNN_DIST_TIMEOUT="120")
    single = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "train", "--out", str(tmp_path / "one"),
                             "--batch-size", "16", *common_args(small_root, tmp_path / "c1")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "pneumonia_cnn",
                             "train", "--out", str(tmp_path / "two"), "--batch-size", "8",
                             *common_args(small_root, tmp_path / "c2")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    for a, b in zip(one, two):  # tolerance: float summation order differs between 1 and 2 processes
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 and abs(a["val_auc"] - b["val_auc"]) < 1e-3
    w1 = load_checkpoint(tmp_path / "one" / "last.pt")["state_dict"]
    w2 = load_checkpoint(tmp_path / "two" / "last.pt")["state_dict"]
    # Adam normalises each update to about lr in size, so a near-zero gradient summed in another order on
    # 2 processes can move a weight by up to ~lr per step: allow 4 steps' worth (lr 5e-4)
    largest = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert largest < 4 * 5e-4, largest
    assert double.stdout.count("run folder:") == 1  # only rank 0 reports and writes


def test_a_dead_rank_ends_the_job_with_an_error(small_root, tmp_path):
    """Rank 1 is killed mid-run: torchrun stops the job and exits non-zero instead of hanging."""
    import signal
    import time
    env = dict(os.environ, OMP_NUM_THREADS="1", PNEUMONIA_CNN_DIST_TIMEOUT="60")
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "pneumonia_cnn",
                                "train", "--out", str(tmp_path / "r"), "--batch-size", "4",
                                *common_args(small_root, tmp_path / "c", epochs=50)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "history.json").exists() and time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.5)
    workers = worker_pids(process.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    start = time.time()
    process.wait(timeout=180)
    assert process.returncode != 0 and time.time() - start < 180


def test_more_processes_than_gpus_is_one_line_before_anything_is_written(small_root, tmp_path, monkeypatch, capsys):
    """torchrun --nproc-per-node 2 on a one-GPU machine: rank 1 would die in torch.cuda.set_device(1) with CUDA's
    'invalid device ordinal' traceback (seen on a lent H100); it now says what to change, before the run folder."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    args = ["train", "--data", str(small_root), "--out", str(tmp_path / "r"), "--epochs", "1", "--size", "48",
            "--no-ood", "--no-progress", "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 2  # the usage error code, as for any option the machine cannot honour
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --device auto: torchrun started 2 processes on this machine but only 1 CUDA device(s) "
                   "are visible; start at most 1 (--nproc-per-node 1) or use --device cpu"]
    assert not (tmp_path / "r").exists()
    assert main([*args, "--device", "cuda"]) == 2 and "--device cuda: torchrun started 2" in capsys.readouterr().err


def test_one_process_per_gpu_passes_and_a_gpu_index_is_refused(monkeypatch):
    from pneumonia_cnn.errors import PneumoniaCNNError
    from pneumonia_cnn.training.distributed import _check_one_gpu_per_process, setup_distributed
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    _check_one_gpu_per_process(1, "cuda")  # two processes, two GPUs: allowed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(PneumoniaCNNError, match="started 3 processes on this machine but only 2"):
        _check_one_gpu_per_process(0, "auto")  # rank 0 already knows that rank 2 will have no GPU
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PneumoniaCNNError, match=r"--device cuda:0: under torchrun each process uses the GPU of its "):
        setup_distributed("cuda:0")


STOP_AT_EPOCH_END = """
import os, signal, sys
from pneumonia_cnn.training import loop
original = loop.end_of_epoch
def signalled_while_rank_0_writes(run):  # the other rank has gone on into the next epoch's first step
    row = original(run)
    if run.dist.main and row["epoch"] == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return row
loop.end_of_epoch = signalled_while_rank_0_writes
from pneumonia_cnn.cli import entry
sys.exit(entry())  # as `python -m pneumonia_cnn` ends
"""


def test_a_stop_while_rank_0_writes_an_epoch_end_stops_every_rank_cleanly(small_root, tmp_path):
    """Rank 0 stopped after the epoch's end alone and left; rank 1 died in its all-reduce ("Connection closed
    by peer"; NCCL would hang). All ranks now stop together, after the next step's agreement."""
    (tmp_path / "stop.py").write_text(STOP_AT_EPOCH_END)
    env = dict(os.environ, OMP_NUM_THREADS="1", PNEUMONIA_CNN_DIST_TIMEOUT="60")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(tmp_path / "stop.py"),
                             "train", "--out", str(tmp_path / "r"), "--batch-size", "4",
                             *common_args(small_root, tmp_path / "c", epochs=3)],
                            capture_output=True, text=True, env=env, timeout=300)
    # each rank exits 130 (interrupted), or is ended by torchrun once the first has: none fails on its own
    exits = [line.split(":")[1].split()[0] for line in result.stderr.splitlines()
             if line.strip().startswith("exitcode")]
    assert "130" in exits and set(exits) <= {"130", "-15"}, result.stderr[-3000:]
    assert "RuntimeError" not in result.stderr and "Connection closed" not in result.stderr
    state = load_checkpoint(tmp_path / "r" / "last.pt")["training_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)  # epoch 1 kept; all ranks stopped after one step
