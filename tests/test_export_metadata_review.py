"""Found by a review of the decision path (2026-11-28): the int8 export (``export --format onnx-int8``) carried
only the quantiser's metadata (no threshold, calibration, class names or preprocessing, which the float ONNX
export carries); a run trained with ``--limit-images`` could not be quantised on its data folder ("stored
fingerprints differ", though its ``val/`` held all of the run's validation images and more); and TorchScript's
``metadata.json`` is pinned as JSON through and through (``calibration`` an object). The built-in model and the
shared validation split."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia_cnn import builtin
from tests.conftest import SHARED_DATA, require_shared
from tests.test_cli_guards import run

pytest.importorskip("onnxruntime")
EXAMPLES = Path(builtin.checkpoint_path()).parent / "examples"


@pytest.fixture()
def private_int8_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_CNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def props(path) -> dict[str, str]:
    import onnx
    return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}


def example_input() -> np.ndarray:
    """The four packaged examples as the built-in model's served graph takes them: gray (4, 1, 192, 192)."""
    from pneumonia_cnn.inference import Predictor
    predictor = Predictor("builtin", "cpu", engine="torch")
    pixels = np.stack([predictor.preprocess_path(path)[0] for path in sorted(EXAMPLES.glob("*.jpeg"))])
    return (pixels.astype(np.float32) / np.float32(255.0))[:, None]


def test_the_int8_export_carries_the_float_exports_metadata_and_the_cache_stays_as_it_was(
        capsys, tmp_path, private_int8_cache):
    import onnx
    import onnxruntime

    from pneumonia_cnn.inference.quantize import calibration_record
    require_shared()
    float_out, int8_out = tmp_path / "float.onnx", tmp_path / "model.int8.onnx"
    assert run(capsys, "export", "builtin", "--format", "onnx", "--out", float_out)[0] == 0
    assert run(capsys, "export", "builtin", "--format", "onnx-int8", "--data", SHARED_DATA, "--out", int8_out)[0] == 0
    floats, int8s = props(float_out), props(int8_out)
    # every key of the float export, with its value; the output alone differs: the int8 graph is the served one
    assert {key: int8s[key] for key in floats if key != "output"} == {k: v for k, v in floats.items() if k != "output"}
    assert json.loads(int8s["calibration"])["method"] == "platt" and float(int8s["threshold"]) == pytest.approx(0.931,
                                                                                                               abs=1e-3)
    assert int8s["output"].startswith("logit: the raw score of class_names[1] (PNEUMONIA)")
    assert (int8s["calibration_images"], int8s["calibration_checked"]) == ("553", "1")
    # the cache is keyed by the weights alone: it keeps the bare graph (no decision), the same graph as --out's
    cached = next((private_int8_cache / "int8").glob("*.onnx"))
    assert "threshold" not in props(cached) and calibration_record(cached) == (553, True)
    assert onnx.load(str(cached)).graph == onnx.load(str(int8_out)).graph
    images = example_input()
    exported = onnxruntime.InferenceSession(str(int8_out)).run(None, {"image": images})
    bare = onnxruntime.InferenceSession(str(cached)).run(None, {"image": images})
    assert [name.name for name in onnxruntime.InferenceSession(str(int8_out)).get_outputs()][0] == "logit"
    for got, expected in zip(exported, bare):
        np.testing.assert_array_equal(got, expected)
    labels = 1 / (1 + np.exp(-(exported[0] * json.loads(int8s["calibration"])["scale"]
                               + json.loads(int8s["calibration"])["bias"]))) >= float(int8s["threshold"])
    assert labels.tolist() == [False, False, True, True]  # NORMAL, NORMAL, PNEUMONIA, PNEUMONIA: as the metadata says


def test_the_int8_metadata_states_its_one_gray_channel_for_a_three_channel_checkpoint():
    from pneumonia_cnn.checkpoint import load_checkpoint
    from pneumonia_cnn.interop.export import export_metadata, int8_metadata
    checkpoint = load_checkpoint("builtin")
    checkpoint["preprocessing"] = dict(checkpoint["preprocessing"], channels=3)
    assert export_metadata(checkpoint)["channels"] == 3
    assert export_metadata(checkpoint)["preprocessing_steps"].endswith("shape (batch, 3, 192, 192)")
    int8 = int8_metadata(checkpoint)
    assert int8["channels"] == "1" and int8["preprocessing_steps"].endswith("shape (batch, 1, 192, 192)")


