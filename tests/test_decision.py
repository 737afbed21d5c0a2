"""The decision path on a `best`-like run: one scoring path, fitted on what is served, and evaluate without
side effects."""
import csv
import hashlib
import io
import json
import logging
import re
import shutil

import numpy as np
import pytest

from pneumonia_cnn.calibration import fit_decision, logit
from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.cli import main
from pneumonia_cnn.inference import Predictor
from pneumonia_cnn.inference.bundle import decision_of


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def val_files(root):
    return sorted((root / "val").glob("*/*.jpeg"))


def predict_json(capsys, *args):
    assert main(["predict", *map(str, args), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_checkpoint_records_a_decision_fitted_on_the_served_scores(best_like_run):
    checkpoint = load_checkpoint(best_like_run / "best.pt")
    assert checkpoint["calibration"]["method"] in ("platt", "none")
    assert checkpoint["threshold_policy"] == "sensitivity:0.95"
    fit = checkpoint["decision_fit"]
    assert fit["engine"] == "onnx" and fit["precision"] == "float32" and fit["tta"] is True
    assert fit["images"] == 20 and set(fit["calibration_comparison"]) == {"platt", "temperature", "none"}
    assert (best_like_run / "calibration.png").stat().st_size > 1000
    assert len(checkpoint["reference"]["val"]["fingerprints"]) == 20


def test_refitting_from_predicts_own_outputs_gives_what_the_checkpoint_holds(best_like_run, small_root, capsys):
    rows = predict_json(capsys, best_like_run, *val_files(small_root))
    labels = np.array([1 if "/PNEUMONIA/" in row["path"] else 0 for row in rows])
    raw = np.array([row["raw_score"] for row in rows])
    checkpoint = load_checkpoint(best_like_run / "best.pt")
    refit = fit_decision(labels, raw, checkpoint["threshold_policy"], checkpoint["config"]["calibration"])
    assert refit.calibration.scale == pytest.approx(checkpoint["calibration"]["scale"], abs=1e-4)
    assert refit.calibration.bias == pytest.approx(checkpoint["calibration"]["bias"], abs=1e-4)
    assert refit.threshold == pytest.approx(checkpoint["threshold"], abs=1e-5)
    # and what predict printed is that calibration applied to that raw score
    probabilities = np.array([row["probability"] for row in rows])
    assert np.allclose(logit(probabilities), refit.calibration.logits(raw), atol=1e-4)
    called = probabilities[labels == 1] >= checkpoint["threshold"]
    assert called.mean() >= 0.95


def test_evaluate_predict_serve_and_onnx_export_agree(best_like_run, small_root, tmp_path, capsys):
    import httpx
    import onnxruntime

    from tests.serving.conftest import start_server
    files = sorted((small_root / "test").glob("*/*.jpeg"))
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), "--bootstrap", "20",
                 "--out", str(tmp_path / "m.json"), "--no-figures"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "m.json").read_text())
    evaluated = {row["path"]: row["probability"] for row in report["predictions"]}
    predicted = {row["path"]: row["probability"] for row in predict_json(capsys, best_like_run, *files)}
    assert set(evaluated) == set(predicted) == {str(f) for f in files}
    for path in files:
        assert evaluated[str(path)] == pytest.approx(predicted[str(path)], abs=1e-6)
    # each row holds the true label (0/1) and the label predict gives; the report states the rate
    labels = {row["path"]: row["label"] for row in predict_json(capsys, best_like_run, *files)}
    assert {row["path"]: row["predicted"] for row in report["predictions"]} == labels
    rows = report["predictions"]
    assert [row["label"] for row in rows] == [int("PNEUMONIA" in row["path"]) for row in rows]
    assert report["prevalence"] == pytest.approx(0.5) and report["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), "--bootstrap", "20",
                 "--out", str(tmp_path / "m02.json"), "--no-figures", "--prevalence", "0.2"]) == 0
    assert "probabilities for a pneumonia rate of 0.200" in capsys.readouterr().out
    shifted = json.loads((tmp_path / "m02.json").read_text())
    assert shifted["prevalence"] == 0.2  # an operating point: the same decisions at another rate
    assert shifted["metrics"]["confusion_matrix"] == report["metrics"]["confusion_matrix"]
    assert main(["export", str(best_like_run / "best.pt"), "--out", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    predictor = Predictor(best_like_run, "cpu")
    pixels = np.stack([predictor.preprocess_path(f)[0] for f in files]).astype(np.float32)[:, None] / 255
    exported = session.run(["probability"], {"image": pixels})[0]
    assert np.allclose(exported, [predicted[str(f)] for f in files], atol=1e-5)
    process, url = start_server(best_like_run / "best.pt")
    try:
        for path in files[:4]:
            answer = httpx.post(f"{url}/predict", files={"file": (path.name, path.read_bytes())}, timeout=60).json()
            assert answer["probability"] == pytest.approx(predicted[str(path)], abs=1e-6)
            assert answer["threshold"] == pytest.approx(load_checkpoint(best_like_run / "best.pt")["threshold"])
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_evaluate_never_writes_the_checkpoint_it_reads(best_like_run, small_root, tmp_path, capsys):
    checkpoint = best_like_run / "best.pt"
    before = sha256(checkpoint)
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(small_root), "--threshold", "youden",
                 "--bootstrap", "20", "--out", str(tmp_path / "m.json"), "--no-figures"]) == 0
    assert "decision refitted on val (20 images) for this evaluation: the threshold (youden), on the stored platt " \
           "calibration; from fewer than 100 images it is noisy" in capsys.readouterr().out
    assert sha256(checkpoint) == before

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(small_root), "--threshold", "0.9",
                 "--save-as", str(tmp_path / "high.pt"), "--bootstrap", "20", "--out", str(tmp_path / "n.json"),
                 "--no-figures"]) == 0
    assert sha256(checkpoint) == before
    saved = load_checkpoint(tmp_path / "high.pt")
    assert saved["threshold"] == 0.9 and json.loads((tmp_path / "n.json").read_text())["threshold"] == 0.9
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(small_root), "--threshold", "0.8",
                 "--save-as", str(checkpoint), "--no-figures", "--bootstrap", "5"]) == 2
    assert f"--save-as would overwrite {checkpoint}, which this command reads" in capsys.readouterr().err
    assert sha256(checkpoint) == before


