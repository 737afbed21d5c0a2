"""Broken and odd checkpoint files: every one is refused in one line naming the file and the reason (which
field, for a file that loads but does not hold what inference needs), never a traceback; the checkpoints the
program writes, and the built-in one, still load."""
import io
import math
import pickle
import zipfile

import numpy as np
import pytest
import torch

from pneumonia_cnn import builtin
from pneumonia_cnn.checkpoint import build_model, load_checkpoint
from pneumonia_cnn.errors import CheckpointError, ConfigError
from pneumonia_cnn.inference.bundle import load_bundle
from pneumonia_cnn.models import create_model
from tests.test_cli import run_cli

FORMAT = "pneumonia-cnn/1"
MODELS = "densenet121, mobilenet_v2, resnet18, resnet18_narrow, resnet34, seed, seed_bn"


def builtin_payload() -> dict:
    return torch.load(builtin.checkpoint_path(), map_location="cpu", weights_only=True)


def torch_zip_with(member: str, data: bytes) -> bytes:
    """A real torch zip archive whose ``member`` is replaced by ``data``."""
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            target.writestr(name, data if name.endswith(member) else source.read(name))
    return out.getvalue()


def plain_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("a.txt", "not a tensor")
    return out.getvalue()


def legacy_start() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(100)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()[:20]


def first_half_of_builtin() -> bytes:
    data = builtin.checkpoint_path().read_bytes()
    return data[: len(data) // 2]


UNREADABLE = [
    ("text.pt", lambda: b"hello", "not a PyTorch file"),
    ("empty.pt", lambda: b"", "empty file"),
    ("random.pt", lambda: b"\x00" + np.random.default_rng(0).bytes(4000), "not a PyTorch file"),
    ("plain_zip.pt", plain_zip, "file in archive is not in a subdirectory: a.txt"),
    ("half.pt", first_half_of_builtin, "truncated or damaged: its zip archive has no central directory"),
    ("damaged_pickle.pt", lambda: torch_zip_with("data.pkl", b"hello"), "damaged pickled data: KeyError 101"),
    ("plain_pickle.pt", lambda: pickle.dumps({"a": 1}, protocol=2),
     "not a PyTorch file: a pickle without torch's magic number"),
    ("legacy_cut.pt", legacy_start, "truncated: the file ends inside its pickled data"),
]


@pytest.mark.parametrize("name, content, reason", UNREADABLE, ids=[case[0] for case in UNREADABLE])
def test_an_unreadable_file_is_named_with_the_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content())
    expected = f"{path}: not a readable checkpoint ({reason})"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == expected
    with pytest.raises(CheckpointError) as caught:  # --weights reads through the same function
        create_model("seed", 1, (64, 64), weights=str(path))
    assert str(caught.value) == expected


def _set(path: str, value):
    """A mutation that sets the dotted ``path`` (or deletes it, for value ``...``)."""
    def mutate(payload):
        *parents, last = path.split(".")
        for key in parents:
            payload = payload[key]
        if value is ...:
            del payload[last]
        else:
            payload[last] = value
    return mutate