def test_torchscript_metadata_is_json_with_the_calibration_an_object(capsys, tmp_path):
    from pneumonia_cnn.calibration import Calibration
    out = tmp_path / "model.pt"
    assert run(capsys, "export", "builtin", "--format", "torchscript", "--out", out)[0] == 0
    files = {"metadata.json": ""}
    torch.jit.load(str(out), _extra_files=files)
    metadata = json.loads(files["metadata.json"])
    calibration = metadata["calibration"]
    assert isinstance(calibration, dict) and Calibration.from_dict(calibration).method == "platt"
    assert isinstance(metadata["class_names"], list) and isinstance(metadata["input_size"], list)
    assert isinstance(metadata["threshold"], float) and isinstance(metadata["channels"], int)
    # the comparison with the threshold, which an integrator had to guess (a probability equal to it is PNEUMONIA)
    assert metadata["label_rule"] == "PNEUMONIA when probability >= threshold, else the first class"


def limited_run_checkpoint(tmp_path: Path, count: int) -> tuple[Path, list[str]]:
    """The built-in model as a run trained with --limit-images stores it: ``count`` of the split's images."""
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=True)
    drawn = list(dict.fromkeys(checkpoint["reference"]["val"]["fingerprints"]))[::3][:count]  # of both classes
    checkpoint["reference"] = {"val": {"fingerprints": drawn}}
    torch.save(checkpoint, tmp_path / "limited.pt")
    return tmp_path / "limited.pt", drawn


def test_a_limited_runs_images_are_taken_from_the_whole_split(capsys, caplog, tmp_path, private_int8_cache):
    from pneumonia_cnn.data.fingerprint import file_fingerprint
    from pneumonia_cnn.inference.quantize import calibration_record, validation_pixels
    require_shared()
    checkpoint, drawn = limited_run_checkpoint(tmp_path, 150)
    status, error = run(capsys, "export", checkpoint, "--format", "onnx-int8", "--data", SHARED_DATA,
                        "--out", tmp_path / "x.int8.onnx")
    assert status == 0, error
    warned = (f"{SHARED_DATA / 'val'}: calibrating on the 150 validation images of this checkpoint found there (all "
              f"it stores); the 403 other images there are not among them and are left out")
    assert warned in caplog.text
    assert calibration_record(tmp_path / "x.int8.onnx") == (150, True)
    # calibrated on the run's images alone (150 distinct, as files: duplicates of one X-ray count once above)
    pixels, count, checked = validation_pixels(torch.load(checkpoint, weights_only=True), SHARED_DATA)
    files = [path for path in (SHARED_DATA / "val").rglob("*.jpeg") if file_fingerprint(path) in drawn]
    assert (len(pixels), count, checked) == (len(files), 150, True) and len(files) < 200
    # a part of the run's images beside others: refused, saying both counts
    part = tmp_path / "part"
    for name in ("NORMAL", "PNEUMONIA"):
        (part / "val" / name).mkdir(parents=True)
        files = sorted((SHARED_DATA / "val" / name).iterdir())
        own = next(f for f in files if file_fingerprint(f) in drawn)
        other = next(f for f in files if file_fingerprint(f) not in drawn)
        for source in (own, other):
            shutil.copyfile(source, part / "val" / name / source.name)
    status, error = run(capsys, "export", checkpoint, "--format", "onnx-int8", "--data", part,
                        "--out", tmp_path / "y.int8.onnx")
    assert (status, error) == (2, f"error: {part / 'val'}: holds 2 of the 150 validation images this checkpoint's "
                                  f"decision was fitted on (and 2 other images, not used); calibrate on the run's "
                                  f"own validation split (at least 100 of its images, all when it has fewer)")
    for path in (part / "val").rglob("*.jpeg"):  # none of the run's images
        if file_fingerprint(path) in drawn:
            path.unlink()
    status, error = run(capsys, "export", checkpoint, "--format", "onnx-int8", "--data", part,
                        "--out", tmp_path / "y.int8.onnx")
    assert (status, error) == (2, f"error: {part / 'val'}: not the validation images this checkpoint's decision was "
                                  f"fitted on (none of its 2 distinct images is among the 150 it stores); calibrate "
                                  f"on the run's own validation split")
    assert not (tmp_path / "y.int8.onnx").exists()