def test_a_threshold_alone_keeps_the_stored_calibration(best_like_run, small_root, tmp_path, capsys):
    """--threshold refits the threshold only: a probability keeps the meaning the checkpoint gave it. Refitted on
    another split (train here, so that a refitted calibration would differ from the stored one)."""
    from pneumonia_cnn.calibration import Calibration, choose_threshold
    stored = load_checkpoint(best_like_run / "best.pt")
    common = ["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), "--val-split", "train",
              "--bootstrap", "20", "--no-figures"]
    assert main([*common, "--threshold", "0.5", "--out", str(tmp_path / "fixed.json")]) == 0
    fixed = json.loads((tmp_path / "fixed.json").read_text())
    assert fixed["calibration"] == stored["calibration"] and fixed["threshold"] == 0.5
    assert fixed["decision_refit"]["refitted"] == ["threshold"]
    assert "the threshold (0.5), on the stored platt calibration" in capsys.readouterr().out
    assert main([*common, "--threshold", "youden", "--out", str(tmp_path / "youden.json")]) == 0
    youden = json.loads((tmp_path / "youden.json").read_text())
    train = sorted((small_root / "train").glob("*/*.jpeg"))
    raw = [p.raw_score for p in Predictor(best_like_run, "cpu").predict_files(train)]
    probabilities = Calibration.from_dict(stored["calibration"]).probabilities(raw)
    expected = choose_threshold([int("PNEUMONIA" in str(p)) for p in train], probabilities, "youden")
    assert youden["calibration"] == stored["calibration"]
    assert youden["threshold"] == pytest.approx(expected, abs=1e-6)
    capsys.readouterr()
    # naming a calibration refits both (here none: the stored Platt scale is replaced by 1)
    assert main([*common, "--threshold", "youden", "--calibration", "none", "--out", str(tmp_path / "both.json")]) == 0
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["decision_refit"]["refitted"] == ["threshold", "calibration"]
    assert both["calibration"]["scale"] == 1.0 and abs(stored["calibration"]["scale"] - 1.0) > 1e-3
    assert "the threshold (youden) and the none calibration" in capsys.readouterr().out