MALFORMED = [
    ("tag_only", lambda p: [p.pop(k) for k in list(p) if k != "format"], "model is missing"),
    ("no_state_dict", _set("state_dict", ...), "state_dict is missing"),
    ("no_preprocessing", _set("preprocessing", ...), "preprocessing is missing"),
    ("model_not_dict", _set("model", "seed"), "model must be a dict, not str 'seed'"),
    ("model_no_name", _set("model.name", ...), "model.name is missing"),
    ("unknown_model", _set("model.name", "nope"), f"model.name: unknown model 'nope'; choose from {MODELS}"),
    ("bogus_kwarg", _set("model.kwargs.bogus", 1),
     "model.kwargs: model resnet18_narrow: unknown keyword argument(s) bogus; it accepts in_channels, image_size, "
     "width, dropout"),
    ("weights_kwarg", _set("model.kwargs.weights", "/etc/passwd"),
     "model.kwargs: model resnet18_narrow: unknown keyword argument(s) weights; it accepts in_channels, "
     "image_size, width, dropout"),
    ("kwargs_list", _set("model.kwargs", [1]), "model.kwargs must be a dict, not list [1]"),
    ("state_entry_not_tensor", lambda p: p["state_dict"].update({"stem.0.weight": 3}),
     "state_dict: entry 'stem.0.weight' is not a dense tensor"),
    ("state_entry_sparse", lambda p: p["state_dict"].update({"stem.0.weight": p["state_dict"]["stem.0.weight"]
                                                              .flatten().to_sparse()}),
     "state_dict: entry 'stem.0.weight' is not a dense tensor"),
    ("state_entry_nan", lambda p: p["state_dict"]["stem.0.weight"].view(-1).__setitem__(0, math.nan),
     "state_dict: entry 'stem.0.weight' holds NaN or infinite values (a diverged or damaged model)"),
    ("size_zero", _set("preprocessing.size", [0, 0]),
     "preprocessing.size must be two whole numbers from 16 to 4096 (height, width), not [0, 0]"),
    ("size_one_number", _set("preprocessing.size", [192]),
     "preprocessing.size must be two whole numbers from 16 to 4096 (height, width), not [192]"),
    ("size_text", _set("preprocessing.size", ["a", "b"]),
     "preprocessing.size must be two whole numbers from 16 to 4096 (height, width), not ['a', 'b']"),
    ("size_huge", _set("preprocessing.size", [100000, 100000]),  # predict tried to allocate 80 GB
     "preprocessing.size must be two whole numbers from 16 to 4096 (height, width), not [100000, 100000]"),
    ("age_range_one", _set("intended_use.age_range_years", [1]),  # info and predict raised IndexError
     "intended_use.age_range_years must be [min, max] with 0 <= min <= max, not [1]"),
    ("age_range_text", _set("intended_use.age_range_years", "kids"),
     "intended_use.age_range_years must be a list, not str 'kids'"),
    ("age_range_reversed", _set("intended_use.age_range_years", [5, 1]),
     "intended_use.age_range_years must be [min, max] with 0 <= min <= max, not [5, 1]"),
    ("size_number", _set("preprocessing.size", 192), "preprocessing.size must be a list, not int 192"),
    ("channels_two", _set("preprocessing.channels", 2), "preprocessing.channels must be 1 or 3, not 2"),
    ("rescale_other", _set("preprocessing.rescale", 1.0),  # it was never read: [0, 255] pixels fed as [0, 1]
     "preprocessing.rescale 1.0 is not supported (pixels are scaled by 1/255)"),
    ("rescale_text", _set("preprocessing.rescale", "1/255"), "preprocessing.rescale must be a number, not str '1/255'"),
    ("intensity", _set("preprocessing.intensity", "bogus"),
     "preprocessing.intensity 'bogus' is not one of none, equalize, clahe, window"),
    ("interpolation", _set("preprocessing.interpolation", "cubic"),
     "preprocessing.interpolation 'cubic' is not one of bilinear, nearest, bicubic, area, lanczos"),
    ("threshold_text", _set("threshold", "abc"), "threshold must be a number, not str 'abc'"),
    ("threshold_bool", _set("threshold", True), "threshold must be a number, not bool True"),
    ("threshold_none", _set("threshold", None), "threshold must be a number, not None"),
    ("threshold_nan", _set("threshold", math.nan), "threshold must be a probability between 0 and 1, not nan"),
    ("threshold_above", _set("threshold", 1.5), "threshold must be a probability between 0 and 1, not 1.5"),
    ("threshold_below", _set("threshold", -0.1), "threshold must be a probability between 0 and 1, not -0.1"),
    ("one_class", _set("class_names", ["A"]), "class_names must be a list of two different names, not ['A']"),
    ("class_names_none", _set("class_names", None), "class_names must be a list, not None"),
    ("channels_none", _set("preprocessing.channels", None), "preprocessing.channels must be a whole number, not None"),
    ("config_none", _set("config", None), "config must be a dict, not None"),
    ("run_id_number", _set("run_id", 7), "run_id must be a string, not int 7"),
    ("class_names_text", _set("class_names", "NORMAL"), "class_names must be a list, not str 'NORMAL'"),
    ("calibration_scale", _set("calibration.scale", math.inf), "calibration.scale must be a finite number, not inf"),
    ("calibration_field", _set("calibration.colour", 1), "calibration has unknown field(s) colour"),
    ("calibration_method", _set("calibration.method", "isotonic"),
     "calibration.method 'isotonic' is not one of platt, temperature, none"),
    ("temperature_zero", _set("temperature", 0), "temperature must be a positive number, not 0"),
    ("adapted_threshold", _set("decision_adapted.threshold", math.nan),
     "decision_adapted.threshold must be a probability between 0 and 1, not nan"),
    ("reference_lengths", _set("reference.val.labels", [0, 1, 1]),
     "reference.val.labels holds 3 values for 559 raw_scores"),
    ("reference_labels", _set("reference.val.labels", ["NORMAL"] * 559),
     "reference.val.labels must be a list of 0 (first class) and 1 (second class)"),
    ("threshold_fit_text", _set("reference.threshold_fit", "oops"),
     "reference.threshold_fit must be a dict, not str 'oops'"),
    ("threshold_fit_prints", _set("reference.threshold_fit", {"fingerprints": "abc"}),
     "reference.threshold_fit.fingerprints must be a list, not str 'abc'"),
    ("threshold_fit_numbers", _set("reference.threshold_fit", {"fingerprints": [5]}),
     "reference.threshold_fit.fingerprints must be a list of SHA-256 strings"),
    ("decision_fit_list", _set("decision_fit", ["a"]), "decision_fit must be a dict, not list ['a']"),
    ("threshold_refit", _set("decision_fit.threshold_refit", 5),
     "decision_fit.threshold_refit must be a dict, not int 5"),
    ("epoch_text", _set("epoch", "x"), "epoch must be a whole number, not str 'x'"),
    ("history_text", _set("history", "x"), "history must be a list, not str 'x'"),
    ("history_numbers", _set("history", [1, 2]),
     "history must be a list of per-epoch records (each with its epoch), not [1, 2]"),
    ("history_no_epoch", _set("history", [{}]), "history must be a list of per-epoch records (each with its epoch), "
                                                "not [{}]"),
]


