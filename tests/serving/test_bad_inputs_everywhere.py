"""Every entry point (train, evaluate, predict, /predict) meets the bad-input corpus: one-line reasons naming the file, the rest goes on."""
import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from pneumonia_cnn.data.readers import read_image
from pneumonia_cnn.errors import ImageReadError
from tests.bad_inputs import XRAY_LIKE, write_corpus

GOOD = {"ok"}


def test_readers_on_the_corpus(tmp_path):
    cases = write_corpus(tmp_path / "corpus")
    for name, outcome in cases.items():
        path = tmp_path / "corpus" / name
        if outcome == "ok":
            gray, _ = read_image(path, (64, 64))
            assert gray.shape == (64, 64) and gray.dtype == np.uint8, name
        else:
            with pytest.raises(ImageReadError) as error:
                read_image(path, (64, 64))
            message = str(error.value)
            assert outcome in message and "\n" not in message, (name, message)


def test_readers_refuse_bombs_quickly(tmp_path):
    import time
    cases = write_corpus(tmp_path / "c")
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="20000x20000"):
        read_image(tmp_path / "c" / "huge_20000.png")
    assert time.perf_counter() - start < 1.0
    assert cases


def corpus_dataset(root, small_root):
    """The small real set plus the whole corpus inside train/NORMAL and test/PNEUMONIA."""
    import shutil
    shutil.copytree(small_root, root, symlinks=True)
    cases = write_corpus(root / "train" / "NORMAL")
    write_corpus(root / "test" / "PNEUMONIA", 255 - XRAY_LIKE)  # other images: none of test is in train or val
    return cases


def test_train_evaluate_predict_skip_bad_files(small_root, tmp_path):
    root = tmp_path / "data"
    cases = corpus_dataset(root, small_root)
    bad = [n for n, o in cases.items() if o != "ok"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, "-m", "pneumonia_cnn", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, env=env, timeout=600)
    trained = run("train", "--data", root, "--out", tmp_path / "run", "--epochs", "1", "--size", "48",
                  "--cache-dir", tmp_path / "cache", "--no-progress")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Traceback" not in trained.stderr
    for name in bad:
        assert any(name.split(".")[0] in line and "skipped" in line for line in trained.stderr.splitlines()), name
    evaluated = run("evaluate", "--checkpoint", tmp_path / "run", "--data", root, "--cache-dir", tmp_path / "cache",
                    "--format", "json", "--bootstrap", "20", "--no-figures")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads(evaluated.stdout)
    skipped = {os.path.basename(s["path"]) for s in report["skipped"]}
    assert {n for n in bad} <= skipped
    predicted = run("predict", tmp_path / "run", root / "test" / "PNEUMONIA", "--format", "json")
    assert predicted.returncode == 0 and "Traceback" not in predicted.stderr
    rows = {os.path.basename(r["path"]): r for r in json.loads(predicted.stdout)}
    for name, outcome in cases.items():
        key = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        row = rows[key]
        assert (row["error"] is None) == (outcome == "ok"), (name, row)


def test_server_on_the_corpus(server, tmp_path):
    url, _ = server
    cases = write_corpus(tmp_path / "corpus")
    for name, outcome in cases.items():
        path = tmp_path / "corpus" / name
        if name == "loop.jpeg":
            continue  # a client cannot upload a symlink loop
        response = httpx.post(f"{url}/predict", files={"file": ("upload.bin", path.read_bytes())}, timeout=30)
        if outcome == "ok":
            assert response.status_code == 200, (name, response.text)
        else:
            assert response.status_code == 400, (name, response.text)
            assert "upload.bin" in response.json()["detail"]
    assert httpx.get(f"{url}/health").status_code == 200