def test_a_threshold_refitted_alone_still_refuses_the_calibrations_images(best_like_run, small_root, tmp_path,
                                                                            capsys):
    """The kept calibration was fitted on the run's val: evaluating val stays refused after a threshold-only refit
    on train, also from a checkpoint saved with it, which keeps val as its calibration's reference and adds the
    threshold's train images; naming a calibration alone refits it with the stored threshold policy."""
    stored = load_checkpoint(best_like_run / "best.pt")
    refit = ["--val-split", "train", "--threshold", "youden", "--bootstrap", "5", "--no-figures"]
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), "--split", "val",
                 *refit]) == 2
    assert "'s calibration was fitted on; metrics there would flatter" in capsys.readouterr().err
    saved = tmp_path / "t.pt"
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), *refit,
                 "--save-as", str(saved), "--out", str(tmp_path / "m.json")]) == 0
    checkpoint = load_checkpoint(saved)
    assert checkpoint["calibration"] == stored["calibration"] and checkpoint["threshold"] != stored["threshold"]
    assert checkpoint["reference"]["val"] == stored["reference"]["val"]  # drift and ensembles read it
    assert len(checkpoint["reference"]["threshold_fit"]["fingerprints"]) == 48  # the 48 train images
    assert checkpoint["reference"]["threshold_fit"]["split"] == "train"
    assert checkpoint["decision_fit"]["threshold_refit"]["split"] == "train"
    assert checkpoint["decision_fit"]["split"] == stored["decision_fit"]["split"] == "val"
    for split, what in (("val", "threshold and calibration"), ("train", "threshold and calibration")):
        assert main(["evaluate", "--checkpoint", str(saved), "--data", str(small_root), "--split", split,
                     "--bootstrap", "5", "--no-figures"]) == 2, split
        assert f"'s {what} was fitted on" in capsys.readouterr().err
    assert main(["info", str(saved)]) == 0
    assert "; the threshold refitted since on 48 train images" in capsys.readouterr().out
    again = tmp_path / "t2.pt"  # its threshold refitted once more, on test: train's images are no longer its
    assert main(["evaluate", "--checkpoint", str(saved), "--data", str(small_root), "--split", "train",
                 "--val-split", "test", "--threshold", "youden", "--bootstrap", "5", "--no-figures",
                 "--save-as", str(again), "--out", str(tmp_path / "again.json")]) == 0
    second = load_checkpoint(again)
    assert second["reference"]["threshold_fit"]["split"] == "test"
    assert len(second["reference"]["threshold_fit"]["fingerprints"]) == 20
    assert second["reference"]["val"] == stored["reference"]["val"]
    recalibrated = tmp_path / "t3.pt"  # a calibration refit replaces the reference and drops the threshold's
    assert main(["evaluate", "--checkpoint", str(saved), "--data", str(small_root), "--split", "train",
                 "--calibration", "platt", "--bootstrap", "5", "--no-figures", "--save-as", str(recalibrated)]) == 0
    third = load_checkpoint(recalibrated)
    assert "threshold_fit" not in third["reference"] and "threshold_refit" not in third["decision_fit"]
    assert len(third["reference"]["val"]["fingerprints"]) == 20 and third["decision_fit"]["split"] == "val"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), "--calibration", "none",
                 "--bootstrap", "5", "--no-figures", "--out", str(tmp_path / "c.json")]) == 0
    alone = json.loads((tmp_path / "c.json").read_text())
    assert alone["threshold_policy"] == stored["threshold_policy"] and alone["calibration"]["method"] == "none"
    assert alone["decision_refit"]["refitted"] == ["threshold", "calibration"]

