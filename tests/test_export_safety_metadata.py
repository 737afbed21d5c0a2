"""Found by a probe of ``export`` (2026-11-28): the exported ONNX and TorchScript files said nothing of the intended
use or population, nor that they are no medical device, nor that the graph computes no out-of-distribution flag
(an adult's X-ray got a probability and no word), which pneumonia-cnn's own commands give with the checkpoint; and
a checkpoint whose decision was never fitted (a run's last.pt, an imported Keras model: threshold 0.5, no
calibration) was exported without a word, its 0.5 taken for a fitted threshold. The built-in model, a tiny real
run, the Keras fixture; the command in a child process where its stderr is the subject."""
import json
import os
import subprocess
import sys

import onnxruntime
import pytest
import torch

from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.interop.export import int8_metadata
from tests.conftest import KERAS_FIXTURES, PROJECT
from tests.test_cli_guards import run

CHECKS = "not an X-ray, too small, a DICOM of another body part, view or modality, an age outside the intended range"
NOT_A_DEVICE = "not a medical device: for research and education; never the sole basis of a clinical decision"
SAFETY_KEYS = ("intended_use", "medical_device", "out_of_distribution", "decision_fitted_on")


def cli(*argv) -> subprocess.CompletedProcess:
    """``pneumonia-cnn`` in a child process of this project's source: its stderr as a user sees it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT / "src"),
                                                                     os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "pneumonia_cnn", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=600)


def onnx_metadata(path) -> dict:
    """The metadata as an integrator's runtime reads it (ONNX Runtime's custom metadata), JSON values parsed."""
    props = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    return {key: json.loads(value) if key == "intended_use" else value
            for key, value in props.custom_metadata_map.items()}


def torchscript_metadata(path) -> dict:
    files = {"metadata.json": ""}
    torch.jit.load(str(path), _extra_files=files)
    return json.loads(files["metadata.json"])


def flagged_without(population: str, run_id: str, detector: bool) -> str:
    by = (f"its out-of-distribution detector and the input checks ({CHECKS})" if detector else
          f"the input checks alone ({CHECKS}); this checkpoint has no fitted out-of-distribution detector")
    return (f"not computed: this graph gives a probability for every image and no out-of-distribution flag, so an "
            f"image outside the intended population ({population}), such as an adult's X-ray, another view or "
            f"modality, or no X-ray at all, gets a probability without a warning; pneumonia-cnn's own commands "
            f"(predict, serve) with the checkpoint it was exported from (run {run_id}) flag such images, by {by}")


def test_the_builtin_exports_state_the_intended_use_and_that_they_flag_nothing(tmp_path):
    builtin = load_checkpoint("builtin")
    onnx_out, script_out = tmp_path / "m.onnx", tmp_path / "m.pt"
    for fmt, out in (("onnx", onnx_out), ("torchscript", script_out)):
        done = cli("export", "builtin", "--format", fmt, "--out", out)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr  # a fitted decision: no warning
    metadata = onnx_metadata(onnx_out)
    use = builtin["intended_use"]
    assert metadata["intended_use"] == {"task": use["task"], "population": use["population"],
                                        "age_range_years": [1.0, 5.0],
                                        "trained_on": {"images": 4137, "input_size": [192, 192]}}  # no path
    assert metadata["medical_device"] == NOT_A_DEVICE
    assert metadata["out_of_distribution"] == flagged_without("children 1–5 years, one hospital", builtin["run_id"],
                                                              detector=True)
    assert metadata["decision_fitted_on"] == "559 val images"
    script = torchscript_metadata(script_out)  # the same, as JSON through and through
    assert {key: script[key] for key in SAFETY_KEYS} == {key: metadata[key] for key in SAFETY_KEYS}
    int8 = int8_metadata(builtin)  # the int8 graph's metadata: the same words (its taps are not the flag)
    assert {key: int8[key] for key in SAFETY_KEYS} == {
        key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()
        if key in SAFETY_KEYS}


def test_exporting_a_runs_last_pt_warns_that_the_graph_carries_no_fitted_decision(trained_run, tmp_path, capsys,
                                                                                  caplog):
    last, best = trained_run / "last.pt", trained_run / "best.pt"
    done = cli("export", last, "--out", tmp_path / "last.onnx")
    assert done.returncode == 0 and done.stdout == f"written: {tmp_path / 'last.onnx'}\n"
    assert done.stderr == (f"warning: {last}: no fitted decision (threshold 0.5, no calibration: saved before its "
                           f"run's end-of-run steps fitted one), so the exported graph carries none; export the run's "
                           f"best.pt after its training has finished (pneumonia-cnn train --resume RUN finishes a "
                           f"stopped run)\n")
    metadata = onnx_metadata(tmp_path / "last.onnx")
    assert metadata["decision_fitted_on"] == "none: threshold 0.5, no calibration, fitted on no images"
    done = cli("export", best, "--format", "torchscript", "--out", tmp_path / "best.pt")
    assert (done.returncode, done.stderr) == (0, "")
    assert torchscript_metadata(tmp_path / "best.pt")["decision_fitted_on"].endswith(" val images")
    # the int8 export warns before its work (here refused: no validation images in the folder given)
    (tmp_path / "empty").mkdir()
    status, _ = run(capsys, "export", last, "--format", "onnx-int8", "--data", tmp_path / "empty",
                    "--out", tmp_path / "last.int8.onnx")
    assert status == 2 and f"warning: {last}: no fitted decision (threshold 0.5, no calibration" in caplog.text


def test_an_imported_keras_model_exports_with_its_own_words_and_the_way_to_fit_a_decision(tmp_path, capsys):
    source = KERAS_FIXTURES / "seed_cnn_64x64.h5"
    if not source.is_file():
        pytest.skip(f"Keras fixtures absent: {source}")
    imported = tmp_path / "keras.pt"
    assert run(capsys, "import-keras", source, "--out", imported)[0] == 0
    done = cli("export", imported, "--format", "torchscript", "--out", tmp_path / "keras.ts")
    assert done.returncode == 0
    assert done.stderr == (f"warning: {imported}: no fitted decision (threshold 0.5, no calibration: an imported "
                           f"model's, never fitted here), so the exported graph carries none; fit one on labelled "
                           f"validation images first (pneumonia-cnn evaluate --checkpoint {imported} --data ROOT "
                           f"--threshold youden --calibration platt --save-as fitted.pt) and export fitted.pt\n")
    metadata = torchscript_metadata(tmp_path / "keras.ts")
    population = load_checkpoint(imported)["intended_use"]["population"]
    assert metadata["out_of_distribution"] == flagged_without(population, "keras-seed_cnn_64x64.h5", detector=False)
    assert metadata["intended_use"]["trained_on"]["data"] == "not recorded: trained elsewhere, in Keras"
    assert metadata["medical_device"] == NOT_A_DEVICE
    assert metadata["decision_fitted_on"] == "none: threshold 0.5, no calibration, fitted on no images"


def test_a_fitted_decision_without_its_record_is_not_called_unfitted(tmp_path):
    """A checkpoint of an earlier version (or an adapted one) has a fitted policy and calibration but no
    ``decision_fit`` record: it was warned about as never fitted, its metadata said "fitted on no images"."""
    from pneumonia_cnn.checkpoint import save_checkpoint
    checkpoint = load_checkpoint("builtin")
    for key in ("decision_fit", "path"):
        checkpoint.pop(key, None)
    save_checkpoint(checkpoint, tmp_path / "old.pt")
    done = cli("export", tmp_path / "old.pt", "--out", tmp_path / "old.onnx")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert onnx_metadata(tmp_path / "old.onnx")["decision_fitted_on"] == (
        f"not recorded: threshold {checkpoint['threshold']:g}, platt calibration by the policy sensitivity:0.95, "
        f"fitted on images this checkpoint does not name")


@pytest.mark.parametrize("form, suffix", [("onnx", ".onnx"), ("torchscript", ".ts")])
def test_an_output_name_that_is_not_utf8_is_written_and_named_in_one_line(tmp_path, form, suffix):
    """torch's and ONNX's writers take only text that encodes as UTF-8: the temporary file beside such a name
    had carried its byte, and export ended in a 4,000-line traceback."""
    folder = os.fsencode(tmp_path)
    out = folder + b"/a\xff" + suffix.encode()
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "export", "--format", form, "--out", out],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == f"written: {tmp_path}/a\\xff{suffix}\n", done.stderr[-2000:]
    assert os.listdir(folder) == [b"a\xff" + suffix.encode()] and os.path.getsize(out) > 1_000_000
    inside = folder + b"/d\xff/model" + suffix.encode()  # a folder of such a name: the temporary path holds it too
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "export", "--format", form, "--out", inside],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == f"written: {tmp_path}/d\\xff/model{suffix}\n", done.stderr[-2000:]
    assert os.listdir(folder + b"/d\xff") == [b"model" + suffix.encode()]
