"""README (Train): weights saved while training (a best.pt named before the run's end-of-run steps, a last.pt)
have no fitted decision. info had made one up ("temperature calibration (logit x 1.000 +0.000)", fitted on "not
recorded (a checkpoint of an earlier version)"), and predict scored with the placeholder 0.5 without a word."""
import torch

from pneumonia_cnn import builtin
from pneumonia_cnn.cli import main
from tests.conftest import SHARED_DATA, require_shared

END_OF_RUN = ("calibration", "decision_fit", "decision_adapted", "ood", "reference")


def unfitted(tmp_path, **extra):
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=True)
    checkpoint = {k: v for k, v in checkpoint.items() if k not in END_OF_RUN}
    checkpoint.update(threshold=0.5, threshold_policy="0.5", **extra)
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    return path


def test_info_and_predict_say_that_no_decision_was_fitted(tmp_path, capsys, caplog):
    require_shared()
    path = unfitted(tmp_path)
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "classes: NORMAL, PNEUMONIA; threshold 0.5 (0.5); no calibration (not fitted yet)"
    assert lines[3].startswith("threshold and calibration fitted on: nothing: these weights were saved while "
                               "training, before its end-of-run steps")
    image = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]
    assert main(["predict", str(path), str(image), "--format", "json"]) == 0
    assert f"{path}: weights saved while training, before its end-of-run steps: the threshold 0.5 is a " \
           f"placeholder" in caplog.text


def test_a_checkpoint_of_an_earlier_version_is_still_described_as_one(tmp_path, capsys, caplog):
    path = unfitted(tmp_path, temperature=2.0)  # earlier versions stored a temperature, no decision record
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "temperature calibration (logit x 0.500 +0.000)" in lines[2]
    assert lines[3] == "threshold and calibration fitted on: not recorded (a checkpoint of an earlier version)"
    assert "weights saved while training" not in caplog.text


def test_training_s_own_end_of_run_load_is_not_warned_about(tmp_path, caplog):
    """train's end-of-run fit loads best.pt before its decision exists (load_bundle): the warning had appeared in
    every training run's output; only a user's scoring (Predictor) is warned."""
    from pneumonia_cnn.inference import Predictor, load_bundle
    path = unfitted(tmp_path)
    load_bundle(path)
    assert "weights saved while training" not in caplog.text
    Predictor(path, "cpu")
    assert "weights saved while training" in caplog.text
