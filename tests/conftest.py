"""Shared fixtures: real X-rays from ../shared (linked, never copied into the project), tiny runs."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Expected values here were hand-checked against CPU arithmetic, and CI has no GPU. On a machine with one, the
# suite also runs on the CPU (on a lent H100, 13 tests failed only because `--device auto` picked CUDA:
# other rounding, a fixture model that chose another calibration); PNEUMONIA_CNN_TEST_CUDA=1 leaves the GPU
# visible for the GPU checks (`-m cuda`, and benchmarks/gpu_recheck.sh). Set before anything initialises CUDA.
if os.environ.get("PNEUMONIA_CNN_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# A background job of a non-interactive shell (`bash .ci/run &`) starts with SIGINT ignored, every process it
# starts inherits that, and Python then never raises KeyboardInterrupt: the Ctrl-C tests saw exit 0 (as a
# command started that way should). Their subject is a terminal's Ctrl-C, so the suite's children get the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PNEUMONIA_CNN_SHARED", PROJECT.parent / "shared"))
SHARED_DATA = SHARED / "data" / "chest_xray_224"
KERAS_FIXTURES = SHARED / "fixtures" / "keras"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The tool's cache (exported ONNX graphs, int8 models) in a folder of this session, not the user's."""
    previous = os.environ.get("PNEUMONIA_CNN_CACHE")
    os.environ["PNEUMONIA_CNN_CACHE"] = str(tmp_path_factory.mktemp("tool-cache"))
    yield
    if previous is None:
        os.environ.pop("PNEUMONIA_CNN_CACHE", None)
    else:
        os.environ["PNEUMONIA_CNN_CACHE"] = previous


_PORTS_GIVEN: set[int] = set()
# Each pytest-xdist worker takes its ports from a block of its own below Linux's ephemeral range (32768-60999),
# so two workers never get the same port and no outgoing connection's local port lands on one. Probing port 0
# and closing the probe had left a window in which another worker (or a connection) got the same port.
FIRST_PORT, PORTS_FOR_WORKERS = 20000, 12000  # 20000-31999; blocks of 1,000, smaller beyond 12 workers
# a random start within the block, so that two sessions run at once (by hand beside a full run) rarely meet
_next_port_offset = np.random.default_rng(os.getpid()).integers(1 << 30)


def _port_block() -> tuple[int, int]:
    """(first port, size) of this worker's block."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw0", "gw1", ...; unset without -n
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    workers = max(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1), index + 1)
    size = min(1000, PORTS_FOR_WORKERS // workers)
    return FIRST_PORT + index * size, size


def free_port() -> int:
    """A loopback port nothing listens on now, from this worker's block, never one this process handed out
    before (the system had given the same free port to two probes in a row: an Orthanc's HTTP and DICOM ports
    came out equal, and it exited). A process outside the suite may still take it before the caller binds it."""
    global _next_port_offset
    block, size = _port_block()
    for _ in range(size):
        port = block + int(_next_port_offset) % size
        _next_port_offset += 1
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:  # something listens there, or a closed connection still holds it
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free loopback port left in {block}-{block + size - 1}")


def require_shared():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real X-rays not available: {SHARED_DATA} is absent (../shared is provided beside the project)")


def link_subset(root: Path, per_split: dict, seed: int = 0) -> Path:
    """A Kaggle-layout tree of symlinks to a few real images per split and class."""
    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for name in ("NORMAL", "PNEUMONIA"):
            source = sorted((SHARED_DATA / split / name).iterdir())
            target = root / split / name
            target.mkdir(parents=True, exist_ok=True)
            for path in rng.choice(source, size=min(count, len(source)), replace=False):
                (target / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> Path:
    require_shared()
    return link_subset(tmp_path_factory.mktemp("xray"), {"train": 24, "val": 10, "test": 10})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(small_root, cache_dir, tmp_path_factory) -> Path:
    """One tiny real training run shared by the tests that need a checkpoint."""
    from pneumonia_cnn.experiment import train_and_evaluate
    from pneumonia_cnn.training import make_config
    out = tmp_path_factory.mktemp("run")
    config = make_config("tutorial", data=str(small_root), out=str(out), epochs=2, size=64, batch_size=16,
                         cache_dir=str(cache_dir), progress=False, min_val_images=10)
    train_and_evaluate(config)
    return out


def write_image(path: Path, array: np.ndarray, mode: str | None = None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **save)
    return path


@pytest.fixture(scope="session")
def best_like_run(small_root, cache_dir, tmp_path_factory) -> Path:
    """The `best` preset, small: equalisation, flips at test time, EMA, class weights, Platt calibration and
    the sensitivity:0.95 operating point, so the decision path is exercised as shipped."""
    from pneumonia_cnn.experiment import train_and_evaluate
    from pneumonia_cnn.training import make_config
    out = tmp_path_factory.mktemp("best_like")
    config = make_config("best", data=str(small_root), out=str(out), epochs=3, size=64, batch_size=16,
                         cache_dir=str(cache_dir), progress=False, min_val_images=10, early_stopping=0,
                         warmup_epochs=0.5)
    train_and_evaluate(config)
    return out


def full_disk_for_temporary_files(monkeypatch, folder):
    """Text written to a temporary file (``*.tmp``) in ``folder`` fails as on a full disk (ENOSPC): a simulation
    for where mounting a small tmpfs needs root."""
    import errno
    import os
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.parent == folder and self.suffix == ".tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full)
