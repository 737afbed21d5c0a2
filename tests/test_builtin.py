"""The model in the box: it loads, is the file its card says, reproduces its recorded figures, and every
command uses it when no checkpoint is given."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pneumonia_cnn import builtin
from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.cli import main
from tests.conftest import SHARED_DATA, require_shared


def test_the_shipped_file_is_the_one_its_card_records():
    card = builtin.card()
    assert builtin.sha256() == card["sha256"]
    checkpoint = load_checkpoint("builtin")
    assert checkpoint["run_id"] == card["run_id"] and checkpoint["config"]["preset"] == "best"
    assert checkpoint["config"]["seed"] == card["training"]["seed"] and checkpoint.get("ood")
    assert "CC BY 4.0" in card["data"]["license"] and "Kermany" in card["data"]["attribution"]
    assert card["reproduce"].startswith("pneumonia-cnn train --data ../shared/data/chest_xray_224")
    assert builtin.checkpoint_path().stat().st_size < 5 * 1024 * 1024


def test_it_reproduces_its_recorded_figures_on_the_shared_test_folder(tmp_path):
    require_shared()
    from pneumonia_cnn.evaluation.evaluate import evaluate
    report = evaluate("builtin", SHARED_DATA, "test", device="cpu", bootstrap=200, figures=False)
    recorded = builtin.card()["figures"]["shared_test"]
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc", "ece"):
        assert report["metrics"][name]["value"] == pytest.approx(recorded[name]["value"], abs=1e-6), name
    assert report["threshold"] == pytest.approx(recorded["threshold"], abs=1e-9)
    # issue 17's target on the shared test folder: at most 5% of these children flagged (README: 4.0%)
    # within one image: another CPU's rounding may move an image that sits on the threshold
    one_image = 1.01 / recorded["images"]
    assert report["ood"]["fraction_flagged"] == pytest.approx(recorded["flagged_out_of_distribution"], abs=one_image)
    assert report["ood"]["fraction_flagged"] <= 0.05


def test_its_detector_flags_at_least_nine_in_ten_adults_of_each_source():
    """README: 95.2% of covid_collection, 94.4% of actualmed (target >= 90% of each)."""
    from pneumonia_cnn.inference import Predictor
    adults = SHARED_DATA.parent / "adult_xray_dev"
    if not adults.is_dir():
        pytest.skip(f"adult X-rays not available: {adults} is absent")
    predictor = Predictor("builtin", "cpu")
    for source, recorded in builtin.card()["figures"]["adult_xray_dev_flagged"].items():
        files = sorted((adults / source).glob("*.jpeg"))
        flagged = np.mean([p.in_distribution is False for p in predictor.predict_files(files)])
        assert len(files) == recorded["images"], source
        assert flagged == pytest.approx(recorded["flagged"], abs=1.01 / len(files)), source  # within one image
        assert flagged >= 0.90, (source, flagged)


def test_a_prevalence_keeps_the_label_of_the_validation_image_its_threshold_was_chosen_at(capsys, tmp_path):
    """README (From score to decision): an operating point's labels stay whatever the rate; this image's calibrated
    probability is the threshold itself, and at 0.75 and 0.3 it was labelled NORMAL (1 ulp below). The threshold
    is this image's probability as the CPU that fitted it computed it; another CPU's kernels round differently
    (1e-8 on an AMX Xeon), so the test sets it to the probability computed here, as fitting here would."""
    import torch
    require_shared()
    image = SHARED_DATA / "val" / "PNEUMONIA" / "person412_bacteria_1827.jpeg"
    assert main(["predict", str(image), "--format", "json"]) == 0
    here = json.loads(capsys.readouterr().out)[0]["probability"]
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=True)
    assert abs(checkpoint["threshold"] - here) < 5e-8  # the same image on the threshold, to rounding
    checkpoint["threshold"] = here
    on_threshold = tmp_path / "on_threshold.pt"
    torch.save(checkpoint, on_threshold)
    labels = []
    for rate in (None, "0.75", "0.3", "0.05"):
        assert main(["predict", str(on_threshold), str(image), "--format", "json",
                     *(["--prevalence", rate] if rate else [])]) == 0
        row = json.loads(capsys.readouterr().out)[0]
        assert row["probability"] == pytest.approx(row["threshold"], abs=1e-12)
        labels.append(row["label"])
    assert labels == ["PNEUMONIA"] * 4
    assert main(["predict", str(on_threshold), str(image), "--format", "fhir", "--prevalence", "0.75"]) == 0
    (observation,) = json.loads(capsys.readouterr().out)["contained"]
    assert observation["interpretation"][0]["coding"][0]["code"] == "POS"  # it said NEG beside the label


def test_predict_info_and_examples_need_no_checkpoint(capsys):
    examples = builtin.example_paths()
    assert len(examples) >= 4 and {p.name.split("_")[0] for p in examples} == {"NORMAL", "PNEUMONIA"}
    assert main(["predict", *map(str, examples), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [builtin.card()["run_id"]] * len(examples)
    truth = [p.name.split("_")[0] for p in examples]
    assert [r["label"] for r in rows] == truth  # the examples are ones it gets right, as the card says
    assert all(r["in_distribution"] for r in rows)
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "children aged 1 to 5" in text and builtin.card()["run_id"] in text


def test_a_fresh_process_predicts_one_image_from_the_builtin_model():
    result = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "predict", str(builtin.example_paths()[0]),
                             "--format", "json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)[0]
    assert 0 < row["probability"] < 1 and row["threshold"] == pytest.approx(load_checkpoint("builtin")["threshold"])


def test_fine_tuning_starts_from_the_builtin_weights(small_root, cache_dir, tmp_path):
    import torch

    from pneumonia_cnn.errors import ConfigError
    from pneumonia_cnn.training import make_config, start_run
    config = make_config("finetune", data=str(small_root), out=str(tmp_path / "ft"), epochs=1,
                         cache_dir=str(cache_dir), progress=False, min_val_images=10, freeze_stem=True)
    shipped = load_checkpoint("builtin")
    assert (config.model, config.size, config.channels, config.intensity) == (
        shipped["model"]["name"], shipped["preprocessing"]["size"][0], shipped["preprocessing"]["channels"],
        shipped["preprocessing"]["intensity"])
    assert config.lr < make_config("best").lr
    run = start_run(config)
    state = run.state.model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in shipped["state_dict"].items())
    assert not any(p.requires_grad for p in run.state.model.stem.parameters())
    assert all(p.requires_grad for p in run.state.model.layer1.parameters())
    with pytest.raises(ConfigError, match="size: 128 differs from the --init checkpoint's"):
        make_config("finetune", data=str(small_root), size=128)


def test_missing_builtin_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(builtin, "checkpoint_path", lambda: tmp_path / "absent.pt")
    image = np.zeros((8, 8), np.uint8)
    from PIL import Image
    Image.fromarray(image).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png")]) == 2
    assert "builtin: the packaged model is missing" in capsys.readouterr().err


def test_one_image_predict_does_not_load_scikit_learn():
    # what keeps a one-image predict fast from a fresh process (README, "The built-in model"): scikit-learn
    # and SciPy cost about 1.4 s to import, and scoring images needs neither
    script = ("import sys\nfrom pneumonia_cnn.cli import main\n"
              f"assert main(['predict', {str(builtin.example_paths()[0])!r}, '--format', 'json']) == 0\n"
              "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules), "
              "file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["serve"], ["info"], ["export", "--out", "m.onnx"], ["stress", "--data", "d"],
                                  ["adapt", "--data", "d", "--out", "a.pt"]])
def test_every_command_that_scores_uses_the_builtin_model_when_none_is_given(argv):
    """As the README says; stress and adapt required the model argument."""
    from pneumonia_cnn.cli import build_parser
    assert build_parser().parse_args(argv).checkpoint == "builtin"


@pytest.mark.parametrize("argv", [["listen", "--send-to", "p:104:P", "--accept-from", "ORTHANC", "runs/b"],
                                  ["pacs", "--dicomweb", "http://pacs/dicom-web", "--modality", "CR", "runs/b"],
                                  ["drift", "--data", "images/", "runs/b"]])
def test_a_model_named_after_a_list_option_is_not_taken_for_one_of_its_values(argv, capsys):
    """With the model optional, "--accept-from ORTHANC runs/b" accepted a sender called "runs/b" and ran the
    built-in model: these commands need their model named."""
    from pneumonia_cnn.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "the following arguments are required: checkpoint" in capsys.readouterr().err
