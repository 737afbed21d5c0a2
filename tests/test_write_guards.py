"""A file size limit stops explain as a full disk does, and a named pipe given as weights is refused at once
rather than waited on (leftovers of the 2026-11-28 review)."""
import os
import subprocess
import sys
import threading

import pytest

from pneumonia_cnn.errors import CheckpointError
from pneumonia_cnn.fileio import load_torch_file
from tests.conftest import SHARED_DATA, require_shared

UNDER_A_FILE_SIZE_LIMIT = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from pneumonia_cnn.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="RLIMIT_FSIZE and FIFOs are POSIX")
def test_explain_stops_at_the_first_overlay_the_system_refuses_for_its_size(tmp_path):
    """EFBIG (a file size limit) had been one image's problem: every overlay was tried and each got its own
    "overlay not written" line. As ENOSPC, it now ends explain with one line naming the file."""
    require_shared()
    images = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:2]
    maps = tmp_path / "maps"
    result = subprocess.run([sys.executable, "-c", UNDER_A_FILE_SIZE_LIMIT, "explain", *map(str, images), "--out",
                             str(maps)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == f"error: {maps / (images[0].stem + '_gradcam.npy')}: File too large"
    assert "skipped" not in result.stdout and images[1].name not in result.stdout + result.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_as_a_torch_file_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            load_torch_file(fifo)
        except CheckpointError as error:
            outcome.append(str(error))
    reader = threading.Thread(target=read, daemon=True)  # a regression blocks in open(): the thread is left
    reader.start()
    reader.join(10)
    assert outcome == [f"{fifo}: not a readable checkpoint (not a regular file: a named pipe (FIFO))"]


def test_a_full_disk_behind_standard_output_is_named(capsys):
    """`pneumonia-cnn info builtin > /dev/full` said "error: [Errno 28] No space left on device", naming nothing."""
    import subprocess
    import sys
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "info", "builtin"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (2, "error: standard output: No space left on device\n")
