"""Site adaptation on a simulated site: a strong fixed shift of the shared X-rays."""
import numpy as np
import pytest
import torch
from PIL import Image

from pneumonia_cnn.adaptation import adabn
from pneumonia_cnn.checkpoint import build_model, load_checkpoint
from pneumonia_cnn.cli import main
from pneumonia_cnn.evaluation import stress
from tests.conftest import SHARED_DATA, require_shared


def site_shift(gray):
    return stress.blur(stress.contrast(stress.gamma(gray, 1.8), 0.6), 1.0)


def write_site(folder, split, per_class, labelled, offset=0):
    for name in ("NORMAL", "PNEUMONIA"):
        for path in sorted((SHARED_DATA / split / name).iterdir())[offset:offset + per_class]:
            gray = np.asarray(Image.open(path).convert("L"))
            target = folder / name / path.name if labelled else folder / f"{name[0]}_{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(site_shift(gray)).save(target.with_suffix(".png"))
    return folder


@pytest.fixture(scope="module")
def bn_run(small_root, cache_dir, tmp_path_factory):
    from pneumonia_cnn.training import make_config, train
    out = tmp_path_factory.mktemp("bn")
    train(make_config("tutorial", data=str(small_root), out=str(out), model="seed_bn", model_kwargs={"width": 8},
                      epochs=3, size=48, batch_size=16, cache_dir=str(cache_dir), progress=False, min_val_images=10,
                      evaluate_test=False, lr=3e-3))
    return out


def test_adabn_moves_statistics_to_the_new_site(bn_run, tmp_path):
    require_shared()
    model = build_model(load_checkpoint(bn_run / "best.pt"))
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = first_bn.running_mean.clone()
    rng = np.random.default_rng(0)
    bright = (rng.random((40, 48, 48)) * 60 + 190).astype(np.uint8)
    assert adabn(model, bright, torch.device("cpu")) > 0
    assert not torch.allclose(before, first_bn.running_mean)
    assert not model.training


def test_adapt_cli_with_labels_reports_before_after_and_refits(bn_run, tmp_path, capsys):
    require_shared()
    unlabelled = write_site(tmp_path / "site_unlabelled", "test", 30, labelled=False)
    labelled = write_site(tmp_path / "site_labelled", "val", 16, labelled=True)
    out = tmp_path / "adapted.pt"
    assert main(["adapt", str(bn_run / "best.pt"), "--data", str(unlabelled), "--labelled", str(labelled), "--out",
                 str(out), "--recalibrate", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "AdaBN:" in text and "before on" in text and "after on" in text
    assert ("is better" in text) or ("is NOT better" in text)
    adapted = load_checkpoint(out)
    original = load_checkpoint(bn_run / "best.pt")
    assert adapted["adaptation"]["labelled"] and adapted["ood"]["threshold"] != original["ood"]["threshold"]
    # recalibrated on the labelled images it kept in: those are what evaluate refuses, with no scores of the
    # cross-validation models stored as if they were the adapted model's
    assert "raw_scores" not in adapted["reference"]["val"] and "threshold_fit" not in adapted["reference"]
    # its weights were fine-tuned on them: refused even when only the threshold is refitted later
    from pneumonia_cnn.data.dataset import load_split
    from pneumonia_cnn.data.fingerprint import file_fingerprints
    from pneumonia_cnn.errors import PneumoniaCNNError
    from pneumonia_cnn.evaluation.evaluate import refuse_stored_overlap
    from pneumonia_cnn.inference import load_bundle
    site_images = load_split(labelled, None)
    with pytest.raises(PneumoniaCNNError, match="are among the images"):
        refuse_stored_overlap(load_bundle(out), site_images, file_fingerprints(site_images.paths),
                              calibration_only=True)
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(labelled), "--split", "", "--bootstrap", "5",
                 "--no-figures", "--out", str(tmp_path / "m.json")]) == 2
    assert "threshold and calibration" in capsys.readouterr().err
    # the refitted OOD model treats the new site as in distribution
    from pneumonia_cnn.inference import Predictor
    site_files = sorted(unlabelled.iterdir())
    original_flags = [not p.in_distribution for p in Predictor(bn_run / "best.pt", "cpu").predict_files(site_files)]
    adapted_flags = [not p.in_distribution for p in Predictor(out, "cpu").predict_files(site_files)]
    assert np.mean(adapted_flags) <= np.mean(original_flags)
    assert np.mean(adapted_flags) <= 0.2


