"""Found by a probe: ``predict`` scored from the cached ONNX graph without checking its bytes. One flipped exponent
bit in ``head.weight`` moved probabilities by up to 0.118 and changed a label; one in ``head.bias`` scored all 40
images 0.0 NORMAL, exit 0; a foreign graph written at the cache path (``export --out`` it) ended in an IndexError
traceback. The int8 cache was checked for its inputs and outputs only. Each cached graph now has a SHA-256 beside
it: a float32 graph that fails it is exported again (one warning), an int8 one refused in one line. The built-in
model, real X-rays, a cache folder of each test."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia_cnn import builtin
from pneumonia_cnn.inference import Predictor, engines, graph_cache, load_bundle
from pneumonia_cnn.inference.scorer import Scorer
from tests.conftest import SHARED_DATA, require_shared
from tests.test_cli_guards import run

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
EXAMPLES = sorted((Path(builtin.checkpoint_path()).parent / "examples").glob("*.jpeg"))
export = engines.export_onnx_bytes  # the real one, whatever a test patches
CHANGED = "its checksum does not match its bytes: changed since it was"


def flip_bit(path: Path, initializer: str, bit: int) -> None:
    """Flip bit ``bit`` of the first value of the named weight in the ONNX file at ``path``, in place: the file
    then differs from before in exactly that one bit."""
    before = path.read_bytes()
    graph = onnx.load_from_string(before)
    tensor = next(t for t in graph.graph.initializer if t.name == initializer)
    raw = bytearray(tensor.raw_data)
    raw[bit // 8] ^= 1 << (bit % 8)
    tensor.raw_data = bytes(raw)
    after = graph.SerializeToString()
    differing = np.unpackbits(np.frombuffer(before, np.uint8) ^ np.frombuffer(after, np.uint8)).sum()
    assert len(after) == len(before) and differing == 1
    path.write_bytes(after)


def not_used(path: Path, why: str) -> str:
    return f"{path}: the cached ONNX graph is not used ({why}); exported again"


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PNEUMONIA_CNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def scored():
    """The built-in model, 8 real test X-rays (4 per class) and their probabilities from a graph exported now,
    never cached (``cache=False``): what every cached run must give."""
    require_shared()
    bundle = load_bundle("builtin")
    files = [f for name in ("NORMAL", "PNEUMONIA") for f in sorted((SHARED_DATA / "test" / name).iterdir())[:4]]
    predictor = Predictor(bundle, "cpu", engine="torch")
    pixels = np.stack([predictor.preprocess_path(f)[0] for f in files])
    return bundle, pixels, Scorer(bundle, "cpu", "onnx", cache=False).score(pixels)


def cached_graph(cache: Path) -> Path:
    (path,) = (cache / "onnx").glob("*.onnx")
    return path


def test_a_flipped_bit_in_a_cached_float_graph_is_exported_again(cache, scored, caplog):
    bundle, pixels, uncached = scored
    np.testing.assert_allclose(Predictor(bundle, "cpu", engine="onnx").score(pixels).probabilities,
                               uncached.probabilities, atol=1e-6, rtol=0)
    path = cached_graph(cache)
    intact = path.read_bytes()
    flip_bit(path, "tapped.model.head.bias", 30)  # the top exponent bit of the head's one bias
    session = onnxruntime.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    damaged = session.run(None, {"image": (pixels / np.float32(255))[:, None].astype(np.float32)})[0]
    assert np.abs(damaged - uncached.members[0]).min() > 1e30  # what the cache would have scored unchecked
    with caplog.at_level(logging.WARNING):
        scores = Predictor(bundle, "cpu", engine="onnx").score(pixels)
    assert warnings_of(caplog) == [not_used(path, f"{CHANGED} cached")]
    np.testing.assert_allclose(scores.probabilities, uncached.probabilities, atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores.features[0], uncached.features[0], atol=1e-6, rtol=0)
    assert path.read_bytes() == intact and graph_cache.problem(path) is None  # re-cached whole, checksum and all


def predict_json(capsys, *argv) -> tuple[int, list, str]:
    """``predict`` of the built-in examples in this process: the exit status, (path, probability, label) of each
    image and stderr."""
    from pneumonia_cnn.cli import main
    status = main(["predict", *map(str, argv or EXAMPLES), "--format", "json", "--engine", "onnx", "--no-progress"])
    out, err = capsys.readouterr()
    return status, [(r["path"], r["probability"], r["label"]) for r in json.loads(out)] if status == 0 else [], err


@pytest.mark.parametrize("checksum", ["stale", "its own"])
def test_a_foreign_graph_at_the_cache_path_is_exported_again(cache, capsys, caplog, checksum):
    """``export --out`` the cache's own path writes a readable graph that gives ``probability, logit``; with a
    checksum of its own it passes that check, and its outputs are what tell it from the served graph."""
    status, first, _ = predict_json(capsys)  # an empty cache: exported now, as uncached
    path = cached_graph(cache)
    intact = path.read_bytes()
    assert status == 0 and run(capsys, "export", "--format", "onnx", "--out", path)[0] == 0
    assert path.read_bytes() != intact
    if checksum == "its own":
        graph_cache.store(path, path.read_bytes())
    with caplog.at_level(logging.WARNING):
        status, rows, err = predict_json(capsys)
    assert status == 0 and "Traceback" not in err and len(err.splitlines()) <= 1  # the warning, where it shows
    size = "image [batch, 1, 192, 192] float32"
    why = f"{CHANGED} cached" if checksum == "stale" else (f"not this model's graph: it takes {size} and gives "
                                                           f"probability, logit, where the model takes {size} and "
                                                           f"gives logit, tap0, tap1, tap2, tap3, tap4")
    assert warnings_of(caplog) == [not_used(path, why)]
    assert rows == first and path.read_bytes() == intact and graph_cache.problem(path) is None
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert predict_json(capsys)[:2] == (0, first) and warnings_of(caplog) == []  # the re-cached graph is used


@pytest.mark.parametrize("damage", ["missing", "no digest", "a folder"])
def test_a_graph_without_a_readable_checksum_is_exported_again(cache, scored, caplog, monkeypatch, damage):
    bundle, pixels, uncached = scored
    Predictor(bundle, "cpu", engine="onnx")
    path = cached_graph(cache)
    sidecar = graph_cache.checksum_path(path)
    sidecar.unlink()
    if damage == "no digest":
        sidecar.write_text("\n")
    elif damage == "a folder":
        sidecar.mkdir()
    exports = []
    monkeypatch.setattr(engines, "export_onnx_bytes", lambda *a: exports.append(a) or export(*a))
    with caplog.at_level(logging.WARNING):
        scores = Predictor(bundle, "cpu", engine="onnx").score(pixels)
    name = sidecar.name
    why = {"missing": f"no checksum beside it: {name} is missing, as for a graph written by an earlier version",
           "no digest": f"its checksum {name} holds no SHA-256 digest",
           "a folder": f"its checksum {name} is not a regular file: a folder"}[damage]
    assert warnings_of(caplog) == [not_used(path, why)] and len(exports) == 1
    np.testing.assert_allclose(scores.probabilities, uncached.probabilities, atol=1e-6, rtol=0)
    if damage != "a folder":  # a folder is not replaced by a file: the graph is exported each run, still scored
        assert graph_cache.problem(path) is None


def test_two_runs_filling_the_cache_at_once_raise_no_alarm(cache, scored, caplog, monkeypatch):
    """A second ``predict`` starts while the first is between writing the graph's checksum and the graph (the
    moment a reader could see one without the other): neither warns, both score as uncached."""
    bundle, pixels, uncached = scored
    write, started, second = graph_cache.write_text_atomic, [], []

    def checksum_then_another_run(path, text):
        write(path, text)
        if not started:  # the first run's checksum is written, its graph not yet
            started.append(path)
            assert not list((cache / "onnx").glob("*.onnx"))
            second.append(Predictor(bundle, "cpu", engine="onnx").score(pixels))
    monkeypatch.setattr(graph_cache, "write_text_atomic", checksum_then_another_run)
    with caplog.at_level(logging.WARNING):
        first = Predictor(bundle, "cpu", engine="onnx").score(pixels)
    assert warnings_of(caplog) == [] and len(second) == 1
    for scores in (first, second[0]):
        np.testing.assert_allclose(scores.probabilities, uncached.probabilities, atol=1e-6, rtol=0)
    assert graph_cache.problem(cached_graph(cache)) is None


# ------------------------------------------------------------------ the int8 cache: refused, never rebuilt here
def validation_subset(root: Path, per_class: dict) -> Path:
    for name, count in per_class.items():  # the first real validation images of each class
        (root / "val" / name).mkdir(parents=True)
        for source in sorted((SHARED_DATA / "val" / name).iterdir())[:count]:
            shutil.copyfile(source, root / "val" / name / source.name)
    return root


@pytest.fixture(scope="module")
def int8_built(tmp_path_factory):
    """The built-in weights in a checkpoint without validation fingerprints (as test_int8_cache does: its split
    cannot be checked, so a few images calibrate it, in seconds), its int8 graph built on 3 of them."""
    require_shared()
    folder = tmp_path_factory.mktemp("int8")
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=True)
    del checkpoint["reference"]["val"]["fingerprints"]
    torch.save(checkpoint, folder / "unchecked.pt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PNEUMONIA_CNN_CACHE", str(folder / "cache"))
        from pneumonia_cnn.cli import main
        assert main(["export", str(folder / "unchecked.pt"), "--format", "onnx-int8", "--data",
                     str(validation_subset(folder / "three", {"NORMAL": 2, "PNEUMONIA": 1})), "--out",
                     str(folder / "model.int8.onnx")]) == 0
    return folder


@pytest.fixture()
def int8_cache(int8_built, cache) -> Path:
    """A copy of the built int8 cache for this test; its graph's path."""
    shutil.copytree(int8_built / "cache" / "int8", cache / "int8")
    (path,) = (cache / "int8").glob("*.onnx")
    return path


