"""Found by a hostile probe (2026-11-28): checkpoints that could not be written (a full disk: a 35-line
traceback of torch's "unexpected pos"), read (a plain pickle: torch's warning, then its message cut mid-word) or
used (NaN where a number was needed, control characters where text was printed, weights that predict refused
but info described), a cached int8 graph of another model, and reasons that named the wrong cause ("checkpoint
not found" for a FIFO; "adapted to a site" for a last.pt). Each is one line naming the file and the reason."""
import math
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pneumonia_cnn import builtin
from pneumonia_cnn.checkpoint import load_checkpoint, save_checkpoint
from pneumonia_cnn.errors import CheckpointError
from pneumonia_cnn.inference.bundle import load_bundle
from tests.test_checkpoint_robustness import _one_line_error, _set, builtin_payload
from tests.test_cli import run_cli

EXAMPLE = builtin.example_paths()[0]


def saved(tmp_path, mutate, name="odd.pt") -> Path:
    payload = builtin_payload()
    mutate(payload)
    torch.save(payload, tmp_path / name)
    return tmp_path / name


# ------------------------------------------------------------------ 1. a checkpoint that cannot be written
WRITE_UNDER_A_FILE_SIZE_LIMIT = r"""
import resource, signal, sys, torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG, as a full disk's with ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from pneumonia_cnn import builtin
from pneumonia_cnn.checkpoint import save_checkpoint
try:
    save_checkpoint(torch.load(builtin.checkpoint_path(), weights_only=True), sys.argv[1])
except Exception as error:
    print(f"{type(error).__name__}: {error}")
"""


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="RLIMIT_FSIZE is POSIX")
def test_a_checkpoint_the_system_refuses_to_write_is_one_line_and_leaves_no_temporary_file(tmp_path):
    """A real failed write, no root needed: past RLIMIT_FSIZE the system refuses it (EFBIG) as a full disk does
    (ENOSPC). torch's own writer reported either as RuntimeError "[enforce fail at inline_container.cc:672] .
    unexpected pos 6720 vs 6614", without the reason."""
    out = tmp_path / "out" / "model.pt"
    result = subprocess.run([sys.executable, "-c", WRITE_UNDER_A_FILE_SIZE_LIMIT, str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.stdout.strip() == f"CheckpointError: {out}: File too large", result.stdout + result.stderr
    assert not list(out.parent.iterdir())  # the temporary file removed, no half checkpoint


@pytest.fixture()
def full_disk(tmp_path):
    """A 64 KiB tmpfs, filled, where mounting one is allowed (root); unmounted afterwards."""
    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root); the RLIMIT_FSIZE test covers the write")
    try:
        (folder / "filler").write_bytes(b"\0" * 60000)
        yield folder
    finally:  # lazily where a file is still open in it (torch's writer, before the fix, kept one)
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_one_line_naming_the_checkpoint(full_disk, small_root, tmp_path, capsys):
    from tests.test_cli_guards import run
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(builtin_payload(), full_disk / "model.pt")
    assert str(caught.value) == f"{full_disk / 'model.pt'}: No space left on device"
    status, error = run(capsys, "evaluate", "--data", small_root, "--threshold", "youden", "--save-as",
                        full_disk / "s.pt", "--out", tmp_path / "m.json", "--bootstrap", "10", "--no-figures",
                        "--no-progress")
    assert (status, error) == (2, f"error: {full_disk / 's.pt'}: No space left on device")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_torchs_writer_error_without_a_reason_is_judged_while_its_file_takes_the_space(full_disk, monkeypatch):
    """torch's writer may fail with only "unexpected pos" and no OSError; the free space then says whether the
    disk was full. It was read after the temporary file had been removed, when the space was free again."""
    def fills_the_disk_then_fails(payload, handle):
        while os.statvfs(full_disk).f_bavail:  # the rest of the tmpfs, block by block
            handle.write(b"\0" * 4096)
            handle.flush()
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6720 vs 6614")
    monkeypatch.setattr(torch, "save", fills_the_disk_then_fails)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(builtin_payload(), full_disk / "model.pt")
    assert str(caught.value) == f"{full_disk / 'model.pt'}: No space left on device"
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_checkpoints_written_through_a_file_still_load(tmp_path):
    save_checkpoint(builtin_payload(), tmp_path / "copy.pt")
    assert load_bundle(tmp_path / "copy.pt").models


# ------------------------------------------------------------------ 2. a plain pickle
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_plain_pickle_is_one_line_without_torchs_warning(tmp_path, protocol):
    path = tmp_path / "foreign.pkl.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=protocol))
    expected = f"{path}: not a readable checkpoint (not a PyTorch file: a pickle without torch's magic number)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected pickle protocol 4 in the checkpoint ..." was a second line
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
    assert str(caught.value) == expected
    _one_line_error(run_cli("info", path), expected)
    _one_line_error(run_cli("predict", path, EXAMPLE), expected)


def test_files_of_torchs_legacy_format_are_still_read(tmp_path):
    torch.save(builtin_payload(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert load_checkpoint(tmp_path / "legacy.pt")["model"]["name"] == "resnet18_narrow"


# ------------------------------------------------------------------ 3. fields that load but cannot be used
def _component(index: int, name: str, value):
    return lambda p: p["ood"]["components"][index].__setitem__(name, value)


def _nan_in(index: int, name: str):
    def mutate(payload):
        values = payload["ood"]["components"][index][name].clone()
        values.view(-1)[0] = math.nan
        payload["ood"]["components"][index][name] = values
    return mutate


FINITE = "must hold finite numbers only, not NaN, infinite or other values"
UNUSABLE = [
    ("ood_threshold_nan", _set("ood.threshold", math.nan), "ood.threshold must be a finite number, not nan"),
    ("ood_threshold_inf", _set("ood.threshold", math.inf), "ood.threshold must be a finite number, not inf"),
    ("ood_threshold_text", _set("ood.threshold", "high"), "ood.threshold must be a finite number, not 'high'"),
    ("ood_quantile_one", _set("ood.quantile", 1.0), "ood.quantile must be a rate strictly between 0 and 1, not 1.0"),
    ("ood_calibration_nan", _nan_in(0, "calibration"), f"ood.components[0].calibration {FINITE}"),
    ("ood_reference_nan", _nan_in(1, "reference"), f"ood.components[1].reference {FINITE}"),
    ("ood_calibration_empty", _component(2, "calibration", torch.zeros(0, dtype=torch.float64)),
     "ood.components[2].calibration must hold at least one value"),
    ("ood_tap_past_taps", _component(0, "tap", 7), "ood.components[0].tap must be the index of one of its 5 taps, "
                                                   "not 7"),
    ("prior_zero", _set("calibration.prior", 0.0),
     "calibration.prior must be a rate strictly between 0 and 1, not 0.0"),
    ("prior_one", _set("calibration.prior", 1.0),
     "calibration.prior must be a rate strictly between 0 and 1, not 1.0"),
    ("scale_zero", _set("calibration.scale", 0.0), "calibration.scale must be positive, not 0.0"),
    ("adapted_prior", lambda p: p.__setitem__("decision_adapted", {"threshold": 0.5, "calibration": {
        "method": "platt", "scale": 1.0, "bias": 0.0, "prior": 0.0}}),
     "decision_adapted.calibration.prior must be a rate strictly between 0 and 1, not 0.0"),
    ("raw_scores_nan", lambda p: p["reference"]["val"].__setitem__("raw_scores", [math.nan] * 559),
     f"reference.val.raw_scores {FINITE}"),
    ("raw_scores_inf", lambda p: p["reference"]["val"]["raw_scores"].__setitem__(3, -math.inf),
     f"reference.val.raw_scores {FINITE}"),
    ("ood_scores_nan", lambda p: p["reference"]["val"]["ood_scores"].__setitem__(0, math.nan),
     f"reference.val.ood_scores {FINITE}"),
    ("adapted_scores_nan", lambda p: p["reference"]["val"].__setitem__("adapted_raw_scores", [math.nan] * 559),
     f"reference.val.adapted_raw_scores {FINITE}"),
    ("run_id_escape", _set("run_id", "abc\x1b[31mRED\x07\n"),
     "run_id must be printable text (no control characters), not 'abc\\x1b[31mRED\\x07\\n'"),
    ("run_id_bidi", _set("run_id", "run\u202egpj.exe"),
     "run_id must be printable text (no control characters), not 'run\\u202egpj.exe'"),
    ("class_name_newline", _set("class_names", ["NORMAL", "PNEU\nMONIA"]),
     "class_names must be printable text (no control characters), not ['NORMAL', 'PNEU\\nMONIA']"),
]


@pytest.mark.parametrize("mutate, reason", [case[1:] for case in UNUSABLE], ids=[case[0] for case in UNUSABLE])
def test_a_field_inference_cannot_use_is_refused_where_the_checkpoint_is_loaded(tmp_path, mutate, reason):
    path = saved(tmp_path, mutate)
    with pytest.raises(CheckpointError) as caught:  # predict, explain, evaluate, drift and serve load through it
        load_bundle(path)
    assert str(caught.value) == f"{path}: not a usable checkpoint: {reason}"


def test_the_cli_refuses_them_in_one_line(tmp_path):
    """info said "scoring above nan"; predict gave a prevalence of 0.0 beside a probability of 0.355; drift
    printed "KS nan (p=nan) ... -> drift" and exited 0; the run id's ESC reached the terminal raw."""
    folder = tmp_path / "site"
    folder.mkdir()
    for index, source in enumerate(builtin.example_paths()):
        shutil.copy(source, folder / f"{index}_{source.name}")
    for command, mutate, reason in (
            (("info",), _set("ood.threshold", math.nan), "ood.threshold must be a finite number, not nan"),
            (("predict", "IMAGE"), _set("calibration.prior", 0.0),
             "calibration.prior must be a rate strictly between 0 and 1, not 0.0"),
            (("drift", "--data", folder), lambda p: p["reference"]["val"].__setitem__("raw_scores", [math.nan] * 559),
             f"reference.val.raw_scores {FINITE}"),
            (("predict", "IMAGE", "--format", "csv"), _set("run_id", "abc\x1b[31m"),
             "run_id must be printable text (no control characters), not 'abc\\x1b[31m'")):
        path = saved(tmp_path, mutate)
        argv = [command[0], path, *(EXAMPLE if a == "IMAGE" else a for a in command[1:])]
        _one_line_error(run_cli(*argv), f"{path}: not a usable checkpoint: {reason}")


def test_values_the_program_writes_still_load(tmp_path):
    """An OOD score not measured (None), a prior strictly inside (0, 1), a detector of checkpoints written
    before taps with positive scales."""
    def odd_but_fine(payload):
        payload["reference"]["val"]["ood_scores"][0] = None
        payload["calibration"]["prior"] = 0.01
    assert load_bundle(saved(tmp_path, odd_but_fine)).ood is not None
    from pneumonia_cnn.ood import OODDetector
    legacy = {"layers": ["stem"], "means": [torch.zeros(1, 2)], "precisions": [torch.eye(2)], "centres": [1.0],
              "scales": [0.5], "threshold": 2.0, "quantile": 0.95}
    assert OODDetector.from_state(legacy).threshold == 2.0
    with pytest.raises(ValueError, match=r"^ood\.scales\[0\] must be positive, not 0\.0$"):
        OODDetector.from_state(dict(legacy, scales=[0.0]))


def test_info_loads_the_weights_as_predict_does(tmp_path):
    """A weight missing or of another shape: predict refused, info described the model and exited 0."""
    first = next(iter(builtin_payload()["state_dict"]))
    for name, mutate in (("missing.pt", lambda p: p["state_dict"].pop(first)),
                         ("shape.pt", lambda p: p["state_dict"].__setitem__(first, torch.zeros(3)))):
        path = saved(tmp_path, mutate, name)
        refused = run_cli("predict", path, EXAMPLE)
        assert refused.returncode == 2 and "weights do not fit model resnet18_narrow" in refused.stderr
        _one_line_error(run_cli("info", path), refused.stderr.strip().removeprefix("error: "))


def test_info_escapes_what_it_prints_from_the_checkpoint(tmp_path):
    """Free text a user gave training (a config's data path, a population written over two lines) is kept,
    and shown escaped: one line per item, no escape sequence reaching the terminal."""
    def user_text(payload):
        payload["config"] = {"data": "/site/\x1b[2Jscans", "epochs": 1}
        payload["intended_use"]["population"] = "adults,\nthree hospitals"
    result = run_cli("info", saved(tmp_path, user_text))
    assert result.returncode == 0 and "\x1b" not in result.stdout
    assert "data=/site/\\x1b[2Jscans" in result.stdout
    assert "training population: adults,\\nthree hospitals" in result.stdout.splitlines()


# ------------------------------------------------------------------ 4. a cached int8 graph of another model
def tiny_graph(path: Path) -> Path:
    """A valid ONNX model that is not the served graph: input image (1, 1, 2, 2), output out."""
    from onnx import TensorProto, helper, save
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["out"])], "tiny",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 2, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


@pytest.mark.parametrize("engine", ["onnx-int8", "openvino-int8"])
def test_a_cached_int8_graph_of_another_model_is_one_line(capsys, tmp_path, monkeypatch, engine):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime" if engine == "onnx-int8" else "openvino")
    from pneumonia_cnn.inference.quantized import store_path
    from pneumonia_cnn.inference.sessions import served_key
    from tests.test_cli_guards import run
    monkeypatch.setenv("PNEUMONIA_CNN_CACHE", str(tmp_path / "cache"))
    bundle = load_bundle("builtin")
    cached = store_path(served_key(bundle.models[0], bundle.preprocessing.size, bundle.tta, bundle.taps))
    cached.parent.mkdir(parents=True)
    tiny_graph(cached)
    status, error = run(capsys, "predict", EXAMPLE, "--engine", engine)  # was: InvalidArgument, a traceback
    height, width = bundle.preprocessing.size
    assert (status, error) == (2, f"error: --engine {engine}: the cached int8 model {cached} is damaged (not this "
                                  f"model's graph: it takes image [1, 1, 2, 2] float32 and gives out, where the "
                                  f"model takes image [batch, 1, {height}, {width}] float32 and gives logit, tap0, "
                                  f"tap1, tap2, tap3, tap4); build it again: pneumonia-cnn export CHECKPOINT --format "
                                  f"onnx-int8 --data ROOT --out model.int8.onnx (ROOT/val: the checkpoint's validation "
                                  f"images)")


def test_the_served_graphs_signature_passes_the_check(tmp_path):
    """The float32 served graph has the inputs and outputs of its int8 form: loaded, not refused."""
    pytest.importorskip("onnxruntime")
    from pneumonia_cnn.inference.engines import ServedModel, export_onnx_bytes
    from pneumonia_cnn.inference.quantized import Int8Engine, store_path
    from pneumonia_cnn.inference.sessions import served_key
    bundle = load_bundle("builtin")
    size = bundle.preprocessing.size
    cached = store_path(served_key(bundle.models[0], size, bundle.tta, bundle.taps), tmp_path)
    cached.parent.mkdir(parents=True)
    from pneumonia_cnn.inference.graph_cache import store
    store(cached, export_onnx_bytes(ServedModel(bundle.models[0], bundle.tta, bundle.taps), size))  # with its checksum
    engine = Int8Engine(bundle.models, size, bundle.tta, bundle.taps, cache_dir=tmp_path)
    logits, features = engine.run(torch.zeros(2, *size, dtype=torch.uint8).numpy())
    assert logits.shape == (1, 2) and len(features) == len(bundle.taps) == 5


# ------------------------------------------------------------------ 5. reasons that named the wrong cause
def test_a_path_that_is_no_regular_file_says_what_it_is(tmp_path):
    fifo, loop, dangling = tmp_path / "fifo.png", tmp_path / "loop1.png", tmp_path / "dangling.pt"
    os.mkfifo(fifo)
    loop.symlink_to(loop.name)
    dangling.symlink_to("nowhere.pt")
    for path, reason in ((fifo, "not a readable checkpoint (not a regular file: a named pipe (FIFO))"),
                         (loop, "not a readable checkpoint (a symbolic link loop)"),
                         (dangling, "checkpoint not found (a symbolic link to a missing file)"),
                         (tmp_path / "absent.pt", "checkpoint not found")):
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
        assert str(caught.value) == f"{path}: {reason}"
    _one_line_error(run_cli("info", fifo), f"{fifo}: not a readable checkpoint (not a regular file: a named pipe "
                                           f"(FIFO))")
    _one_line_error(run_cli("info", loop), f"{loop}: not a readable checkpoint (a symbolic link loop)")


def test_drift_on_a_training_state_file_says_so(tmp_path):
    """A run's last.pt keeps no validation scores because it is a training-state file, not because it is "one of
    an earlier version, or adapted to a site"."""
    def last_like(payload):
        del payload["reference"]
        payload["training_state"] = {"epoch": 1, "epochs_without_improvement": 0}
    path = saved(tmp_path, last_like, "last.pt")
    result = run_cli("drift", path, "--data", EXAMPLE.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "drift: unavailable (no validation scores in this checkpoint: it is a training-state file, a run's last.pt "
        "kept to resume training; the run's best.pt holds them once the run has finished: give that)")
    from pneumonia_cnn.monitoring import NO_REFERENCE, no_reference_reason
    assert no_reference_reason({"adaptation": {"site": "x"}}).endswith("it was adapted to a site, and its model is "
                                                                       "not the one the scores came from")
    assert no_reference_reason({}) == NO_REFERENCE


def test_predict_names_what_a_checkpoint_path_is_when_it_is_no_file(tmp_path, capsys):
    """`predict FIFO.pt IMAGES` said "checkpoint not found" of a named pipe that is there."""
    from pneumonia_cnn.cli import main
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    assert main(["predict", str(fifo), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {fifo}: not a readable checkpoint "
                                              "(not a regular file: a named pipe (FIFO))")


@pytest.mark.parametrize("protocol", [4, 5])
def test_weights_and_init_files_refuse_a_plain_pickle_in_one_line_too(tmp_path, protocol):
    """``--weights``/``--init`` read through fileio.load_torch_file, which still gave torch's warning line and its
    message cut mid-word for a protocol-4 pickle."""
    import pickle
    import warnings

    from pneumonia_cnn.errors import CheckpointError
    from pneumonia_cnn.fileio import load_torch_file
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=protocol))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError) as refused:
            load_torch_file(path)
    assert str(refused.value) == (f"{path}: not a readable checkpoint (not a PyTorch file: a pickle without "
                                  "torch's magic number)")
