"""An ensemble's members: one with other classes (or another positive class) is refused, not averaged with the
others; one with other input is refused naming what differs; and a Platt calibration that cannot be fitted (the
validation scores do not rank the classes) says so where it is fitted and is recorded, not silently "none"."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia_cnn import builtin
from pneumonia_cnn.calibration import Calibration, fit_calibration
from pneumonia_cnn.checkpoint import load_checkpoint, save_checkpoint
from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.inference import load_bundle
from tests.conftest import SHARED_DATA, require_shared
from tests.test_cli_guards import run

BUILTIN = Path(builtin.checkpoint_path())


def builtin_payload() -> dict:
    return torch.load(BUILTIN, map_location="cpu", weights_only=True)


def other_weights(payload: dict) -> dict:
    """The payload with one weight moved a little: another model, which an ensemble does not refuse as a copy."""
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = payload["state_dict"][name] + 1e-3
    return payload


def member(path: Path, **changes) -> Path:
    """The built-in model, its weights moved a little, saved under another name with ``changes`` to its payload
    (``preprocessing`` merged)."""
    payload = other_weights(builtin_payload())
    preprocessing = changes.pop("preprocessing", {})
    payload.update(changes)
    payload["preprocessing"] = dict(payload["preprocessing"], **preprocessing)
    return save_checkpoint(payload, path)


# ------------------------------------------------------------------ classes
def test_a_member_with_other_classes_is_refused_by_predict(capsys, tmp_path):
    """COVID/NORMAL folders: its positive class is NORMAL, and predict printed the mean of P(PNEUMONIA) and
    P(NORMAL)."""
    other = member(tmp_path / "inv.pt", class_names=["COVID", "NORMAL"])
    status, error = run(capsys, "predict", "builtin", other, "--", builtin.example_paths()[0])
    assert (status, error) == (2, f"error: {other}: classes COVID, NORMAL (positive NORMAL) differ from {BUILTIN}'s "
                                  "NORMAL, PNEUMONIA (positive PNEUMONIA); an ensemble averages one class's score: its "
                                  "members need the same classes")


def test_a_member_with_other_classes_is_refused_by_evaluate(capsys, tmp_path, small_root):
    """Only the first member's classes were checked against the data: evaluate exited 0."""
    other = member(tmp_path / "inv.pt", class_names=["COVID", "NORMAL"])
    status, error = run(capsys, "evaluate", "--checkpoint", BUILTIN, other, "--data", small_root, "--split", "test",
                        "--out", tmp_path / "eval")
    assert status == 2 and error.startswith(f"error: {other}: classes COVID, NORMAL (positive NORMAL) differ from ")
    assert "\n" not in error


def test_a_member_whose_negative_class_has_another_name_is_refused(tmp_path):
    other = member(tmp_path / "healthy.pt", class_names=["HEALTHY", "PNEUMONIA"])
    with pytest.raises(PneumoniaCNNError, match=r"healthy\.pt: classes HEALTHY, PNEUMONIA \(positive PNEUMONIA\) "
                                                r"differ from .*best\.pt's NORMAL, PNEUMONIA \(positive PNEUMONIA\)"):
        load_bundle([BUILTIN, other])


def test_a_member_whose_class_folders_differed_only_in_case_is_accepted(tmp_path):
    """Class folders are matched without regard to case (a model's NORMAL reads `normal/`): so are members."""
    other = member(tmp_path / "lower.pt", class_names=["normal", "pneumonia"])
    assert len(load_bundle([BUILTIN, other]).models) == 2


# ------------------------------------------------------------------ input
def test_a_member_with_other_input_is_refused_naming_what_differs(tmp_path):
    """It said "preprocessing or test-time flips differ", not which."""
    other = member(tmp_path / "c96.pt", preprocessing={"size": [96, 96], "intensity": "none"}, tta=False)
    with pytest.raises(PneumoniaCNNError) as refused:
        load_bundle([BUILTIN, other])
    assert str(refused.value) == (f"{other}: its input differs from {BUILTIN}'s (size 96 vs 192, intensity none vs "
                                  "equalize, test-time flips off vs on); an ensemble needs the same input")


def test_a_member_with_other_channels_is_refused_naming_them(tmp_path):
    payload = builtin_payload()
    payload["model"] = dict(payload["model"], kwargs=dict(payload["model"]["kwargs"], in_channels=3))
    payload["preprocessing"] = dict(payload["preprocessing"], channels=3, size=[192, 160])
    other = save_checkpoint(payload, tmp_path / "rgb.pt")
    with pytest.raises(PneumoniaCNNError, match=r"rgb\.pt: its input differs from .*\(size 192x160 vs 192, "
                                                r"channels 3 vs 1\); an ensemble needs the same input$"):
        load_bundle([BUILTIN, other])