def test_adapt_without_labels_and_without_batch_norm(trained_run, small_root, tmp_path, capsys):
    require_shared()
    unlabelled = write_site(tmp_path / "u", "test", 16, labelled=False)
    assert main(["adapt", str(trained_run), "--data", str(unlabelled), "--out", str(tmp_path / "a.pt")]) == 0
    assert "no batch-norm layers" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "a.pt")["adaptation"]["adabn_layers"] == 0
    # it keeps the source's calibration and threshold, so evaluate still refuses the images they were fitted on
    # (the adapted checkpoint had dropped them, and reported on the source's validation images)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "a.pt"), "--data", str(small_root), "--split", "val",
                 "--bootstrap", "5", "--no-figures", "--out", str(tmp_path / "m.json")]) == 2
    assert "are among the images" in capsys.readouterr().err and not (tmp_path / "m.json").exists()
    assert main(["drift", str(tmp_path / "a.pt"), "--data", str(small_root / "test")]) in (0, 1, 2)
    assert "no validation scores in this checkpoint" in capsys.readouterr().out  # not another model's scores


def test_adapt_leaves_out_what_the_input_checks_flag(bn_run, tmp_path, caplog, capsys):
    require_shared()
    from tests.data.dicom_factory import write_dicom
    unlabelled = write_site(tmp_path / "site", "test", 16, labelled=False)
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(unlabelled / "0_blank.png")
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(unlabelled / "1_blank.png")
    xray = np.asarray(Image.open(sorted((SHARED_DATA / "val" / "NORMAL").iterdir())[0]).convert("L"))
    write_dicom(unlabelled / "2_lateral.dcm", xray.astype(np.uint16) * 16, ViewPosition="LL", PatientAge="003Y")
    assert main(["adapt", str(bn_run / "best.pt"), "--data", str(unlabelled), "--out", str(tmp_path / "a.pt"),
                 "--device", "cpu"]) == 0
    adaptation = load_checkpoint(tmp_path / "a.pt")["adaptation"]
    assert adaptation["site_images"] == 32 and adaptation["left_out_by_input_checks"] == 3
    assert "adapt leaves out 3 of the site's 35 image(s) that the input checks flag (first: " in caplog.text
    (unlabelled / sorted(p.name for p in unlabelled.iterdir() if p.name.startswith("N_"))[0]).unlink()
    assert main(["adapt", str(bn_run / "best.pt"), "--data", str(unlabelled), "--out", str(tmp_path / "b.pt"),
                 "--device", "cpu"]) == 2  # 31 left: refused, naming the flagged ones
    assert "31 distinct readable image(s) the input checks do not flag (3 flagged); adapt needs at least 32" in \
           capsys.readouterr().err


