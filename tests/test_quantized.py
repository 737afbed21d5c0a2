"""The int8 engines (``export --format onnx-int8``, then ``--engine onnx-int8`` or ``--engine openvino-int8``,
the same graph run by OpenVINO) against the float32 ONNX engine on the same served graph. Stated tolerance on
real X-rays (the small `best`-like run: flips at test time, OOD taps): raw scores within 0.25 (logit units), the
same label on at least 95% of the images, OOD features within 5% (relative norm) and the same OOD flag on at
least 90%; the README reports the figures on the shared test split.
"""
import logging

import numpy as np
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.data.cache import build_or_load
from pneumonia_cnn.data.dataset import load_split
from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.inference import Predictor

pytest.importorskip("onnxruntime")


@pytest.fixture()
def int8_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_CNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("engine", ["onnx-int8", "openvino-int8"])
def test_int8_engine_gives_the_float32_decisions(engine, best_like_run, small_root, int8_cache, tmp_path, capsys,
                                                 caplog):
    if engine == "openvino-int8":
        pytest.importorskip("openvino")
    out = tmp_path / "model.int8.onnx"
    assert main(["export", str(best_like_run), "--format", "onnx-int8", "--data", str(small_root),
                 "--out", str(out)]) == 0
    assert out.is_file() and "int8" in capsys.readouterr().out
    float32 = Predictor(best_like_run, "cpu", engine="onnx")
    with caplog.at_level(logging.WARNING):
        int8 = Predictor(best_like_run, "cpu", engine=engine)
    assert "int8" in caplog.text  # the run says so: its decision was fitted on float32 scores
    assert int8.scorer.description["precision"] == "int8" and int8.scorer.description["engine"] == engine
    test = load_split(small_root, "test")
    pixels = np.asarray(build_or_load(test, float32.size, intensity="equalize").images)
    reference, quantised = float32.score(pixels), int8.score(pixels)
    assert np.abs(reference.raw - quantised.raw).max() <= 0.25
    threshold = float32.threshold
    assert np.mean((reference.probabilities >= threshold) == (quantised.probabilities >= threshold)) >= 0.95
    for ref, got in zip(reference.features, quantised.features):
        assert np.linalg.norm(ref - got) / np.linalg.norm(ref) <= 0.05
    flags = [float32.ood.flagged(float32.ood.score(s.features, s.raw, pixels)) for s in (reference, quantised)]
    assert np.mean(flags[0] == flags[1]) >= 0.9


def test_int8_needs_the_checkpoints_own_validation_images(best_like_run, small_root, int8_cache, tmp_path, capsys):
    with pytest.raises(PneumoniaCNNError, match="no int8 model"):
        Predictor(best_like_run, "cpu", engine="onnx-int8")
    with pytest.raises(PneumoniaCNNError, match="openvino-int8: no int8 model|needs openvino"):
        Predictor(best_like_run, "cpu", engine="openvino-int8")
    other = tmp_path / "other"
    (other / "val" / "NORMAL").mkdir(parents=True)
    (other / "val" / "PNEUMONIA").mkdir(parents=True)
    for name in ("NORMAL", "PNEUMONIA"):
        source = sorted((small_root / "test" / name).iterdir())[0]
        (other / "val" / name / source.name).symlink_to(source.resolve())
    assert main(["export", str(best_like_run), "--format", "onnx-int8", "--data", str(other),
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not the validation images this checkpoint's decision was fitted on" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
