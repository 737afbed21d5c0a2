"""Output names at the limits: a legal name of 242-255 bytes is written, and an error naming a hostile file
name cannot forge lines or redraw the terminal."""
from __future__ import annotations

import os

from pneumonia_cnn.cli import main
from pneumonia_cnn.fileio import atomic_path, printable


def test_a_name_of_255_bytes_is_written_atomically(tmp_path):
    for name in ("L" * 255, "é" * 126 + ".xy"):  # 255 bytes each: the temporary name is cut, not the file's
        target = tmp_path / name
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"done")
        assert target.read_bytes() == b"done"
    assert sorted(os.listdir(tmp_path)) == sorted(["L" * 255, "é" * 126 + ".xy"])  # no temporary left


def test_an_error_naming_a_hostile_file_is_one_escaped_line(tmp_path, capsys):
    hostile = tmp_path / "x\nerror: forged\x1b[31m.pt"
    assert main(["info", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "x\\nerror: forged\\x1b[31m.pt" in err
    assert printable(os.fsdecode(b"bad\xff.jpeg")) == "bad\\xff.jpeg"


def test_an_output_of_255_bytes_passes_the_early_write_check(tmp_path):
    from pneumonia_cnn.cli.common import check_output
    check_output(tmp_path / ("L" * 250 + ".json"))  # the probe file beside it was named after it: too long