def test_what_an_adapted_checkpoint_records_for_the_refusal():
    """Hand-checked: the source's validation images and a threshold refit it keeps; the labelled site images the
    weights were fine-tuned on whatever was refitted (recorded only as the threshold's images, they escaped a
    later calibration-only refusal); nothing when the source recorded nothing (int8 export then compared an
    empty list and refused)."""
    from pneumonia_cnn.adaptation import adapted_reference
    source = {"reference": {"val": {"fingerprints": ["a1", "a2"], "labels": [0, 1], "raw_scores": [0.1, 0.9]},
                            "threshold_fit": {"split": "site", "fingerprints": ["s1"]}}}
    assert adapted_reference(source, None) == {"val": {"fingerprints": ["a1", "a2"], "labels": [0, 1]},
                                               "threshold_fit": {"split": "site", "fingerprints": ["s1"]}}
    for recalibrated in (False, True):
        tuned = {"fingerprints": ["t1"], "labels": [1], "recalibrated": recalibrated}
        assert adapted_reference(source, tuned) == {"val": {"fingerprints": ["a1", "a2", "t1"], "labels": [0, 1, 1]}}
    assert adapted_reference({}, None) == {}
    assert adapted_reference({}, {"fingerprints": ["t1"], "labels": [0], "recalibrated": False}) == \
        {"val": {"fingerprints": ["t1"], "labels": [0]}}


def test_the_kept_out_comparison_prints_every_metric_with_its_interval():
    """Only the ROC AUC had its interval: sensitivity and specificity on 14 kept-out images showed none."""
    from pneumonia_cnn.adaptation import format_adaptation

    def metrics(auc, sensitivity, specificity):
        return {"roc_auc": {"value": auc, "ci95": [auc - 0.1, 1.0]},
                "sensitivity": {"value": sensitivity, "ci95": [0.5, 1.0]},
                "specificity": {"value": specificity, "ci95": [0.25, 0.875]}}
    result = {"checkpoint": "a.pt", "out": "b.pt", "adabn_layers": 20, "unlabelled_images": 40, "fine_tune_epochs": 1,
              "labelled_images": 24, "kept_out_images": 14, "cv_auc_by_epoch": [0.9, 0.95],
              "kept_out": {"before": metrics(0.875, 0.75, 0.625), "after": metrics(0.9, 1.0, 0.5)},
              "verdict": "adapted model is better", "threshold_refitted": True, "calibration_refitted": False,
              "threshold_policy": "sensitivity:0.95",
              "ood_fitted_on": {"text": "the new site's 64 image(s)", "reference_images": 32, "bound_images": 32}}
    lines = format_adaptation(result).splitlines()
    assert lines[3] == ("before on 14 kept-out images: ROC AUC 0.875 [0.775, 1.000]  sensitivity 0.750 [0.500, "
                        "1.000]  specificity 0.625 [0.250, 0.875]")
    assert lines[4] == (" after on 14 kept-out images: ROC AUC 0.900 [0.800, 1.000]  sensitivity 1.000 [0.500, "
                        "1.000]  specificity 0.500 [0.250, 0.875]")


@pytest.mark.parametrize("epochs, said", [
    (0, "re-estimated on the site's images (cross-validation chose no fine-tuning)"),
    (3, "re-estimated on the site's images and fine-tuned for 3 epoch(s)")])
def test_the_adapt_batch_decision_says_how_the_weights_changed(epochs, said):
    """With no epoch of fine-tuning chosen it had said the source decision no longer described "the fine-tuned
    weights"."""
    from pneumonia_cnn.adaptation import adapt_batch_decision
    assert adapt_batch_decision({"decision_adapted": {}}, "labelled/", epochs) == (
        "the decision refitted on the site's labelled images (the source's, fitted with AdaBN on its validation "
        f"images, does not describe these weights, {said})")


def test_labelled_images_also_among_the_sites_count_once_in_the_detectors_references():
    from pneumonia_cnn.adaptation import site_references
    images = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2)  # six different 2 x 2 images
    unlabelled, labelled = images[:4], np.stack([images[1], images[4], images[4], images[5]])
    references, added = site_references(unlabelled, labelled)
    assert added == 2 and references.tolist() == images.tolist()  # 1 was in --data and 4 came twice
    assert site_references(unlabelled, images[:0])[1] == 0


