import json

import numpy as np
import onnx
import onnxruntime
import torch

from pneumonia_cnn.cli import main
from pneumonia_cnn.inference import Predictor


def test_onnx_matches_pytorch_with_dynamic_batch(trained_run, tmp_path):
    out = tmp_path / "model.onnx"
    assert main(["export", str(trained_run / "best.pt"), "--format", "onnx", "--out", str(out)]) == 0
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(metadata["input_size"]) == [64, 64] and json.loads(metadata["class_names"])[1] == "PNEUMONIA"
    assert "threshold" in metadata and "normalisation" in metadata
    predictor = Predictor(trained_run / "best.pt", "cpu", engine="torch")  # PyTorch itself, not ONNX Runtime
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        pixels = rng.integers(0, 256, (batch, 64, 64), dtype=np.uint8)
        expected = predictor.probabilities_from_pixels(pixels)
        x = np.repeat(pixels[:, None].astype(np.float32) / 255.0, 3, axis=1)
        got = session.run(["probability"], {"image": x})[0]
        assert got.shape == (batch,) and np.abs(got - expected).max() < 1e-4


def test_torchscript_matches_pytorch(trained_run, tmp_path):
    out = tmp_path / "model.pt"
    assert main(["export", str(trained_run), "--format", "torchscript", "--out", str(out)]) == 0
    files = {"metadata.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=files)
    assert json.loads(files["metadata.json"])["channels"] == 3
    pixels = np.random.default_rng(1).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    expected = Predictor(trained_run, "cpu", engine="torch").probabilities_from_pixels(pixels)
    with torch.no_grad():
        probability, logit = scripted(torch.from_numpy(pixels[:, None].astype(np.float32) / 255.0)
                                      .expand(-1, 3, -1, -1))
    got = probability.numpy()
    assert np.abs(got - expected).max() < 1e-5


def test_onnx_engine_gives_the_torch_probabilities(trained_run):
    pixels = np.random.default_rng(5).integers(0, 256, (7, 64, 64), dtype=np.uint8)
    torch_engine = Predictor(trained_run / "best.pt", "cpu", engine="torch").probabilities_from_pixels(pixels)
    onnx_engine = Predictor(trained_run / "best.pt", "cpu", engine="onnx").probabilities_from_pixels(pixels)
    assert np.abs(torch_engine - onnx_engine).max() < 1e-4


def test_the_metadata_names_each_input_step_exactly_enough_to_redo_it(tmp_path):
    """The export named the intensity step ("equalize") but not its implementation; Pillow's ImageOps.equalize
    moves the built-in model's probabilities by up to 0.04. Following the stated steps by hand gives the pixels the
    package feeds the graph, bit for bit."""
    from PIL import Image
    from skimage import exposure

    from tests.conftest import SHARED_DATA, require_shared
    require_shared()
    out = tmp_path / "builtin.onnx"
    assert main(["export", "--out", str(out)]) == 0
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    steps = metadata["preprocessing_steps"]  # a string, stored as it is
    assert "resize to 192x192 (width x height) with Pillow Image.resize(bilinear)" in steps
    assert "intensity 'equalize': scikit-image exposure.equalize_hist(gray_uint8, nbins=256), then round(x * 255) " \
           "clipped to uint8" in steps
    image = sorted((SHARED_DATA / "test" / "NORMAL").glob("*.jpeg"))[0]
    gray = Image.open(image).convert("L").resize((192, 192), Image.BILINEAR)
    by_hand = np.clip(np.round(exposure.equalize_hist(np.asarray(gray), nbins=256) * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(by_hand, Predictor("builtin", "cpu").preprocess_path(image)[0])
