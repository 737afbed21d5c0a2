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


def test_printable_escapes_what_acts_on_a_terminal_and_keeps_every_other_character():
    assert printable("胸部\u3000X線.jpeg") == "胸部\u3000X線.jpeg"  # an ideographic space: a name to copy back
    assert printable("می\u200cخواهم.jpeg") == "می\u200cخواهم.jpeg"  # a zero-width non-joiner in Persian
    assert printable("a\u00a0b.pt") == "a\u00a0b.pt"
    assert printable("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # a right-to-left override reorders the line
    assert printable("x\ud800") == "x\\ud800"  # a lone surrogate: os.fsencode raised


def test_an_error_naming_a_lone_surrogate_is_still_one_line(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text('{"x\\ud800": 1}')
    assert main(["train", "--config", str(config), "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown config field(s): x\\ud800" in err and "Traceback" not in err


def test_an_output_path_that_is_a_link_gets_the_new_file_and_its_target_is_left_as_it_was(tmp_path):
    """Every output is written beside its path and renamed onto it: a link in the way is replaced, and the file
    it pointed to (a training run's best.pt, say) is not written through it (README, Reliability)."""
    from pneumonia_cnn.fileio import write_json_atomic
    target = tmp_path / "run" / "best.pt"
    target.parent.mkdir()
    target.write_bytes(b"the run's weights")
    for name, write in (("x.onnx", lambda path: path.write_bytes(b"new")), ("x.json", None)):
        link = tmp_path / name
        link.symlink_to(target)
        if write is None:
            write_json_atomic(link, {"new": 1})
        else:
            with atomic_path(link) as temporary:
                write(temporary)
        assert not link.is_symlink() and link.read_bytes() in (b"new", b'{\n  "new": 1\n}\n'), name
        assert target.read_bytes() == b"the run's weights"