def test_a_labelled_adapt_that_kept_a_given_threshold_says_so():
    """train's default policy is the given probability 0.5: adapt --labelled refits neither it nor (without
    --recalibrate) the calibration, yet info said refitting "needs --labelled" and --adapt-batch's decision was
    called "refitted on the site's labelled images"."""
    from pneumonia_cnn.adaptation import adapt_batch_decision
    from pneumonia_cnn.info import _kept_by_adapt
    assert adapt_batch_decision({}, "lab/", 2, refitted=False) == (
        "the plain decision, kept by adapt (a given probability threshold; --recalibrate refits the calibration) "
        "(the source's, fitted with AdaBN on its validation images, does not describe these weights, re-estimated "
        "on the site's images and fine-tuned for 2 epoch(s))")
    kept = {"labelled": "lab/", "threshold_refitted_on_site": False, "calibration_refitted_on_site": False}
    assert _kept_by_adapt({"adapted": kept}) == (
        "; with the source checkpoint's weights, before adapt re-estimated and fine-tuned them on the site's images "
        "(kept by adapt --labelled: the threshold is a given probability; --recalibrate refits the calibration)")
    assert _kept_by_adapt({"adapted": dict(kept, threshold_refitted_on_site=True)}) == ""
    assert "refitting needs --labelled" in _kept_by_adapt({"adapted": dict(kept, labelled=None)})


def test_the_verdict_is_not_better_when_the_adapted_model_misses_more_pneumonia():
    """A review's toy site: AUC 0.500 -> 1.000 at an equal balanced accuracy (0.5), sensitivity 1.000 -> 0.000, had
    been "better"; that model then called 27 of 30 other pneumonia X-rays NORMAL."""
    from pneumonia_cnn.data.site_checks import adaptation_verdict

    def metrics(auc, sensitivity, specificity):
        return {"roc_auc": {"value": auc}, "balanced_accuracy": {"value": (sensitivity + specificity) / 2},
                "sensitivity": {"value": sensitivity}}

    assert adaptation_verdict(metrics(0.5, 1.0, 0.0), metrics(1.0, 0.0, 1.0)) == (
        False, "adapted model is NOT better on the kept-out images (ROC AUC +0.500, balanced accuracy at the "
               "threshold +0.000) (it misses more pneumonia: sensitivity 1.000 -> 0.000): keep using the original "
               "model for this site")
    assert adaptation_verdict(metrics(0.80, 0.90, 0.50), metrics(0.90, 0.86, 0.70)) == (
        True, "adapted model is better on the kept-out images (ROC AUC +0.100, balanced accuracy at the threshold "
              "+0.080)")  # 0.04 less sensitive, 0.20 more specific: within the 0.05 allowed
    assert adaptation_verdict(metrics(0.80, 0.90, 0.50), metrics(0.90, 0.84, 0.72))[0] is False  # 0.06 less
    assert adaptation_verdict(metrics(0.80, 18 / 20, 0.50), metrics(0.90, 17 / 20, 0.70))[0] is True  # 0.05 exactly
    unknown = [dict(metrics(auc, 0.5, 0.5), sensitivity={"value": float("nan")}) for auc in (0.8, 0.9)]
    assert adaptation_verdict(*unknown)[0] is True  # no sensitivity to compare: the AUC rule alone


def test_adapt_judges_with_that_rule():
    """adapt's own verdict on kept-out scores: every pneumonia called positive before, none after, at an equal
    balanced accuracy and a higher AUC."""
    from pneumonia_cnn.adaptation import _verdict
    labels = np.array([0, 0, 0, 1, 1, 1])
    before = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.9])  # all PNEUMONIA: sensitivity 1, specificity 0, AUC 0.5
    after = np.array([0.1, 0.1, 0.1, 0.3, 0.3, 0.3])  # all NORMAL at 0.5, though ranked perfectly: AUC 1
    result = {}
    _verdict(labels, np.arange(6), before, 0.5, after, 0.5, 0, result)
    assert result["improved"] is False and "(it misses more pneumonia: sensitivity 1.000 -> 0.000)" in result["verdict"]
