"""The benchmark scripts still import against the package (docs/speed.md's one command is ``benchmarks/run.py``).

A refactor had renamed a class the training benchmark imported, and ``python benchmarks/run.py`` ended in an
ImportError while every test passed. The scripts are imported, not run, in a process of their own, with
``benchmarks/`` first on the path as their command lines have it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

IMPORT_EACH = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
failed = {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except BaseException as error:  # SystemExit too: a script that runs on import is a failure here
        failed[name] = f"{type(error).__name__}: {error}"
print(json.dumps(failed))
"""


def test_every_benchmark_script_imports():
    names = sorted(path.stem for path in BENCHMARKS.glob("*.py"))
    assert {"run", "training_speed", "inference_speed", "keras_peers", "time_to_accuracy"} <= set(names)
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, str(BENCHMARKS), *names],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


def test_the_keras_row_names_no_inference_ratio_when_inference_was_not_measured():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import report
    finally:
        sys.path.remove(str(BENCHMARKS))
    tutorial = {"training_images_per_s": 29.9, "predict_images_per_s": 142.4, "ratio_training_ours_to_keras": 2.9}
    (name, measured), = report._keras_rows({"keras": {"tutorial": tutorial}})  # `--only training,keras`
    assert measured == "train 29.9 img/s, predict 142.4 img/s; ours x2.90 in training"  # it printed "x0.00"
    tutorial["ratio_inference_onnx_to_keras"] = 1.25
    (name, measured), = report._keras_rows({"keras": {"tutorial": tutorial}})
    assert measured.endswith("ours x2.90 in training, onnx engine x1.25 in inference")


def test_the_benchmarks_int8_graph_is_one_the_int8_engine_accepts(trained_run, small_root, monkeypatch):
    """The benchmark builds the untrained model's int8 graph itself, into the engines' cache: it had written no
    checksum beside it, and every int8 row of ``benchmarks/run.py`` ended in "the cached int8 model ... is
    damaged (no checksum beside it ...)"."""
    import shutil

    import numpy as np

    from pneumonia_cnn.inference import Predictor
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import inference_speed
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.setenv("PNEUMONIA_CNN_CACHE", "restored-after-the-test")  # prepare_int8 points it at a new folder
    pixels = np.random.default_rng(0).integers(0, 256, (16, 64, 64), dtype=np.uint8)
    inference_speed.prepare_int8(trained_run / "best.pt", str(small_root), calibration=pixels)
    try:
        scored = Predictor(trained_run / "best.pt", "cpu", engine="onnx-int8").score(pixels[:4])
        assert np.isfinite(scored.raw).all() and len(scored.raw) == 4
    finally:
        shutil.rmtree(os.environ["PNEUMONIA_CNN_CACHE"], ignore_errors=True)
