"""SIGTERM during a command (systemd's stop, `kill`, a batch scheduler's time limit): the command unwinds as
Ctrl-C does, says so in one line, and the process still ends by the signal (status -15), as its parent saw
before. Before, it died where it stood with no line, and an output being written left its temporary file."""
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from pneumonia_cnn.fileio import atomic_path
from pneumonia_cnn.signals import Terminated, sigterm_unwinds
from tests.conftest import SHARED_DATA


def test_sigterm_while_an_output_is_written_removes_its_temporary_file(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    target = tmp_path / "report.json"
    with pytest.raises(Terminated), sigterm_unwinds(), atomic_path(target) as temporary:
        temporary.write_text("half a report")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at once: the sleep is cut short
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before


def test_sigterm_ends_a_command_with_one_line_and_by_the_signal(tmp_path):
    out = tmp_path / "maps"
    process = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "explain", "builtin",
                                str(SHARED_DATA / "test" / "PNEUMONIA"), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()  # a map is written: the command is at work
    process.send_signal(signal.SIGTERM)
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGTERM, stderr
    assert stderr.splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in stderr, stderr
    written = [line.rsplit(" -> ", 1)[1].split(" (layer")[0] for line in [first, *rest.splitlines()] if " -> " in line]
    assert written and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for path in written:  # every map announced is whole
        with Image.open(path) as image:
            image.load()