@pytest.mark.parametrize("mutate, reason", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_a_checkpoint_missing_or_with_odd_fields_names_the_field(tmp_path, mutate, reason):
    payload = builtin_payload()
    mutate(payload)
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(caught.value) == f"{path}: not a usable checkpoint: {reason}"
    with pytest.raises(CheckpointError):  # what predict, explain, evaluate and serve load through
        load_bundle(path)


def test_degenerate_operating_points_that_training_can_write_still_load(tmp_path):
    """A sensitivity or specificity threshold is an observed probability, 0 and 1 included, or the float just
    above the highest negative (``np.nextafter``): all are thresholds the program itself writes."""
    for threshold in (0.0, 1.0, math.nextafter(1.0, math.inf), 0.5):
        payload = builtin_payload()
        payload["threshold"] = threshold
        torch.save(payload, tmp_path / "edge.pt")
        assert load_checkpoint(tmp_path / "edge.pt")["threshold"] == threshold


def _misfit(tmp_path, mutate):
    payload = builtin_payload()
    mutate(payload)
    path = tmp_path / "misfit.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as caught:
        build_model(load_checkpoint(path))
    return path, str(caught.value)


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    def drop_four(payload):
        for key in list(payload["state_dict"])[:4]:
            del payload["state_dict"][key]
    path, message = _misfit(tmp_path, drop_four)
    assert message == (f"{path}: weights do not fit model resnet18_narrow (missing key(s) stem.0.weight, "
                       f"stem.1.weight, stem.1.bias, … (4 in all))")
    path, message = _misfit(tmp_path, lambda p: p["state_dict"].update({"extra.weight": torch.zeros(2)}))
    assert message == f"{path}: weights do not fit model resnet18_narrow (unexpected key(s) extra.weight)"


def test_weights_of_another_width_name_the_first_size_mismatch(tmp_path):
    path, message = _misfit(tmp_path, _set("model.kwargs.width", 8))
    assert message.startswith(f"{path}: weights do not fit model resnet18_narrow (size mismatch: stem.0.weight is "
                              f"[16, 1, 7, 7] in the file, [8, 1, 7, 7] in the model (")
    assert message.endswith(" size mismatches in all))") and "\n" not in message and len(message) < 400 + len(str(path))


def test_weights_file_for_another_model_names_the_keys(tmp_path):
    torch.save(create_model("seed", 1, (64, 64)).state_dict(), tmp_path / "seed.pt")
    with pytest.raises(CheckpointError) as caught:
        create_model("seed_bn", 1, (64, 64), weights=str(tmp_path / "seed.pt"))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'seed.pt'}: weights do not fit model seed_bn (missing key(s) ")
    assert "; unexpected key(s) conv1.weight, conv1.bias, conv2.weight, … (10 in all))" in message


def test_create_model_names_unknown_keywords_and_the_accepted_ones():
    with pytest.raises(ConfigError) as caught:
        create_model("seed", bogus=1, other=2)
    assert str(caught.value) == ("model seed: unknown keyword argument(s) bogus, other; it accepts in_channels, "
                                 "image_size")
    with pytest.raises(ConfigError) as caught:
        create_model("seed", 3, (4, 4))
    assert str(caught.value) == ("model seed cannot be built with {'in_channels': 3, 'image_size': (4, 4)} "
                                 "(input (4, 4) is too small for the seed model (needs at least 22x22))")
    with pytest.raises(ValueError, match=f"unknown model 'nope'; choose from {MODELS}"):
        create_model("nope")


def test_an_unreadable_ood_state_is_named_where_the_detector_is_rebuilt(tmp_path):
    payload = builtin_payload()
    payload["ood"] = {"version": 2}
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    load_checkpoint(path)  # the checkpoint floor checks that it is a dict; the inference floor rebuilds it
    with pytest.raises(CheckpointError) as caught:
        load_bundle(path)
    assert str(caught.value) == (f"{path}: not a usable checkpoint: ood: not a detector this version can read "
                                 f"(no 'components')")
    result = run_cli("info", path)
    _one_line_error(result, f"{path}: not a usable checkpoint: ood: not a detector this version can read "
                            f"(no 'components')")

def _one_line_error(result, expected, after_log=False):
    """Exit code 2 and ``error: expected`` as the whole of stderr (its last line, after training's log)."""
    assert "Traceback" not in result.stderr, result.stderr
    stderr = result.stderr.strip()
    assert (result.returncode, stderr.splitlines()[-1] if after_log else stderr) == (2, f"error: {expected}")


def test_the_cli_refuses_broken_checkpoints_in_one_line(tmp_path):
    image = builtin.example_paths()[0]
    text = tmp_path / "text.pt"
    text.write_bytes(b"hello")
    half = tmp_path / "half.pt"
    half.write_bytes(first_half_of_builtin())
    tag = tmp_path / "tag.pt"
    torch.save({"format": FORMAT}, tag)
    nan = tmp_path / "nan.pt"
    torch.save(dict(builtin_payload(), threshold=math.nan), nan)
    unreadable = "not a readable checkpoint"
    _one_line_error(run_cli("info", text), f"{text}: {unreadable} (not a PyTorch file)")
    _one_line_error(run_cli("info", half), f"{half}: {unreadable} (truncated or damaged: its zip archive has no "
                                           f"central directory)")
    _one_line_error(run_cli("info", tag), f"{tag}: not a usable checkpoint: model is missing")
    _one_line_error(run_cli("predict", text, image), f"{text}: {unreadable} (not a PyTorch file)")
    _one_line_error(run_cli("predict", tag, image), f"{tag}: not a usable checkpoint: model is missing")
    _one_line_error(run_cli("predict", nan, image),
                    f"{nan}: not a usable checkpoint: threshold must be a probability between 0 and 1, not nan")
    _one_line_error(run_cli("train", "--data", tmp_path / "unused", "--out", tmp_path / "run", "--init", text),
                    f"{text}: {unreadable} (not a PyTorch file)")


def test_train_refuses_unknown_model_keywords_in_one_line(small_root, tmp_path):
    result = run_cli("train", "--data", small_root, "--out", tmp_path / "run", "--model-kwargs", '{"bogus": 1}',
                     "--epochs", "1", "--size", "48", "--no-progress", "--cache-dir", tmp_path / "cache")
    _one_line_error(result, "model_kwargs: model seed: unknown keyword argument(s) bogus; it accepts none")
    assert not (tmp_path / "run").exists()  # refused when the config is built: nothing read, nothing written
    result = run_cli("train", "--data", small_root, "--out", tmp_path / "run", "--model-kwargs", '{"in_channels": 1}')
    _one_line_error(result, "model_kwargs: in_channels come(s) from the field(s) channels; set those instead")


def test_checkpoints_the_program_writes_still_load(trained_run):
    for path in ("builtin", trained_run, trained_run / "best.pt", trained_run / "last.pt"):
        bundle = load_bundle(path)
        assert bundle.class_names == ("NORMAL", "PNEUMONIA") and bundle.models


def test_an_ensemble_whose_members_lack_validation_fingerprints_averages_them(trained_run, tmp_path):
    paths = []
    for index in range(2):
        payload = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
        del payload["reference"]["val"]["fingerprints"]
        name = next(iter(payload["state_dict"]))  # two models: one model's weights twice are refused
        payload["state_dict"][name] = payload["state_dict"][name] * (1 + index / 100)
        paths.append(tmp_path / f"member{index}.pt")
        torch.save(payload, paths[-1])
    bundle = load_bundle(paths)
    assert bundle.member_decisions is not None and "do not share stored validation scores" in bundle.notes[0]