def refusal(engine: str, path: Path, why: str) -> str:
    return (f"error: --engine {engine}: the cached int8 model {path} is damaged ({why}); build it again: "
            f"pneumonia-cnn export CHECKPOINT --format onnx-int8 --data ROOT --out model.int8.onnx (ROOT/val: the "
            f"checkpoint's validation images)")


@pytest.mark.parametrize("engine", ["onnx-int8", "openvino-int8"])
def test_a_flipped_bit_in_the_cached_int8_graph_is_one_line(int8_built, int8_cache, capsys, engine):
    if engine == "openvino-int8":
        pytest.importorskip("openvino")
    checkpoint = int8_built / "unchecked.pt"
    assert run(capsys, "predict", checkpoint, EXAMPLES[0], "--engine", engine)[0] == 0  # intact: used
    flip_bit(int8_cache, "tapped.model.head.weight_quantized", 6)
    status, error = run(capsys, "predict", checkpoint, EXAMPLES[0], "--engine", engine)
    assert (status, error) == (2, refusal(engine, int8_cache, f"{CHANGED} built"))


def test_a_cached_int8_graph_without_its_checksum_is_one_line(int8_built, int8_cache, capsys):
    graph_cache.checksum_path(int8_cache).unlink()
    status, error = run(capsys, "predict", int8_built / "unchecked.pt", EXAMPLES[0], "--engine", "onnx-int8")
    name = graph_cache.checksum_path(int8_cache).name
    assert (status, error) == (2, refusal("onnx-int8", int8_cache, f"no checksum beside it: {name} is missing, as "
                                                                    f"for a graph written by an earlier version"))


def test_the_build_the_refusal_names_replaces_a_damaged_int8_graph(int8_built, int8_cache, capsys, tmp_path):
    """The damaged graph says it was calibrated on 3 images, the new one on 2: an intact one would be kept (more
    images), a damaged one must not be, or the advice would never help."""
    from pneumonia_cnn.inference.quantize import calibration_count
    checkpoint = int8_built / "unchecked.pt"
    flip_bit(int8_cache, "tapped.model.head.weight_quantized", 6)
    assert calibration_count(int8_cache) == 3
    assert run(capsys, "export", checkpoint, "--format", "onnx-int8", "--data",
               validation_subset(tmp_path / "two", {"NORMAL": 1, "PNEUMONIA": 1}), "--out", tmp_path / "x.onnx")[0] == 0
    assert calibration_count(int8_cache) == 2 and graph_cache.problem(int8_cache) is None
    assert run(capsys, "predict", checkpoint, EXAMPLES[0], "--engine", "onnx-int8")[0] == 0
