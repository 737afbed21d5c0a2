"""Names whose bytes are not UTF-8 in every JSON output: written as predict's rows show them (``d\\xff``), not as
lone surrogates (``"d\\udcff"``), which jq turns into U+FFFD (two such names then look alike) and Python cannot
encode again."""
import json
import os

from pneumonia_cnn.cli import main
from pneumonia_cnn.fileio import json_text
from tests.conftest import link_subset, require_shared


def test_json_text_writes_an_undecodable_byte_as_predicts_rows_do_and_keeps_other_text():
    named = os.fsdecode(b"scans/d\xff/x\xfe.jpeg")  # as Python reads such a name from the system
    text = json_text({"path": named, named: [named, "plain \\ text", "肺炎"], "n": 1})
    assert "\\udc" not in text and text.encode("utf-8")
    assert json.loads(text) == {"path": "scans/d\\xff/x\\xfe.jpeg",
                                "scans/d\\xff/x\\xfe.jpeg": ["scans/d\\xff/x\\xfe.jpeg", "plain \\ text", "肺炎"],
                                "n": 1}


def test_evaluate_and_predict_name_the_same_file_alike(tmp_path, capsys):
    require_shared()
    root = link_subset(tmp_path / os.fsdecode(b"d\xff"), {"test": 2})
    assert main(["predict", str(root / "test"), "--format", "json"]) == 0
    predicted = sorted(row["path"] for row in json.loads(capsys.readouterr().out))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--data", str(root), "--out", str(out), "--no-figures", "--no-progress"]) == 0
    capsys.readouterr()
    written = out.read_text(encoding="utf-8")
    report = json.loads(written)
    assert "\\udc" not in written and report["data"] == str(tmp_path) + "/d\\xff"
    assert sorted(row["path"] for row in report["predictions"]) == predicted
    assert all("/d\\xff/test/" in path for path in predicted) and len(predicted) == 4
