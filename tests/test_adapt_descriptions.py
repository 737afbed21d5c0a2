"""After ``adapt``, info and the report described the detector's k-NN references as "the training images" though
adapt refitted them on the site's images, and after ``adapt --labelled`` the ``decision_fit`` record still named
the source's validation images (and a ``threshold_fixed`` it no longer held)."""
import pytest
import torch

from pneumonia_cnn import builtin
from tests.conftest import SHARED_DATA, require_shared

SITE_REFERENCES = "to 32 of the new site's 64 images (adapt's references, not the training images)"


def _site_folders(root):
    """40 unlabelled test images and 12 labelled val images per class (the labelled join the detector's refit)."""
    require_shared()
    unlabelled, labelled = root / "site", root / "labelled"
    unlabelled.mkdir()
    for path in sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:40]:
        (unlabelled / path.name).symlink_to(path)
    for name in ("NORMAL", "PNEUMONIA"):
        (labelled / name).mkdir(parents=True)
        for path in sorted((SHARED_DATA / "val" / name).iterdir())[:12]:
            (labelled / name / path.name).symlink_to(path)
    return unlabelled, labelled


def _adapt(source, root, out, recalibrate=False):
    from pneumonia_cnn.adaptation import adapt
    unlabelled, labelled = _site_folders(root)
    result = adapt(source, unlabelled, out, labelled=labelled, device="cpu", recalibrate=recalibrate, max_epochs=1,
                   folds=2)
    return result, torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapted")
    result, saved = _adapt("builtin", root, root / "adapted.pt")
    return root / "adapted.pt", result, saved


def test_an_adapted_detectors_references_are_named_as_the_sites_images(adapted, tmp_path):
    from pneumonia_cnn.info import describe_checkpoint
    from pneumonia_cnn.ood import METHOD
    from pneumonia_cnn.ood.scorers import THREE_VIEW_METHOD
    path, _, saved = adapted
    assert SITE_REFERENCES in saved["ood"]["method"]
    card = describe_checkpoint(str(path))
    assert SITE_REFERENCES in card and "to the training images" not in card
    assert "among those references' cross-fitted distances" in card
    # adapted before adapt stored the site's wording: its ood_fitted_on record says whose images they are,
    # whether the training method it stored names five views or the three of detectors before the content box
    for stored in (METHOD, THREE_VIEW_METHOD):
        older = dict(saved, ood=dict(saved["ood"], method=stored))
        torch.save(older, tmp_path / "older.pt")
        assert SITE_REFERENCES in describe_checkpoint(str(tmp_path / "older.pt"))
    # the site's detector has the three whole-frame views (ood.site_recipe), and says so
    assert [tuple(t)[1] for t in saved["ood"]["taps"]] == ["mean_std", "thumbnail4", "orientations4"]
    assert "in three L2-normalised views" in card
    # never adapted: still the training images, as it was fitted
    assert "k-NN distances (Sun et al., 2022) to the training images" in describe_checkpoint(builtin.NAME)


def test_adapt_with_labels_records_the_site_images_its_threshold_was_refitted_on(adapted):
    from pneumonia_cnn.info import describe_checkpoint
    path, result, saved = adapted
    source = torch.load(builtin.checkpoint_path(), weights_only=False)["decision_fit"]
    assert result["threshold_refitted"]  # sensitivity:0.95, chosen again on the site's out-of-fold scores
    refit = saved["decision_fit"]["threshold_refit"]
    tuned = result["labelled_images"] - result["kept_out_images"]
    assert (refit["split"], refit["images"], refit["engine"]) == ("labelled site", tuned, "torch")
    # the calibration was kept, and so is the record of the images it was fitted on
    assert (saved["decision_fit"]["split"], saved["decision_fit"]["images"]) == (source["split"], source["images"])
    assert f"the threshold refitted since on {tuned} labelled site images, scored by the torch engine" \
        in describe_checkpoint(str(path))


def test_adapt_recalibrated_from_a_fixed_threshold_describes_the_site_refit(tmp_path):
    from pneumonia_cnn.adaptation import format_adaptation
    from pneumonia_cnn.info import describe_checkpoint
    source = torch.load(builtin.checkpoint_path(), weights_only=False)
    # as evaluate --threshold 0.4 --save-as writes it
    source.update(threshold=0.4, threshold_policy="0.4", decision_fit=dict(source["decision_fit"], threshold_fixed=0.4))
    torch.save(source, tmp_path / "fixed.pt")
    result, saved = _adapt(tmp_path / "fixed.pt", tmp_path, tmp_path / "adapted.pt", recalibrate=True)
    tuned = result["labelled_images"] - result["kept_out_images"]
    fit = saved["decision_fit"]
    assert (fit["split"], fit["images"], fit["data"]) == ("labelled site", tuned, str(tmp_path / "labelled"))
    assert "calibration_comparison" not in fit and "threshold_refit" not in fit
    # a given probability is not refitted by the site's scores: still 0.4, and still said to be fixed
    assert saved["threshold"] == pytest.approx(0.4) and fit["threshold_fixed"] == pytest.approx(0.4)
    assert not result["threshold_refitted"] and not saved["adaptation"]["threshold_refitted_on_site"]
    assert "decision threshold kept from the source checkpoint (a given probability, 0.4, fitted on no images)" \
        in format_adaptation(result)
    assert f"fitted on: {tuned} labelled site images, scored by the torch engine in float32" \
        in describe_checkpoint(str(tmp_path / "adapted.pt"))


