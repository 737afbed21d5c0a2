"""The int8 engines (``export --format onnx-int8``, then ``--engine onnx-int8`` or ``--engine openvino-int8``,
the same graph run by OpenVINO) against the float32 ONNX engine on the same served graph. Stated tolerance on
real X-rays (the small `best`-like run: flips at test time, OOD taps): raw scores within 0.25 (logit units), the
same label on at least 95% of the images, OOD features within 5% (relative norm) and the same OOD flag on at
least 90%; the README reports the figures on the shared test split.
"""
import logging
import warnings

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


def test_relu_before_max_pool_is_the_same_function(tmp_path):
    """The rewrite moves a ReLU that is a max-pool's only reader in front of the pool, and leaves a pool whose
    output something else also reads (another node, or the caller: a graph output) as it is."""
    import onnxruntime
    import torch

    from pneumonia_cnn.inference.quantize import relu_before_max_pool

    class PoolThenRelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.conv3 = (torch.nn.Conv2d(1, 4, 3), torch.nn.Conv2d(4, 4, 3),
                                                  torch.nn.Conv2d(4, 4, 3))

        def forward(self, x):
            x = torch.relu(torch.max_pool2d(self.conv1(x), 2))
            pooled, kept = torch.max_pool2d(self.conv2(x), 2), torch.max_pool2d(self.conv3(x), 2)
            return torch.relu(pooled), pooled * 2, torch.relu(kept), kept

    torch.manual_seed(0)
    path = tmp_path / "pool.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation, as in the library's export
        torch.onnx.export(PoolThenRelu().eval(), (torch.rand(2, 1, 20, 20),), str(path), dynamo=False,
                          input_names=["image"])
    images = np.random.default_rng(0).random((2, 1, 20, 20), dtype=np.float32)
    before = onnxruntime.InferenceSession(str(path)).run(None, {"image": images})
    assert relu_before_max_pool(path) == 1
    import onnx
    operators = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert operators == ["Conv", "Relu", "MaxPool", "Conv", "MaxPool", "Conv", "MaxPool", "Relu", "Constant", "Mul",
                         "Relu"]
    after = onnxruntime.InferenceSession(str(path)).run(None, {"image": images})
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert (before[1] < 0).any() and (before[3] < 0).any()  # the pools' own outputs kept their negative values


def test_seed_model_int8_pools_uint8_values(trained_run, small_root, int8_cache, tmp_path):
    """The seed model (a ReLU after each max-pool) quantised: ONNX Runtime pools its uint8 values in NHWC
    between the int8 convolutions, with no dequantisation before the dense layers, and its decisions are the
    float32 engine's within the tolerance stated above."""
    import onnx
    import onnxruntime

    from pneumonia_cnn.inference.quantized import KEEP_FLOAT_STEM
    assert main(["export", str(trained_run), "--format", "onnx-int8", "--data", str(small_root),
                 "--out", str(tmp_path / "seed.int8.onnx")]) == 0
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    onnxruntime.InferenceSession(str(tmp_path / "seed.int8.onnx"), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=KEEP_FLOAT_STEM)
    operators = [node.op_type for node in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert operators.count("NhwcMaxPool") == 2 and "QGemm" in operators
    assert operators.index("DequantizeLinear") > operators.index("QGemm")
    float32, int8 = Predictor(trained_run, "cpu", engine="onnx"), Predictor(trained_run, "cpu", engine="onnx-int8")
    pixels = np.asarray(build_or_load(load_split(small_root, "test"), float32.size).images)
    reference, quantised = float32.score(pixels), int8.score(pixels)
    assert np.abs(reference.raw - quantised.raw).max() <= 0.25
    labels = [s.probabilities >= float32.threshold for s in (reference, quantised)]
    assert np.mean(labels[0] == labels[1]) >= 0.95
    # the taps on the image stay float32 (quantize.tap_only_nodes): the int8 graph's are the float graph's
    taps = float32.bundle.taps
    assert sum(module == "input" for module, _ in taps) == 4
    for tap, ref, got in zip(taps, reference.features, quantised.features):
        if tap[0] == "input":
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=str(tap))
