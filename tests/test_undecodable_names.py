"""A data folder whose name is not UTF-8: the tool reads its own JSON back (evaluate's check of the metrics it
would replace, the image cache's manifest), so a stored path stays the path it names."""
import json
import os

from pneumonia_cnn.cli import main
from tests.conftest import link_subset, require_shared


def test_evaluate_runs_again_on_a_folder_whose_name_is_not_utf8(tmp_path, capsys, monkeypatch):
    require_shared()
    root = link_subset(tmp_path / os.fsdecode(b"d\xff"), {"test": 2})
    monkeypatch.chdir(tmp_path)
    common = ["evaluate", "--data", str(root), "--no-figures", "--no-progress", "--bootstrap", "10",
              "--cache-dir", str(tmp_path / "cache")]
    assert main(common) == 0
    assert main(common) == 0, capsys.readouterr().err  # its own metrics: replaced (a display form was refused)
    written = json.loads((tmp_path / "builtin_test_metrics.json").read_text(encoding="utf-8"))
    assert written["data"] == str(root) and os.fsencode(written["data"]).endswith(b"/d\xff")


def test_written_lines_name_an_output_as_predicts_rows_would(tmp_path, capsys):
    """`written:` printed the raw byte of a name that is not UTF-8 (a terminal shows U+FFFD for any such byte)."""
    require_shared()
    root = link_subset(tmp_path / "data", {"test": 2})
    out = tmp_path / os.fsdecode(b"m\xff.json")
    assert main(["evaluate", "--data", str(root), "--out", str(out), "--no-figures", "--no-progress",
                 "--bootstrap", "10", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"written: {tmp_path}/m\\xff.json"
    assert main(["stress", "builtin", "--data", str(root), "--out", str(tmp_path / os.fsdecode(b"s\xfe.json")),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"written: {tmp_path}/s\\xfe.json"