def test_evaluate_refuses_the_images_a_decision_was_fitted_on(best_like_run, small_root, tmp_path, capsys):
    # the run's own validation folder
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), "--split", "val",
                 "--no-figures"]) == 2
    error = capsys.readouterr().err
    assert "20 of the 20 evaluated images are among the images" in error and error.count("\n") == 1
    # a test folder holding one validation X-ray under another name: caught by its content
    copy_root = tmp_path / "copy"
    shutil.copytree(small_root / "test", copy_root / "test", symlinks=True)
    shutil.copy(val_files(small_root)[0], copy_root / "test" / "NORMAL" / "renamed.jpeg")
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(copy_root), "--no-figures",
                 "--out", str(tmp_path / "copy_metrics.json")]) == 2  # not the run's own test_metrics.json
    assert "1 of the 21 evaluated images" in capsys.readouterr().err
    # a CSV with no split: refitting "on val" would fit on the evaluated images themselves
    listing = tmp_path / "images.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        for path in sorted((small_root / "test").glob("*/*.jpeg")):
            writer.writerow([str(path), path.parent.name])
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(listing), "--threshold", "youden",
                 "--no-figures", "--out", str(tmp_path / "listing_metrics.json")]) == 2
    assert "refitted decision" in capsys.readouterr().err


def test_prevalence_given_and_estimated(best_like_run, small_root, capsys, caplog):
    caplog.set_level(logging.INFO)
    files = sorted((small_root / "test").glob("*/*.jpeg"))
    plain = predict_json(capsys, best_like_run, *files)
    checkpoint = load_checkpoint(best_like_run / "best.pt")
    prior = checkpoint["calibration"]["prior"]
    assert prior == pytest.approx(10 / 20)  # small_root's val: 10 NORMAL, 10 PNEUMONIA
    shifted = predict_json(capsys, best_like_run, *files, "--prevalence", "0.2")
    shift = logit(0.2) - logit(prior)
    for a, b in zip(plain, shifted):
        assert logit(b["probability"]) == pytest.approx(logit(a["probability"]) + shift, abs=1e-6)
        assert a["label"] == b["label"]  # sensitivity:0.95 is a place on the ROC curve: the threshold moves along
    assert shifted[0]["threshold"] == pytest.approx(float(1 / (1 + np.exp(-(logit(checkpoint["threshold"]) + shift)))))
    # every output names the rate its probabilities are for (the log line alone is lost in a redirect)
    assert all(row["prevalence"] == pytest.approx(0.5) for row in plain)
    assert {row["prevalence"] for row in shifted} == {0.2}
    assert main(["predict", str(best_like_run), str(files[0]), "--prevalence", "0.2", "--format", "csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert float(row["prevalence"]) == 0.2
    assert main(["predict", str(best_like_run), str(files[0]), "--prevalence", "0.2", "--format", "fhir"]) == 0
    (observation,) = json.loads(capsys.readouterr().out)["contained"]
    stated = [c for c in observation["component"] if c["code"]["coding"][0]["code"] == "prevalence"]
    assert [c["valueQuantity"]["value"] for c in stated] == [0.2]
    estimated = predict_json(capsys, best_like_run, *files, *val_files(small_root), "--prevalence", "estimate")
    assert re.search(r"rate of 0\.\d+, estimated from this batch \(\d+ in-distribution images", caplog.text)
    assert estimated[0]["probability"] != plain[0]["probability"]
    rate = float(re.search(r"rate of (0\.\d+), estimated", caplog.text).group(1))
    assert estimated[0]["prevalence"] == pytest.approx(rate, abs=5e-4)
    assert main(["predict", str(best_like_run), str(files[0]), "--prevalence", "1.5"]) == 2


def test_adapt_batch_reestimates_on_a_large_enough_batch(best_like_run, small_root, capsys, caplog):
    caplog.set_level(logging.INFO)
    files = sorted((small_root / "test").glob("*/*.jpeg")) + val_files(small_root)  # 40 images
    plain = predict_json(capsys, best_like_run, *files)
    adapted = predict_json(capsys, best_like_run, *files, "--adapt-batch")
    adapted_count = re.search(r"re-estimated on this batch \((\d+) in-distribution images", caplog.text)
    assert adapted_count and 32 <= int(adapted_count.group(1)) <= 40
    differences = np.abs(np.array([a["probability"] - b["probability"] for a, b in zip(plain, adapted)]))
    assert differences.max() > 1e-4
    predict_json(capsys, best_like_run, *files[:10], "--adapt-batch")
    assert "not adapted: 10 in-distribution images, fewer than 32" in caplog.text



def test_a_refit_with_adapt_batch_refits_the_adapted_decision_too(best_like_run, small_root, tmp_path, capsys):
    """--adapt-batch classifies with the decision fitted after AdaBN; a refit replaces that one too (it used to
    keep the training's adapted threshold while the table said the threshold was refitted), and --save-as
    stores it."""
    stored = load_checkpoint(best_like_run / "best.pt")
    assert stored["decision_adapted"]["threshold"] != pytest.approx(0.5, abs=0.05)  # or the test proves nothing
    saved = tmp_path / "t.pt"
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), "--split", "train",
                 "--threshold", "0.5", "--adapt-batch", "--bootstrap", "5", "--no-figures", "--save-as", str(saved),
                 "--out", str(tmp_path / "m.json")]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert any("re-estimated on this batch" in note for note in report["notes"])  # 48 images: adapted
    assert report["threshold"] == 0.5 and report["calibration"] == stored["decision_adapted"]["calibration"]
    assert report["decision_refit"]["adapted_refitted"] is True
    assert "--adapt-batch's own decision refitted the same way" in capsys.readouterr().out
    assert load_checkpoint(saved)["decision_adapted"]["threshold"] == 0.5
    only_saved = tmp_path / "s.pt"  # --save-as alone (no --adapt-batch) stores the refitted adapted decision too
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(small_root), "--split", "train",
                 "--threshold", "0.9", "--bootstrap", "5", "--no-figures", "--save-as", str(only_saved)]) == 0
    assert load_checkpoint(only_saved)["decision_adapted"] == {
        "calibration": stored["decision_adapted"]["calibration"], "threshold": 0.9, "threshold_policy": "0.9"}