# ------------------------------------------------------------------ calibration
def reversed_scores(count: int = 20):
    labels = np.array([0, 1] * (count // 2))
    return labels, np.where(labels == 1, -1.0, 1.0) + np.linspace(-0.5, 0.5, count)


def test_a_platt_fit_that_cannot_rank_says_why_and_stores_as_before():
    labels, scores = reversed_scores()
    fitted = fit_calibration(labels, scores, "platt")
    assert fitted.method == "none" and (fitted.scale, fitted.bias) == (1.0, 0.0)
    assert fitted.note.startswith("platt calibration not applied: fitted slope -")
    assert fitted.note.endswith("<= 0 on 20 images, the scores do not rank the classes (pneumonia does not score "
                                "higher); probabilities left uncalibrated")
    assert fit_calibration(labels, -scores, "platt").note == ""
    # the stored calibration keeps the four fields earlier versions (and the checkpoint's check) read
    assert set(fitted.to_dict()) == {"method", "scale", "bias", "prior"}
    old = {"method": "platt", "scale": 1.2, "bias": 0.3, "prior": 0.7}
    assert Calibration.from_dict(old) == Calibration("platt", 1.2, 0.3, 0.7) and Calibration.from_dict(old).note == ""


def test_training_warns_and_records_why_platt_was_not_applied(tmp_path, caplog):
    """Validation labels the other way round: Platt's slope is negative, and the run said only "none
    calibration" while its config said platt."""
    from pneumonia_cnn.data.cache import CachedImages
    from pneumonia_cnn.inference.bundle import Preprocessing
    from pneumonia_cnn.training import make_config
    from pneumonia_cnn.training.finish import finish_run
    require_shared()
    paths = [p for name in ("NORMAL", "PNEUMONIA") for p in sorted((SHARED_DATA / "val" / name).iterdir())[:6]]
    preprocessing = Preprocessing.from_checkpoint(builtin_payload())
    labels = np.array([1] * 6 + [0] * 6)  # NORMAL images labelled pneumonia, and the other way round
    val = CachedImages(np.stack([preprocessing.read_path(p)[0] for p in paths]), labels, [str(p) for p in paths],
                       [p.stem for p in paths], ("NORMAL", "PNEUMONIA"), [])
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(builtin_payload(), out / "best.pt")
    config = make_config("tutorial", data=str(tmp_path), out=str(out), calibration="platt", threshold="0.5",
                         ood=False, progress=False)
    with caplog.at_level(logging.WARNING):
        finish_run(out, config, None, val, torch.device("cpu"))
    warned = [r.getMessage() for r in caplog.records if "platt calibration not applied" in r.getMessage()]
    assert warned and warned[0].startswith("best.pt: on the validation images, platt calibration not applied: fitted "
                                           "slope -") and "on 12 images" in warned[0]
    best = load_checkpoint(out / "best.pt")  # the checkpoint's own check accepts what was recorded
    assert best["calibration"]["method"] == "none"
    assert best["decision_fit"]["calibration_requested"] == "platt"
    assert best["decision_fit"]["calibration_note"] == warned[0].split("images, ", 1)[1]
    # --adapt-batch's class mix, drawn by the labels here (6 of 12 scored each class, fewer than 8): recorded with
    # the fit, not a warning on every training run that did not ask for --adapt-batch
    assert best["decision_fit"]["adapted_class_mix"].startswith("the class mix drawn by the images' labels: only ")
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "class mix" in r.getMessage()]
    # and info (the report's Decision and Configuration use the same text) says why, not "no calibration" alone
    from pneumonia_cnn.info import describe_checkpoint
    assert f"no calibration ({warned[0].split('images, ', 1)[1]})" in describe_checkpoint(out / "best.pt")


def test_an_ensemble_whose_platt_fit_cannot_rank_says_so():
    """The ensemble refits its members' calibration on their shared validation scores: the same fallback."""
    labels, scores = reversed_scores()
    reference = {"val": {"fingerprints": [f"f{i}" for i in range(len(labels))], "labels": labels.tolist(),
                         "raw_scores": scores.tolist()}}
    first, second = builtin_payload(), builtin_payload()
    for payload in (first, second):
        payload.update(reference=reference, calibration={"method": "platt", "scale": 1.0, "bias": 0.0, "prior": 0.5})
    bundle = load_bundle([first, other_weights(second)])
    assert bundle.decision.calibration.method == "none"
    assert any(note.startswith("ensemble of 2: on its members' validation scores, platt calibration not applied: "
                               "fitted slope -") for note in bundle.notes)
