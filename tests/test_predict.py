import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.inference import Predictor
from tests.conftest import SHARED_DATA, write_image
from tests.data.dicom_factory import write_dicom


def test_predict_folder_glob_dicom_and_bad_files(trained_run, tmp_path, capsys):
    folder = tmp_path / "scans" / "nested"
    folder.mkdir(parents=True)
    for path in sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:3]:
        (folder / path.name).symlink_to(path)
    write_dicom(tmp_path / "scans" / "x.dcm", (np.random.default_rng(0).random((80, 80)) * 4000).astype(np.uint16),
                photometric="MONOCHROME1")
    (tmp_path / "scans" / "broken.png").write_bytes(b"garbage")
    assert main(["predict", str(trained_run), str(tmp_path / "scans"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 4
    # each row is the library's prediction for that file, and its label is its probability against the threshold
    library = {r.path: r for r in Predictor(trained_run, "cpu").predict_files([row["path"] for row in good])}
    for row in good:
        assert row["probability"] == pytest.approx(library[row["path"]].probability, abs=1e-6)
        not_an_xray = any(w.startswith("not an X-ray") for w in row["warnings"])  # x.dcm is noise: no label
        assert row["label"] == (None if not_an_xray else "PNEUMONIA" if row["probability"] >= row["threshold"]
                                else "NORMAL")
    assert [r["label"] is None for r in good] == [r["path"].endswith("x.dcm") for r in good]
    assert all(r["model"] and r["threshold"] == good[0]["threshold"] for r in good)
    assert "in_distribution" in good[0] and "ood_score" in good[0]
    bad = next(r for r in rows if r["path"].endswith("broken.png"))
    assert "not a readable image" in bad["error"]

    assert main(["predict", str(trained_run / "best.pt"), str(folder / "*.jpeg"), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    # the three JPEGs again, with the probabilities the JSON output gave them
    json_probability = {Path(row["path"]).name: row["probability"] for row in good}
    assert sorted(Path(row["path"]).name for row in table) == sorted(p.name for p in folder.iterdir())
    for row in table:
        assert float(row["probability"]) == pytest.approx(json_probability[Path(row["path"]).name], abs=1e-6)


def test_predict_with_nothing_readable_fails(trained_run, tmp_path, capsys):
    (tmp_path / "a.jpeg").write_text("text")
    assert main(["predict", str(trained_run), str(tmp_path / "a.jpeg"), str(tmp_path / "missing.png")]) == 1
    out = capsys.readouterr().out
    assert "unreadable" in out and "no such file" in out


def test_ensemble_averages_probabilities(trained_run, tmp_path, capsys):
    image = write_image(tmp_path / "x.png", (np.random.default_rng(2).random((64, 64)) * 255).astype(np.uint8))
    main(["predict", str(trained_run / "best.pt"), str(image), "--format", "json"])
    single = json.loads(capsys.readouterr().out)[0]["probability"]
    import torch
    other = torch.load(trained_run / "last.pt", weights_only=True)  # another model: the same weights are refused
    name = next(iter(other["state_dict"]))
    other["state_dict"][name] = other["state_dict"][name] * 1.05
    torch.save(other, tmp_path / "other.pt")
    main(["predict", str(trained_run / "best.pt"), str(tmp_path / "other.pt"), "--", str(image), "--format", "json"])
    both = json.loads(capsys.readouterr().out)[0]
    from pneumonia_cnn.inference import Predictor
    last = Predictor(tmp_path / "other.pt", "cpu").predict_files([image])[0].probability
    assert last != single
    assert abs(both["probability"] - (single + last) / 2) < 1e-6 and "+" in both["model"]


def test_predict_in_bf16_stays_close_to_float32(trained_run, capsys):
    images = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:6] + \
        sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:6]
    runs = {}
    for amp in ("off", "bf16"):
        assert main(["predict", str(trained_run), *map(str, images), "--format", "json", "--engine", "torch",
                     "--amp", amp]) == 0
        runs[amp] = [row["probability"] for row in json.loads(capsys.readouterr().out)]
    difference = np.abs(np.array(runs["off"]) - np.array(runs["bf16"]))
    assert 0 < difference.max() < 0.03  # bf16 really ran, and moved no probability by more than 0.03
    assert main(["predict", str(trained_run), str(images[0]), "--engine", "onnx", "--amp", "bf16"]) == 2
    assert "--amp bf16 runs on the torch engine" in capsys.readouterr().err


def test_the_exported_graph_is_cached_and_a_damaged_one_is_rebuilt(trained_run, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("PNEUMONIA_CNN_CACHE", str(tmp_path / "cache"))
    image = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0]
    first = Predictor(trained_run, "cpu", engine="onnx").predict_files([image])[0].probability
    cached = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(cached) == 1 and cached[0].stat().st_size > 1000
    from pneumonia_cnn.inference import engines
    export = engines.export_onnx_bytes
    with monkeypatch.context() as patched:  # the second predictor reads the cache: no export at all
        patched.setattr(engines, "export_onnx_bytes", lambda *a, **k: pytest.fail("exported again"))
        assert Predictor(trained_run, "cpu", engine="onnx").predict_files([image])[0].probability == first
    assert engines.export_onnx_bytes is export
    cached[0].write_bytes(b"not an onnx graph")
    assert Predictor(trained_run, "cpu", engine="onnx").predict_files([image])[0].probability == first
    assert cached[0].read_bytes() != b"not an onnx graph"  # rebuilt in place


def test_auto_falls_back_to_torch_when_onnx_runtime_is_unusable(trained_run, monkeypatch, caplog):
    from pneumonia_cnn.errors import PneumoniaCNNError
    from pneumonia_cnn.inference import engines
    monkeypatch.setattr(engines, "onnxruntime_available", lambda: True)  # found on disk...

    def broken(*args, **kwargs):  # ...but cannot be imported
        raise PneumoniaCNNError("--engine onnx needs onnxruntime")
    monkeypatch.setattr(engines.OnnxEngine, "__init__", broken)
    assert Predictor(trained_run, "cpu").scorer.engine.name == "torch"
    assert "scoring with the torch engine" in caplog.text
    with pytest.raises(PneumoniaCNNError, match="needs onnxruntime"):
        Predictor(trained_run, "cpu", engine="onnx")  # asked for by name: no silent substitute


def test_a_file_named_twice_is_read_once_and_wide_names_keep_the_table_aligned(trained_run, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)  # names shorter than the path column (a longer one is shown whole, its row wider)
    folder = Path("scans")
    folder.mkdir()
    sources = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:2]
    (folder / "a.jpeg").symlink_to(sources[0])
    (folder / "肺炎の画像.jpeg").symlink_to(sources[1])  # five wide characters: ten terminal columns
    a = str(folder / "a.jpeg")
    assert main(["predict", str(trained_run), a, a, str(folder), str(folder / "*.jpeg"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(Path(row["path"]).name for row in rows) == ["a.jpeg", "肺炎の画像.jpeg"]  # 6 names, 2 files
    assert Path(rows[0]["path"]).name == "a.jpeg"  # in the order first named
    assert main(["predict", str(trained_run), a, str(folder / "肺炎の画像.jpeg")]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    from pneumonia_cnn.predict_io import columns
    # the probability column ends at the same terminal column on every line (the header's "probability")
    ends = [columns(line[:line.index(f"{row['probability']:.4f}")]) + 6 for line, row in zip(lines, rows)]
    assert ends == [columns(header[:header.index("probability")]) + 11] * 2


def test_ctrl_c_while_onnx_runtime_initialises_stays_an_interrupt(monkeypatch):
    """SIGINT inside the extension's initialisation reaches Python as ImportError("initialization failed")
    caused by KeyboardInterrupt: read as "not installed", auto scored with torch and the command went on."""
    import importlib

    from pneumonia_cnn.errors import PneumoniaCNNError
    from pneumonia_cnn.inference.sessions import runtime

    def interrupted(name):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise ImportError("initialization failed") from interrupt
    monkeypatch.setattr(importlib, "import_module", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        runtime("onnx", "onnxruntime", "export")
    assert type(caught.value) is KeyboardInterrupt
    from pneumonia_cnn.signals import Terminated

    def terminated(name):  # SIGTERM there: a Terminated, so that the command ends by the signal (143)
        try:
            raise Terminated
        except Terminated as stop:
            raise ImportError("initialization failed") from stop
    monkeypatch.setattr(importlib, "import_module", terminated)
    with pytest.raises(Terminated):
        runtime("onnx", "onnxruntime", "export")
    monkeypatch.setattr(importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    with pytest.raises(PneumoniaCNNError, match=r"--engine onnx needs onnxruntime \(pip install"):
        runtime("onnx", "onnxruntime", "export")