def test_a_refitted_threshold_drops_threshold_fixed():
    from pneumonia_cnn.adaptation import adapted_decision_fit
    source = {"split": "val", "images": 559, "engine": "onnx", "threshold_fixed": 0.4}
    site = {"split": "labelled site", "images": 16, "engine": "torch"}
    assert adapted_decision_fit(source, site, threshold_refitted=True, recalibrated=True) == site
    assert adapted_decision_fit(source, site, threshold_refitted=True, recalibrated=False) == {
        "split": "val", "images": 559, "engine": "onnx", "threshold_refit": site}
    assert adapted_decision_fit(source, site, threshold_refitted=False, recalibrated=False) == source
    assert adapted_decision_fit(source, None, threshold_refitted=False, recalibrated=False) == source


def test_adapt_with_labels_drops_the_sources_adapt_batch_decision_and_says_what_adapt_batch_uses(adapted):
    """The source's --adapt-batch decision (fitted with AdaBN on its validation images) was copied unchanged
    onto the fine-tuned, site-refitted checkpoint: --adapt-batch then decided with the source's threshold
    (0.93) where plain scoring used the site's."""
    import numpy as np

    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.info import describe_checkpoint
    path, _, saved = adapted
    assert "decision_adapted" in torch.load(builtin.checkpoint_path(), weights_only=False)
    assert "decision_adapted" not in saved
    assert saved["adaptation"]["adapt_batch_decision"].startswith("the decision refitted on the site's labelled")
    assert f"  --adapt-batch decision: {saved['adaptation']['adapt_batch_decision']}" in \
        describe_checkpoint(str(path)).splitlines()
    images = [*sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:20],
              *sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:20]]  # 32 at least: adapted
    plain = Predictor(path, "cpu")
    batch = Predictor(path, "cpu", adapt_batch=True)
    predictions = batch.predict_files(images)
    assert {p.threshold for p in predictions} == {plain.bundle.decision.threshold} == {saved["threshold"]}
    assert np.isclose(saved["threshold"], plain.predict_files(images)[0].threshold)
    assert "fitted without batch adaptation (refitted on the site's labelled images by adapt)" in " ".join(
        batch.last_notes)


def test_adapt_batch_with_an_int8_engine_is_refused_in_one_line():
    """The AdaBN-adapted weights have no int8 graph: each batch failed with "no int8 model for these weights
    yet; build it once", which building could not fix (serve: HTTP 500 on every /predict/batch)."""
    from pneumonia_cnn.errors import PneumoniaCNNError
    from pneumonia_cnn.inference import Predictor
    for engine in ("onnx-int8", "openvino-int8"):
        with pytest.raises(PneumoniaCNNError, match=rf"^--adapt-batch with --engine {engine}: batch adaptation "
                                                    r"re-estimates the batch-norm statistics.*use --engine onnx "
                                                    r"or torch$"):
            Predictor(builtin.NAME, "cpu", engine=engine, adapt_batch=True)


KEPT_BY_ADAPT = ("; with the source checkpoint's weights, before adapt re-estimated their batch-norm statistics on "
                 "the site's images (kept, not refitted on these weights: refitting needs --labelled)")


def test_info_says_an_unlabelled_adapt_kept_the_decision_fitted_on_the_source_weights(adapted, tmp_path):
    """info had said "threshold and calibration fitted on: 559 val images" for weights adapt had changed."""
    from pneumonia_cnn.adaptation import adapt
    from pneumonia_cnn.info import describe_checkpoint
    unlabelled, _ = _site_folders(tmp_path)
    adapt("builtin", unlabelled, tmp_path / "unlabelled.pt", device="cpu")
    line = next(line for line in describe_checkpoint(str(tmp_path / "unlabelled.pt")).splitlines()
                if line.startswith("threshold and calibration fitted on: "))
    assert line.startswith("threshold and calibration fitted on: 559 val images") and line.endswith(KEPT_BY_ADAPT)
    for refitted in (str(adapted[0]), builtin.NAME):  # refitted on the site's labelled images; never adapted
        assert KEPT_BY_ADAPT not in describe_checkpoint(refitted)