@pytest.mark.parametrize("calibration", [None, "platt"])
def test_the_refitted_adapted_decision_is_fitted_as_adapt_batch_serves(best_like_run, small_root, tmp_path,
                                                                        calibration):
    """Re-done by hand: AdaBN on val's images the detector does not flag (its 4 PNEUMONIA images leave fewer than
    8 of a class by any labels, so the class mix is drawn by the images' own labels; at the class mix the adapted
    calibration states: the stored one for a threshold alone, val's own when the calibration is refitted), then
    the refit on every image's scores."""
    from dataclasses import replace

    from PIL import Image

    from pneumonia_cnn.calibration import Calibration, choose_threshold
    from pneumonia_cnn.inference import load_bundle
    from pneumonia_cnn.inference.adabn import adapt_batch_norm
    root = tmp_path / "skewed"  # val at another class mix (10 NORMAL, 4 PNEUMONIA) than the stored one's
    (root / "val").mkdir(parents=True)
    (root / "train").symlink_to(small_root / "train")
    for name, count in (("NORMAL", 10), ("PNEUMONIA", 4)):
        (root / "val" / name).mkdir()
        for path in sorted((small_root / "val" / name).iterdir())[:count]:
            (root / "val" / name / path.name).symlink_to(path)
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(root / "val" / "NORMAL" / "blank.jpeg")  # flagged
    xray = np.asarray(Image.open(val_files(small_root)[0]).convert("L"), np.uint8)  # flagged by its colour
    Image.fromarray(np.stack([xray, xray // 2, xray // 4], axis=-1)).save(root / "val" / "NORMAL" / "tinted.jpeg")
    checkpoint = load_checkpoint(best_like_run / "best.pt")
    bundle = load_bundle(checkpoint)
    predictor = Predictor(bundle, "cpu")
    pixels = np.stack([predictor.preprocess_path(f)[0] for f in val_files(root)])
    metas = [predictor.preprocess_path(f)[1] for f in val_files(root)]
    labels = np.array([int("PNEUMONIA" in str(f)) for f in val_files(root)])
    scores = predictor.score(pixels)
    raw = scores.raw
    inside = np.array([c["in_distribution"] is not False for c in predictor.flags(pixels, scores, metas)])
    assert inside.sum() == len(inside) - 2  # the blank and the tinted one are left out of the statistics
    stored_adapted = Calibration.from_dict(checkpoint["decision_adapted"]["calibration"])
    if calibration is None:
        cal = Calibration.from_dict(checkpoint["calibration"])
        threshold = choose_threshold(labels, cal.probabilities(raw), "youden")
        pseudo, rate = cal.probabilities(raw) >= threshold, stored_adapted.prior
    else:
        main_fit = fit_decision(labels, raw, "youden", calibration)
        pseudo, rate = main_fit.probabilities(raw) >= main_fit.threshold, labels.mean()
    assert stored_adapted.prior != pytest.approx(labels.mean())  # the two rates differ here: the test can tell
    assert (pseudo[inside] != labels[inside].astype(bool)).any()  # and the two ways of drawing the mix
    adapted = adapt_batch_norm(bundle, pixels[inside], labels[inside].astype(bool), rate)
    adapted_raw = Predictor(replace(adapted, ood=None), "cpu").score(pixels).raw
    if calibration is None:
        expected = (stored_adapted.to_dict(), choose_threshold(labels, stored_adapted.probabilities(adapted_raw),
                                                               "youden"))
    else:
        fitted = fit_decision(labels, adapted_raw, "youden", calibration)
        expected = (fitted.calibration.to_dict(), fitted.threshold)
    options = ["--calibration", calibration] if calibration else []
    assert main(["evaluate", "--checkpoint", str(best_like_run), "--data", str(root), "--split", "train",
                 "--threshold", "youden", *options, "--adapt-batch", "--bootstrap", "5", "--no-figures",
                 "--out", str(tmp_path / "m.json")]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["threshold"] == pytest.approx(expected[1], abs=1e-5)
    assert report["calibration"] == pytest.approx(expected[0], abs=1e-4) if calibration else \
        report["calibration"] == expected[0]
    assert re.fullmatch(r"the class mix drawn by the images' labels: only \d of the 14 distinct in-distribution "
                        r"images scored (NORMAL|PNEUMONIA) before adaptation, fewer than 8",
                        report["decision_refit"]["adapted_class_mix"])

def test_an_ensemble_fits_its_own_threshold_and_keeps_the_ood_check(best_like_run, small_root, cache_dir, tmp_path,
                                                                     capsys, monkeypatch):
    from pneumonia_cnn.training import make_config, train
    second = tmp_path / "second"
    train(make_config("best", data=str(small_root), out=str(second), epochs=2, size=64, batch_size=16, seed=7,
                      cache_dir=str(cache_dir), progress=False, min_val_images=10, evaluate_test=False,
                      early_stopping=0))
    members = [load_checkpoint(best_like_run / "best.pt"), load_checkpoint(second / "best.pt")]
    ensemble = Predictor([best_like_run, second], "cpu")
    references = [m["reference"]["val"] for m in members]
    mean_raw = (np.array(references[0]["raw_scores"]) + np.array(references[1]["raw_scores"])) / 2
    method = decision_of(members[0]).calibration.method  # the members' method ("platt" here; "none" if it won)
    expected = fit_decision(references[0]["labels"], mean_raw, "sensitivity:0.95", method)
    assert ensemble.threshold == pytest.approx(expected.threshold)
    assert ensemble.threshold != pytest.approx(np.mean([m["threshold"] for m in members]))
    assert ensemble.ood is not None and "fitted on the ensemble's own validation scores" in ensemble.notes[0]
    files = sorted((small_root / "test").glob("*/*.jpeg"))[:5]
    rows = predict_json(capsys, best_like_run, second, "--", *files)
    assert all(isinstance(row["ood_score"], float) and row["in_distribution"] is not None for row in rows)
    single = [Predictor(run, "cpu").predict_files(files) for run in (best_like_run, second)]
    for index, row in enumerate(rows):  # the ensemble's raw score is the mean of its members' raw scores
        assert row["raw_score"] == pytest.approx((single[0][index].raw_score + single[1][index].raw_score) / 2,
                                                 abs=1e-5)
    # a member whose threshold evaluate refitted on other images: the ensemble cannot keep that fit, and says so
    assert main(["evaluate", "--checkpoint", str(second), "--data", str(small_root), "--threshold", "youden",
                 "--val-split", "test", "--split", "train", "--save-as", str(tmp_path / "refit.pt"), "--bootstrap", "5",
                 "--no-figures", "--out", str(tmp_path / "m.json")]) == 0
    refitted = Predictor([best_like_run, tmp_path / "refit.pt"], "cpu")
    assert "member 2's threshold was refitted on test images (20)" in refitted.notes[1]
    assert refitted.threshold == pytest.approx(ensemble.threshold) and len(ensemble.notes) == 1
    # --adapt-batch: each member adapted as it was when it stored the adapted validation scores the ensemble's
    # adapted decision is fitted on, i.e. as its own --adapt-batch adapts (they had been adapted together, by the
    # ensemble's pseudo-labels: a review measured raw scores 0.08 apart and sensitivity 0.932 at 0.95)
    from pneumonia_cnn.inference import predictor as predictor_module
    monkeypatch.setattr(predictor_module, "MIN_ADAPT_PER_CLASS", 0)  # these tiny members may score one class
    batch = np.stack([ensemble.preprocess_path(f)[0] for f in sorted(small_root.glob("*/*/*.jpeg"))[:44]])
    flags = [[e["in_distribution"] for e in Predictor(run, "cpu").assess(batch)[0]] for run in (best_like_run, second)]
    batch = batch[[a == b for a, b in zip(*flags)]]  # where the members' detectors agree (the first one's decides)
    assert len(batch) >= 40
    together, notes = Predictor([best_like_run, second], "cpu", adapt_batch=True).assess(batch)
    assert any("re-estimated on this batch" in n for n in notes)
    alone = [Predictor(run, "cpu", adapt_batch=True).assess(batch)[0] for run in (best_like_run, second)]
    expected = (np.array([e["raw_score"] for e in alone[0]]) + np.array([e["raw_score"] for e in alone[1]])) / 2
    assert np.abs(np.array([e["raw_score"] for e in together]) - expected).max() < 1e-5
    # a member that would not adapt alone (too few of a class by its own pseudo-labels): the batch is not adapted
    plain = [e["label"] for e in Predictor([best_like_run, second], "cpu").assess(batch)[0]]
    assert 1 <= plain.count("PNEUMONIA") < len(plain)  # the ensemble's own pseudo-labels pass a floor of 1
    monkeypatch.setattr(predictor_module, "MIN_ADAPT_PER_CLASS", 1)
    own = predictor_module.member_pseudo_labels
    monkeypatch.setattr(predictor_module, "member_pseudo_labels",  # member 2 scores every image NORMAL
                        lambda bundle, logits: [own(bundle, logits)[0], np.zeros(len(logits[1]), bool)])
    entries, notes = Predictor([best_like_run, second], "cpu", adapt_batch=True).assess(batch)
    assert not any(e["batch_adapted"] for e in entries)
    assert any(n.startswith(f"not adapted: member 2 alone: 0 of the {len(batch)} in-distribution images scored "
                            f"PNEUMONIA before adaptation, fewer than 1") for n in notes), notes


def test_batch_adaptation_uses_a_decision_fitted_the_same_way(best_like_run, small_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_CNN_CACHE", str(tmp_path / "cache"))
    """--adapt-batch's threshold was fitted on val scored after AdaBN on val (resampled to val's class mix, here by
    the images' labels: the pseudo-labels hold fewer than 8 of a class): re-doing that by hand gives it."""
    from dataclasses import replace

    from pneumonia_cnn.inference import load_bundle
    from pneumonia_cnn.inference.adabn import adapt_batch_norm
    checkpoint = load_checkpoint(best_like_run / "best.pt")
    bundle = load_bundle(checkpoint)
    predictor = Predictor(bundle, "cpu")
    pixels = np.stack([predictor.preprocess_path(f)[0] for f in val_files(small_root)])
    labels = [int("PNEUMONIA" in str(f)) for f in val_files(small_root)]
    plain = Predictor(bundle, "cpu").score(pixels)
    pseudo = plain.probabilities >= checkpoint["threshold"]
    assert min(pseudo.sum(), (~pseudo).sum()) < 8  # so the labels draw the class mix
    adapted = adapt_batch_norm(bundle, pixels, np.array(labels, bool), float(np.mean(labels)))
    raw = Predictor(replace(adapted, ood=None), "cpu").score(pixels).raw
    expected = fit_decision(labels, raw, "sensitivity:0.95", checkpoint["config"]["calibration"])
    assert checkpoint["decision_adapted"]["threshold"] == pytest.approx(expected.threshold, abs=1e-5)
    assert bundle.adapted_decision.threshold == pytest.approx(expected.threshold, abs=1e-5)
    batch = np.concatenate([pixels, np.stack([predictor.preprocess_path(f)[0]
                                              for f in sorted((small_root / "test").glob("*/*.jpeg"))])])
    onnx_cache = tmp_path / "cache" / "onnx"
    cached = sorted(onnx_cache.glob("*.onnx"))  # the plain graph, exported above (ONNX Runtime engine)
    assert cached or Predictor(bundle, "cpu").scorer.engine.name == "torch"
    entries, notes = Predictor(bundle, "cpu", adapt_batch=True).assess(batch)  # 40 images: enough to adapt
    assert "re-estimated on this batch" in notes[0]
    assert sorted(onnx_cache.glob("*.onnx")) == cached  # a batch's own statistics are not kept in the cache
    assert entries[0]["threshold"] == pytest.approx(expected.threshold, abs=1e-5)  # not the plain one
    assert expected.threshold != pytest.approx(checkpoint["threshold"], abs=1e-5)


def test_balanced_sample_draws_the_reference_class_mix():
    from pneumonia_cnn.inference.adabn import balanced_sample
    pseudo = np.array([True] * 3 + [False] * 7)  # a batch at 30%
    drawn = balanced_sample(pseudo, 0.75)
    assert len(drawn) == 20 and pseudo[drawn].sum() == 15  # 75% of 2n, from the 3 positives
    assert set(drawn[pseudo[drawn]]) <= {0, 1, 2} and set(drawn[~pseudo[drawn]]) <= set(range(3, 10))
    assert list(balanced_sample(np.array([True, True]), 0.75)) == [0, 1]  # one class only: as it is


def test_adapt_batch_answers_do_not_depend_on_the_order_or_on_repeated_files():
    """AdaBN's statistics depend on which images share a forward pass: the same 40 X-rays in another order
    moved probabilities by up to 0.57 and flipped labels, and six files sent six times were adapted on as 36
    images (a hostile audit, 2026-11-27). The set is now taken distinct, in the order of its content."""
    from tests.conftest import SHARED_DATA, require_shared
    require_shared()
    predictor = Predictor("builtin", "cpu", adapt_batch=True)
    files = [p for name in ("NORMAL", "PNEUMONIA") for p in sorted((SHARED_DATA / "test" / name).iterdir())[:20]]
    pixels = np.stack([predictor.preprocess_path(f)[0] for f in files])
    first, notes = predictor.assess(pixels)
    assert any("re-estimated on this batch (" in note for note in notes)
    order = np.random.default_rng(0).permutation(len(pixels))
    again, _ = predictor.assess(pixels[order])
    shuffled_back = np.empty(len(pixels))
    shuffled_back[order] = [entry["probability"] for entry in again]
    np.testing.assert_allclose(shuffled_back, [entry["probability"] for entry in first], atol=1e-6)
    _, notes = predictor.assess(np.concatenate([pixels[:6]] * 6))
    assert "not adapted: 6 in-distribution images, fewer than 32" in notes


def test_adaptation_passes_pseudo_negatives_first_as_the_decision_was_fitted(monkeypatch):
    """The adapted decision was fitted after AdaBN on validation images class folder by class folder; taken
    in the order of their content alone, the classes mixed in each pass and the simulated site at 30% fell
    below plain (README's table)."""
    from pneumonia_cnn.inference import adabn, load_bundle
    passed = []
    monkeypatch.setattr(adabn, "reestimate_batch_norm", lambda model, pixels, tta=False: passed.append(pixels))
    pixels = np.stack([np.full((8, 8), value, np.uint8) for value in range(10)])
    adabn.adapt_batch_norm(load_bundle("builtin"), pixels[::-1], pixels[::-1, 0, 0] % 2 == 1, 0.5)
    values = passed[0][:, 0, 0]
    assert len(values) == 20 and all(values[:10] % 2 == 0) and all(values[10:] % 2 == 1)


def test_the_adapted_decision_is_fitted_on_the_images_adapt_batch_adapts_on(small_root, cache_dir, tmp_path):
    """--adapt-batch re-estimates batch-norm statistics on the images the detector does not flag; the end of
    training adapted on every validation image (20 of the built-in model's 559 differ). A blank image in val
    (always flagged) must be left out of the statistics; train now leaves it out of val altogether."""
    from dataclasses import replace

    from PIL import Image

    from pneumonia_cnn.experiment import train_and_evaluate
    from pneumonia_cnn.inference import load_bundle
    from pneumonia_cnn.inference.adabn import adapt_batch_norm
    from pneumonia_cnn.training import make_config
    root = tmp_path / "site"
    for split in ("train", "test"):
        (root / split).parent.mkdir(parents=True, exist_ok=True)
        (root / split).symlink_to(small_root / split)
    shutil.copytree(small_root / "val", root / "val")
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(root / "val" / "NORMAL" / "blank.png")
    # a colour photograph of a chest X-ray: flagged only by what its file says of itself (predict's metas)
    xray = np.asarray(Image.open(sorted((small_root / "val" / "NORMAL").glob("*.jpeg"))[0]).convert("L"), np.uint8)
    tinted = np.stack([xray, (xray * 0.4).astype(np.uint8), (xray * 0.2).astype(np.uint8)], axis=-1)
    Image.fromarray(tinted).save(root / "val" / "NORMAL" / "tinted.png")
    config = make_config("best", data=str(root), out=str(tmp_path / "run"), epochs=2, size=64, batch_size=16,
                         cache_dir=str(cache_dir), progress=False, min_val_images=10, early_stopping=0,
                         warmup_epochs=0.5)
    train_and_evaluate(config)
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    bundle = load_bundle(checkpoint)
    predictor = Predictor(bundle, "cpu")
    files = sorted((root / "val").glob("*/*"))
    pixels = np.stack([predictor.preprocess_path(f)[0] for f in files])
    metas = [predictor.preprocess_path(f)[1] for f in files]
    labels = np.array([int("PNEUMONIA" in str(f)) for f in files])
    plain = predictor.score(pixels)
    inside = np.array([c["in_distribution"] is not False for c in predictor.flags(pixels, plain, metas)])
    odd = [f.name in ("blank.png", "tinted.png") for f in files]
    assert not inside[odd].any() and inside.sum() == len(files) - 2
    by_pixels_alone = np.array([c["in_distribution"] is not False for c in predictor.flags(pixels, plain)])
    assert by_pixels_alone.sum() == len(files) - 1  # the tinted one is flagged by its file's colour only
    pseudo = bundle.decision.positive(plain.raw)
    # this 2-epoch model scores fewer than 8 of val's 20 images as one class: --adapt-batch would not adapt on
    # such a batch, so the fit draws the class mix by the images' labels
    assert min(pseudo[inside].sum(), (~pseudo[inside]).sum()) < 8

    kept = ~np.array(odd)  # train leaves both out of val: the input checks flag them whatever the score

    def fitted(chosen, drawn_by=None):
        drawn_by = labels.astype(bool) if drawn_by is None else drawn_by
        adapted = adapt_batch_norm(bundle, pixels[chosen], drawn_by[chosen], float(labels[kept].mean()))
        raw = Predictor(replace(adapted, ood=None), "cpu").score(pixels[kept]).raw  # every kept image scored
        return fit_decision(labels[kept], raw, "sensitivity:0.95", checkpoint["config"]["calibration"])

    expected, on_all, on_pixels = fitted(inside), fitted(np.ones_like(inside)), fitted(by_pixels_alone)
    assert checkpoint["decision_adapted"]["threshold"] == pytest.approx(expected.threshold, abs=1e-5)
    assert checkpoint["decision_adapted"]["calibration"] == pytest.approx(expected.calibration.to_dict(), abs=1e-5)
    for other in (on_all, on_pixels, fitted(inside, pseudo)):  # the test can tell them apart
        assert abs(other.calibration.bias - expected.calibration.bias) > 1e-4