def test_info_and_the_report_describe_the_adaptation_in_words(adapted, tmp_path):
    """info printed the adaptation and training records as Python dicts, and the report had no word of the
    adaptation (nor of the threshold refitted on the site)."""
    from pneumonia_cnn.evaluation.report import write_report
    from pneumonia_cnn.info import describe_checkpoint
    path, result, saved = adapted
    record = saved["adaptation"]
    share = f"{record['outside_source_population']:.1%}"
    tuned = result["labelled_images"] - result["kept_out_images"]
    site, labelled = tmp_path.parent / "adapted0" / "site", tmp_path.parent / "adapted0" / "labelled"
    lines = describe_checkpoint(str(path)).splitlines()
    assert lines[lines.index("trained on: 4137 images from ../shared/data/chest_xray_224/train at 192x192") + 1:][
        -6:] == [
        f"adapted to a new site: 40 distinct unlabelled image(s) from {site} (0 left out by the input checks, "
        f"0 copies counted once); the source checkpoint flagged {share} of them as outside its training population",
        "  AdaBN: 20 batch-norm layer(s) re-estimated on them",
        f"  labelled images from {labelled}: {result['fine_tune_epochs']} fine-tuning epoch(s) chosen by "
        "cross-validation; refitted on them: threshold",
        "  out-of-distribution detector refitted on the new site's 64 image(s) (40 unlabelled, 24 labelled), not "
        "the training or validation images",
        f"  --adapt-batch decision: {record['adapt_batch_decision']}",
        f"  verdict on the kept-out labelled images: {record['verdict']}"]
    assert not any("'site_data'" in line or "'images':" in line for line in lines)  # the records' dicts
    data = tmp_path / "data"
    for name in ("NORMAL", "PNEUMONIA"):  # test images: neither the labelled site's nor the calibration's val
        (data / "test" / name).mkdir(parents=True)
        for image in sorted((SHARED_DATA / "test" / name).iterdir())[-4:]:
            (data / "test" / name / image.name).symlink_to(image)
    page = write_report(path, data, "test", out=tmp_path / "r.html", device="cpu", bootstrap=20,
                        stress=False).read_text()
    assert (f"<h2>Adaptation to a new site</h2><p>Adapted to a new site: 40 distinct unlabelled image(s) from "
            f"{site} (0 left out by the input checks") in page
    assert "<li>AdaBN: 20 batch-norm layer(s) re-estimated on them</li>" in page
    assert f"<li>verdict on the kept-out labelled images: {record['verdict']}</li>" in page.replace("&#x27;", "'")
    assert (f"The checkpoint records 4137 training images, a decision fitted on 559 val images and its threshold "
            f"refitted since on {tuned} labelled site images.") in page
    assert "Trained on 4137 images from ../shared/data/chest_xray_224/train at 192x192." in page
    never = write_report("builtin", data, "test", out=tmp_path / "b.html", device="cpu", bootstrap=20,
                         stress=False).read_text()
    assert "Adaptation to a new site" not in never
    # no run folder beside the built-in model: its curves are drawn from the checkpoint's history (no section before)
    assert "<h2>Training curves</h2><div class='figs'><img" in never and "Drawn from the checkpoint's history" in never


def test_scoring_with_a_model_adapt_judged_worse_warns(tmp_path, caplog):
    """adapt saved the checkpoint whatever its verdict and said "keep using the original model" once; predict,
    serve and pacs then scored with it without a word."""
    from pneumonia_cnn.inference import Predictor
    source = torch.load(builtin.checkpoint_path(), weights_only=False)
    verdict = ("adapted model is NOT better on the kept-out images (ROC AUC +0.000, balanced accuracy at the "
               "threshold -0.088): keep using the original model for this site")
    for name, improved in (("worse.pt", False), ("better.pt", True)):
        torch.save(dict(source, adaptation={"site_data": "site", "improved": improved, "verdict": verdict}),
                   tmp_path / name)
    caplog.clear()
    Predictor(tmp_path / "worse.pt", "cpu")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'worse.pt'}: adapt judged this model NOT better than its source on the site's kept-out images "
        "(ROC AUC +0.000, balanced accuracy at the threshold -0.088); the source checkpoint is the one to use for "
        "that site"]
    missed = ("adapted model is NOT better on the kept-out images (ROC AUC +0.500, balanced accuracy at the threshold "
              "+0.000) (it misses more pneumonia: sensitivity 1.000 -> 0.000): keep using the original model for this "
              "site")
    torch.save(dict(source, adaptation={"site_data": "site", "improved": False, "verdict": missed}),
               tmp_path / "missed.pt")
    caplog.clear()
    Predictor(tmp_path / "missed.pt", "cpu")  # the reason is said too: the figures alone read as no loss
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'missed.pt'}: adapt judged this model NOT better than its source on the site's kept-out images "
        "(ROC AUC +0.500, balanced accuracy at the threshold +0.000) (it misses more pneumonia: sensitivity 1.000 -> "
        "0.000); the source checkpoint is the one to use for that site"]
    caplog.clear()
    Predictor(tmp_path / "better.pt", "cpu"), Predictor("builtin", "cpu")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
