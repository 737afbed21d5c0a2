"""Out-of-distribution flags and input checks, on shared X-rays, adults' X-rays and images that are not chest
X-rays; the taps (one forward pass, ONNX, threads); the DICOM age rule; detectors stored by older versions."""
import io
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from pneumonia_cnn.cli import main
from pneumonia_cnn.data.readers import ImageMeta, read_image
from pneumonia_cnn.inference import Predictor
from pneumonia_cnn.models import create_model
from pneumonia_cnn.ood import (
    REDUCTIONS,
    OODDetector,
    TappedModel,
    default_taps,
    extract,
    flag_message,
    flag_reasons,
    input_warnings,
)
from tests.conftest import SHARED, SHARED_DATA, link_subset, require_shared
from tests.data.dicom_factory import write_dicom

ADULTS = SHARED / "data" / "adult_xray_dev"
KAGGLE_USE = {"population": "children aged 1 to 5 years, anterior-posterior chest X-rays from routine care at "
                            "Guangzhou Women and Children's Medical Center (Kermany et al., 2018)",
              "age_range_years": [1, 5]}


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory):
    """A model fitted on a few hundred real X-rays, so the OOD threshold is meaningful."""
    require_shared()
    from pneumonia_cnn.training import make_config, train
    root = link_subset(tmp_path_factory.mktemp("ood_data"), {"train": 5000, "val": 5000}, seed=1)  # all of train, val
    out = tmp_path_factory.mktemp("ood_run")
    train(make_config("tutorial", data=str(root), out=str(out), epochs=1, size=64, batch_size=32, ood_quantile=0.95,
                      cache_dir=str(tmp_path_factory.mktemp("ood_cache")), progress=False, min_val_images=10,
                      evaluate_test=False))
    return out


def not_xrays(folder):
    folder.mkdir(parents=True, exist_ok=True)
    images = {name: getattr(skimage_data, name)() for name in
              ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "text", "page")}
    images["blank"] = np.full((256, 256), 128, np.uint8)
    images["noise"] = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    xray = np.asarray(Image.open(sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]).convert("L"))
    images["inverted_xray"] = 255 - xray
    images["xray_corner"] = np.asarray(Image.fromarray(xray[:70, :70]).resize((224, 224)))
    paths = []
    for name, array in images.items():
        Image.fromarray(array).save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


def test_every_non_xray_is_flagged_and_few_xrays_are(ood_run, tmp_path):
    predictor = Predictor(ood_run / "best.pt", "cpu")
    flagged = {p.path: p for p in predictor.predict_files(not_xrays(tmp_path / "other"))}
    for path, prediction in flagged.items():
        assert prediction.in_distribution is False, path
        assert prediction.probability is not None and prediction.warnings  # still answered, but marked
    test_files = sorted((SHARED_DATA / "test").glob("*/*.jpeg"))
    rate = np.mean([not p.in_distribution for p in predictor.predict_files(test_files)])
    assert rate <= 0.05, f"{rate:.1%} of the shared test folder flagged"


def test_most_adult_xrays_are_flagged(ood_run):
    """Adults from other hospitals (never used to fit or to set the threshold) are outside the population."""
    if not ADULTS.is_dir():
        pytest.skip(f"adult X-rays not available: {ADULTS} is absent")
    predictor = Predictor(ood_run / "best.pt", "cpu")
    rates = {source: np.mean([not p.in_distribution for p in
                              predictor.predict_files(sorted((ADULTS / source).glob("*.jpeg")))])
             for source in ("covid_collection", "actualmed")}
    # this 64 x 64, one-epoch model: 62% of covid_collection measured (the detector before taps: 30-39%); the
    # built-in model flags 95% and 94% (README)
    assert all(rate >= 0.5 for rate in rates.values()), rates


def test_flag_in_predict_json_and_evaluate(ood_run, tmp_path, capsys):
    import json
    paths = not_xrays(tmp_path / "o")[:2]
    assert main(["predict", str(ood_run), *map(str, paths), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(row["in_distribution"] is False and isinstance(row["ood_score"], float) for row in rows)


def test_model_free_input_checks():
    xray = np.asarray(Image.open(sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]).convert("L"))
    assert input_warnings(xray) == []
    assert "blank" in input_warnings(np.full((64, 64), 30, np.uint8))[0]
    assert "noise" in input_warnings(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))[0]
    assert "colour" in input_warnings(xray, ImageMeta("JPEG", (224, 224), saturation=0.4))[0]
    dicom = ImageMeta("DICOM", (224, 224), tags={"Modality": "CT", "BodyPartExamined": "KNEE", "ViewPosition": "LAT",
                                                 "PatientAge": "045Y"})
    warnings_ = input_warnings(xray, dicom, {"age_range_years": [0.5, 6]})
    assert len(warnings_) == 4 and any("CT" in w for w in warnings_) and any("45 years" in w for w in warnings_)
    ok = ImageMeta("DICOM", (224, 224), tags={"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "AP",
                                              "PatientAge": "003Y"})
    assert input_warnings(xray, ok, {"age_range_years": [0.5, 6]}) == []


def test_info_states_intended_use_and_flag(ood_run, capsys):
    assert main(["info", str(ood_run / "best.pt")]) == 0
    text = capsys.readouterr().out
    assert "intended use" in text and "children aged 1 to 5" in text and "not a medical device" in text
    assert "out-of-distribution flag: fitted" in text
    assert "outside the training population (children 1–5 years, one hospital): the probability is not reliable" in text


def test_flag_message_names_the_population():
    assert flag_message(KAGGLE_USE) == ("outside the training population (children 1–5 years, one hospital): "
                                        "the probability is not reliable")
    assert "(patients 18–90 years)" in flag_message({"population": "adults from two hospitals",
                                                     "age_range_years": [18, 90]})


# ------------------------------------------------------------------ DICOM age
def child_xray_dicom(path, **tags):
    xray = np.asarray(Image.open(sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]).convert("L"))
    return write_dicom(path, xray.astype(np.uint16) * 16, **{"Modality": "DX", "BodyPartExamined": "CHEST",
                                                             "ViewPosition": "AP", **tags})


@pytest.mark.parametrize("tags, words", [
    ({"PatientAge": "045Y"}, "patient age 45 years"),
    ({"PatientAge": "072M"}, "patient age 6 years"),  # 72 months: just past the range's 5 years
    ({"PatientBirthDate": "19800101", "StudyDate": "20250101"}, "patient age 45 years"),
    ({"PatientBirthDate": "20240101", "AcquisitionDate": "20240301"}, "patient age 0.164 years"),  # 60 days old
])
def test_dicom_age_outside_the_population_forces_the_flag(tmp_path, tags, words):
    require_shared()
    gray, meta = read_image(child_xray_dicom(tmp_path / "a.dcm", **tags), (64, 64))
    reasons = flag_reasons(gray, meta, KAGGLE_USE)
    assert len(reasons) == 1 and reasons[0].startswith(words) and "(1-5 years)" in reasons[0], reasons


@pytest.mark.parametrize("tags", [{"PatientAge": "003Y"}, {"PatientAge": "018M"},
                                  {"PatientBirthDate": "20200101", "StudyDate": "20230101"},
                                  {"PatientAge": "unknown"}, {"PatientBirthDate": "20200101"}, {}])
def test_dicom_age_inside_the_range_or_unknown_does_not_flag(tmp_path, tags):
    require_shared()
    gray, meta = read_image(child_xray_dicom(tmp_path / "c.dcm", **tags), (64, 64))
    assert flag_reasons(gray, meta, KAGGLE_USE) == []
    assert "blank" in flag_reasons(np.full((64, 64), 9, np.uint8), meta, KAGGLE_USE)[0]  # not an X-ray: flagged


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # lower case, as some sites write it
@pytest.mark.parametrize("tags, words", [
    ({"Modality": "CT"}, "DICOM modality CT (CR/DX/DR/RG expected)"),
    ({"Modality": "mr"}, "DICOM modality MR (CR/DX/DR/RG expected)"),
    ({"BodyPartExamined": "KNEE"}, "DICOM body part KNEE"),
    ({"BodyPartExamined": "ABDOMEN"}, "DICOM body part ABDOMEN"),
    ({"ViewPosition": "LL"}, "DICOM view LL (PA/AP expected)"),
    ({"ViewPosition": "LATERAL"}, "DICOM view LATERAL (PA/AP expected)"),
    ({"ViewPosition": "PAL"}, "DICOM view PAL (PA/AP expected)"),  # a word that starts like PA is not PA
    ({"ViewPosition": "PORTABLE AP"}, "DICOM view PORTABLE AP (PA/AP expected)"),  # the first word decides
    # the SOP class, whatever the Modality says (predict and serve scored these as chest X-rays)
    ({"Modality": "CR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"},
     "DICOM SOP class CT Image Storage is another modality's image, not an X-ray (its Modality CR notwithstanding)"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2"}, "DICOM SOP class Digital Mammography X-Ray Image Storage - For "
                                                     "Presentation is another modality's image, not an X-ray (its "
                                                     "Modality DX notwithstanding)"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.33"}, "DICOM SOP class Comprehensive SR Storage is not an image"),
    ({"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, "DICOM modality CT (CR/DX/DR/RG expected)"),
])
def test_dicom_that_is_not_a_frontal_chest_radiograph_forces_the_flag(tmp_path, tags, words):
    require_shared()
    gray, meta = read_image(child_xray_dicom(tmp_path / "n.dcm", PatientAge="003Y", **tags), (64, 64))
    assert flag_reasons(gray, meta, KAGGLE_USE) == [f"not a frontal chest radiograph: {words}"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # lower case, as some sites write it
@pytest.mark.parametrize("tags", [{"BodyPartExamined": "PORT CHEST"}, {"BodyPartExamined": "THORAX"},
                                  {"BodyPartExamined": "chest"}, {"ViewPosition": "AP SUPINE"},
                                  {"ViewPosition": "pa"}, {"Modality": "CR"}, {"Modality": "RG"},
                                  {"Modality": "DR"}, {"Modality": "dx"}, {"BodyPartExamined": "LUNG"},
                                  {"BodyPartExamined": "TORAX"}, {"BodyPartExamined": "TORACE"},
                                  {"ViewPosition": ["AP", "PORTABLE"]}, {"ViewPosition": "(PA)"},
                                  {"BodyPartExamined": "", "ViewPosition": ""},
                                  {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1"},
                                  {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1"},
                                  {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1.1"},
                                  {"SOPClassUID": "1.2.826.0.1.3680043.9.9999.1"}])  # a vendor's own class
def test_frontal_chest_radiographs_written_loosely_are_not_flagged(tmp_path, tags):
    require_shared()
    gray, meta = read_image(child_xray_dicom(tmp_path / "f.dcm", PatientAge="003Y", **tags), (64, 64))
    assert input_warnings(gray, meta, KAGGLE_USE) == [] and flag_reasons(gray, meta, KAGGLE_USE) == []


@pytest.mark.parametrize("modality", ["SC", "OT"])
def test_secondary_capture_is_warned_about_but_not_flagged(tmp_path, modality):
    require_shared()
    gray, meta = read_image(child_xray_dicom(tmp_path / "s.dcm", PatientAge="003Y", Modality=modality), (64, 64))
    assert input_warnings(gray, meta, KAGGLE_USE) == [
        f"DICOM modality {modality} (secondary capture or other): check that the image is a frontal chest radiograph"]
    assert flag_reasons(gray, meta, KAGGLE_USE) == []


def test_secondary_capture_class_under_a_radiograph_modality_is_warned_about_but_not_flagged(tmp_path):
    require_shared()
    gray, meta = read_image(child_xray_dicom(tmp_path / "s.dcm", PatientAge="003Y", Modality="DX",
                                             SOPClassUID="1.2.840.10008.5.1.4.1.1.7"), (64, 64))
    assert input_warnings(gray, meta, KAGGLE_USE) == [
        "DICOM SOP class Secondary Capture Image Storage (a secondary capture): check that the image is a frontal "
        "chest radiograph"]
    assert flag_reasons(gray, meta, KAGGLE_USE) == []


def test_accented_chest_names_are_the_chest():
    from pneumonia_cnn.ood.checks import dicom_kind_warnings
    assert dicom_kind_warnings({"BodyPartExamined": "TÓRAX"}) == []
    assert dicom_kind_warnings({"BodyPartExamined": "tórax"}) == []
    assert dicom_kind_warnings({"BodyPartExamined": "HÜFTE"}) == [
        "not a frontal chest radiograph: DICOM body part HÜFTE"]


def test_a_multi_valued_tag_reads_as_dicom_writes_it(tmp_path):
    require_shared()
    _, meta = read_image(child_xray_dicom(tmp_path / "m.dcm", ViewPosition=["AP", "PORTABLE"]), (64, 64))
    assert meta.tags["ViewPosition"] == "AP\\PORTABLE"


def test_predict_flags_a_lateral_view_whatever_its_score(ood_run, tmp_path):
    frontal = child_xray_dicom(tmp_path / "frontal.dcm", PatientAge="003Y")
    lateral = child_xray_dicom(tmp_path / "lateral.dcm", PatientAge="003Y", ViewPosition="LL")
    first, second = Predictor(ood_run / "best.pt", "cpu").predict_files([frontal, lateral])
    assert first.in_distribution is True and first.warnings == []  # the same pixels: only the header differs
    assert second.in_distribution is False and second.probability == pytest.approx(first.probability, abs=1e-9)
    assert second.warnings[0] == "not a frontal chest radiograph: DICOM view LL (PA/AP expected)"
    assert second.warnings[-1].startswith("outside the training population")


def test_predict_flags_an_adult_dicom(ood_run, tmp_path):
    path = child_xray_dicom(tmp_path / "adult.dcm", PatientAge="045Y")
    (prediction,) = Predictor(ood_run / "best.pt", "cpu").predict_files([path])
    assert prediction.in_distribution is False and any("patient age 45 years" in w for w in prediction.warnings)


def test_evaluate_flags_what_predict_flags_from_the_file_itself(ood_run, tmp_path):
    """Colour and DICOM headers are read when the cache is built and kept in its manifest (the age, never the
    birth date or the ID), so evaluate's flags equal predict's, on a fresh cache and on a reused one."""
    import json
    from pathlib import Path

    from pneumonia_cnn.evaluation.evaluate import evaluate
    root = link_subset(tmp_path / "data", {"test": 3})
    normal = root / "test" / "NORMAL"
    lateral = child_xray_dicom(normal / "lateral.dcm", PatientAge="003Y", ViewPosition="LL")
    adult = child_xray_dicom(normal / "adult.dcm", PatientBirthDate="19800101", StudyDate="20250101",
                             PatientID="SECRET-ID-42")
    colour = normal / "photo.jpg"
    Image.fromarray(skimage_data.astronaut()).resize((224, 224)).save(colour)
    frontal = child_xray_dicom(normal / "frontal.dcm", PatientAge="003Y")
    ct = child_xray_dicom(normal / "ct.dcm", PatientAge="003Y", Modality="CR", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    expected = {str(p.path): p.in_distribution is False
                for p in Predictor(ood_run / "best.pt", "cpu").predict_files(sorted((root / "test").rglob("*.*")))}
    assert [expected[str(p)] for p in (lateral, adult, colour, frontal, ct)] == [True, True, True, False, True]
    cache = tmp_path / "cache"

    def flags_agree(build):
        predicted = Predictor(ood_run / "best.pt", "cpu").predict_files(sorted((root / "test").rglob("*.*")))
        report = evaluate(ood_run / "best.pt", root, "test", cache_dir=cache, bootstrap=10, figures=False)
        assert {p["path"]: p["flagged"] for p in report["predictions"]} == \
               {str(p.path): p.in_distribution is False for p in predicted}, build

    flags_agree("fresh")
    flags_agree("reused")
    manifest = json.loads(next(cache.rglob("manifest.json")).read_text())
    assert manifest["version"] == 6 and "SECRET-ID-42" not in str(manifest) and "19800101" not in str(manifest)
    checked = {Path(e["path"]).name: e.get("checked") for e in manifest["entries"]}
    assert checked["photo.jpg"]["saturation"] > 0.15 and checked["lateral.dcm"]["tags"]["ViewPosition"] == "LL"
    assert float(checked["adult.dcm"]["tags"]["PatientAge"][:-1]) == pytest.approx(45.0, abs=0.01)
    assert checked["ct.dcm"]["tags"]["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.2"
    assert sum(c is None for c in checked.values()) == 6  # the shared PNG X-rays say nothing the checks read
    # partly changed: a new flagged DICOM sorting first, one rewritten to frontal, one removed, the rest reused
    child_xray_dicom(normal / "a_first.dcm", PatientAge="040Y")
    child_xray_dicom(lateral, PatientAge="003Y")
    colour.unlink()
    flags_agree("partly changed")


# ------------------------------------------------------------------ taps: one forward pass, ONNX, threads
def every_reduction_taps(model):
    last_conv = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)][-1]
    return default_taps(model) + [(last_conv, r) for r in REDUCTIONS] + [("input", r) for r in REDUCTIONS]


@pytest.mark.parametrize("name, channels, size", [("seed", 3, (64, 64)), ("resnet18_narrow", 1, (96, 80))])
def test_tapped_model_exports_to_onnx_with_the_same_outputs(name, channels, size):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(name, channels, size).eval()
    tapped = TappedModel(model, every_reduction_taps(model))
    names = ["logit"] + [f"tap{i}" for i in range(len(tapped.taps))]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tapped, (torch.rand(2, 1, *size),), buffer, dynamo=False, opset_version=17,
                          input_names=["image"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["image", *names]})
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, *size)
    with torch.inference_mode():
        logits, features = tapped(x)
    outputs = session.run(None, {"image": x.numpy()})
    assert len(outputs) == 1 + len(tapped.taps)
    for expected, got, tap in zip([logits, *features], outputs, ["logit", *tapped.taps]):
        assert got.shape == tuple(expected.shape), tap
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4, err_msg=str(tap))


def test_concurrent_forwards_on_one_wrapper_never_mix():
    torch.manual_seed(0)
    model = create_model("resnet18_narrow", 1, (64, 64)).eval()
    tapped = TappedModel(model, default_taps(model))
    inputs = [torch.rand(2, 1, 64, 64) for _ in range(6)]
    with torch.inference_mode():
        expected = [tapped(x) for x in inputs]
    failures, start = [], threading.Barrier(len(inputs) + 1)

    def run(index):
        start.wait()
        with torch.inference_mode():
            for _ in range(15):
                logits, features = tapped(inputs[index])
                if not all(torch.equal(a, b) for a, b in zip(features, expected[index][1])):
                    failures.append(index)

    def bare():  # forwards of the bare model on another thread are not captured by the wrapper's hooks
        start.wait()
        with torch.inference_mode():
            for _ in range(15):
                model(torch.zeros(1, 1, 64, 64))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))] + [threading.Thread(target=bare)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_module_that_runs_twice_cannot_be_tapped():
    model = create_model("seed", 3, (64, 64)).eval()  # its one ReLU module runs after every layer
    with pytest.raises(RuntimeError, match="more than once"):
        TappedModel(model, [("relu", "mean")])(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="no module 'nope'"):
        TappedModel(model, [("nope", "mean")])


@pytest.mark.parametrize("reduction", ["orientations4", "thumbnail4", "gram2"])
def test_a_map_reduction_on_a_dense_layer_is_a_clear_error(reduction):
    model = create_model("seed", 3, (64, 64)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=rf"{reduction}.* needs a \(batch, channels, height, width\) "
                                                          r"map; 'fc1' outputs \(1, 128\)"):
        TappedModel(model, [("fc1", reduction)])(torch.rand(1, 1, 64, 64))


# ------------------------------------------------------------------ storage: new and older checkpoints
def real_pixels(split, count, size=(64, 64)):
    files = sorted((SHARED_DATA / split / "NORMAL").iterdir())[:count] + \
        sorted((SHARED_DATA / split / "PNEUMONIA").iterdir())[:count]
    return np.stack([read_image(f, size)[0] for f in files]), np.r_[np.zeros(count, int), np.ones(count, int)]


def saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_fitted_detector_survives_the_checkpoint_and_flags_photographs():
    require_shared()
    torch.manual_seed(0)
    model = create_model("seed", 3, (64, 64)).eval()
    pixels, labels = real_pixels("train", 60)
    held, _ = real_pixels("val", 30)
    taps = default_taps(model)
    features, logits = extract(model, pixels, taps)
    held_features, held_logits = extract(model, held, taps)
    detector = OODDetector.fit(model, {"features": features, "logits": logits, "pixels": pixels, "labels": labels},
                               {"features": held_features, "logits": held_logits, "pixels": held}, quantile=0.95)
    assert detector.taps == taps
    loaded = OODDetector.from_state(saved_and_loaded(detector.state()))
    photos = np.stack([np.asarray(Image.fromarray(np.asarray(getattr(skimage_data, n)())).convert("L").resize((64, 64)))
                       for n in ("camera", "coins", "text", "moon")])
    photo_features, photo_logits = extract(model, photos, taps)
    np.testing.assert_allclose(loaded.score(photo_features, photo_logits, photos),
                               detector.score(photo_features, photo_logits, photos))
    assert (loaded.score(photo_features) > loaded.threshold).all()
    assert np.mean(loaded.score(held_features) > loaded.threshold) <= 0.1


def legacy_state_and_scores(model, pixels, labels, queries):
    """A detector as older versions fitted and stored it, and the scores their code gave ``queries``."""
    layers = list(model.feature_layers)
    captured = {}
    for name in layers:
        dict(model.named_modules())[name].register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(n, o))

    def pooled(images):
        with torch.inference_mode():
            model(torch.from_numpy(images).float().unsqueeze(1) / 255)
        return [(torch.cat([captured[n].mean((2, 3)), captured[n].std((2, 3))], 1) if captured[n].dim() == 4
                 else captured[n]).double().numpy() for n in layers]
    state = {"layers": layers, "means": [], "precisions": [], "centres": [], "scales": [], "threshold": 0.5,
             "quantile": 0.975}
    expected = []
    for features, query in zip(pooled(pixels), pooled(queries)):
        means = np.stack([features[labels == c].mean(0) for c in (0, 1)])
        centred = np.concatenate([features[labels == c] - means[c] for c in (0, 1)])
        covariance = centred.T @ centred / (len(centred) - 1)
        covariance = 0.9 * covariance + 0.1 * np.eye(len(covariance)) * np.trace(covariance) / len(covariance)
        precision = np.linalg.pinv(covariance)
        distance = np.sqrt(np.min([np.einsum("ij,jk,ik->i", query - m, precision, query - m) for m in means], 0))
        state["means"].append(torch.from_numpy(means)), state["precisions"].append(torch.from_numpy(precision))
        state["centres"].append(float(np.median(distance))), state["scales"].append(1.5)
        expected.append((distance - state["centres"][-1]) / 1.5)
    return state, np.mean(expected, axis=0)


def test_detector_stored_by_older_versions_loads_and_scores_as_before():
    require_shared()
    torch.manual_seed(0)
    model = create_model("seed", 3, (64, 64)).eval()
    pixels, labels = real_pixels("train", 40)
    queries, _ = real_pixels("test", 10)
    state, expected = legacy_state_and_scores(model, pixels, labels, queries)
    detector = OODDetector.from_state(saved_and_loaded(state))
    assert detector.taps == [("conv2", "mean_std"), ("conv3", "mean_std"), ("fc1", "mean_std")]
    features, _ = extract(model, queries, detector.taps)
    np.testing.assert_allclose(detector.score(features), expected, rtol=1e-6, atol=1e-8)
    assert detector.threshold == 0.5 and "Mahalanobis" in detector.describe()


@pytest.mark.parametrize("stripes, expected_bin", [("vertical", 7), ("horizontal", 3), ("diagonal", 1)])
def test_orientation_histogram_puts_each_edge_direction_in_its_bin(stripes, expected_bin):
    """Bins by doubled angle, centred at (k + 1/2 + 1/16) x 45 degrees: an edge across x (gradient along x,
    doubled angle 0) lies 19.7 degrees from bin 7's centre and 25.3 from bin 0's; along y (180) in bin 3; on
    the diagonal (90) in bin 1. A block with no edge is all zeros; one with edges sums to 1. Each bin is hit
    exactly (tolerance 1e-5): a bin off by one, or edges split between two bins, fails."""
    y, x = np.mgrid[:64, :64]
    coordinate = {"vertical": x, "horizontal": y, "diagonal": x + y}[stripes]
    image = torch.from_numpy(((coordinate // 4) % 2).astype(np.float32))[None, None]
    image[..., :, :32] = 0.5  # the left half: flat
    histogram = REDUCTIONS["orientations4"](image).reshape(8, 4, 4)
    assert histogram.shape == (8, 4, 4)
    np.testing.assert_allclose(histogram[:, :, 0].numpy(), 0)
    striped = histogram[:, 1:3, 3]  # blocks off the top and bottom edges, where padding bends the gradients
    np.testing.assert_allclose(striped[expected_bin].numpy(), 1, atol=1e-5)
    np.testing.assert_allclose(striped.sum(0).numpy(), 1, atol=1e-5)


@pytest.mark.parametrize("degrees, expected_bin", [(-1, 7), (0, 7), (1, 7), (89, 3), (90, 3), (91, 3),
                                                    (44, 1), (45, 1), (46, 1), (134, 5), (135, 5), (136, 5)])
def test_gradients_along_the_axes_and_diagonals_never_sit_on_a_bin_edge(degrees, expected_bin):
    """A ramp has one gradient direction everywhere. Axes and diagonals (where many pixels' gradients point
    exactly) lie inside a bin, 1.4 degrees from its edge: a degree either side lands in the same bin. Without
    the 1/16-bin turn, 0 and 1 degree would fall in different bins and rounding would decide 0 itself."""
    y, x = np.mgrid[:64, :64].astype(np.float64)
    angle = np.deg2rad(degrees)
    image = torch.from_numpy((0.004 * (x * np.cos(angle) + y * np.sin(angle))).astype(np.float32))[None, None]
    histogram = REDUCTIONS["orientations4"](image).reshape(8, 4, 4)[:, 1:3, 1:3]  # off the padded border
    np.testing.assert_allclose(histogram[expected_bin].numpy(), 1, atol=1e-3)  # the sum's 1e-6 guard: 6e-5 here


def test_neighbour_score_is_the_kth_nearest_distance_that_scikit_learn_finds():
    from sklearn.neighbors import NearestNeighbors

    from pneumonia_cnn.ood.scorers import NeighbourScore
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(300, 16)), rng.normal(size=(50, 16))
    scorer = NeighbourScore.fit(reference, k=7)
    expected, _ = NearestNeighbors(n_neighbors=7).fit(scorer.reference).kneighbors(NeighbourScore.normalise(queries))
    assert np.allclose(scorer.score(queries, chunk=16), expected[:, -1], atol=1e-6)
    assert NeighbourScore.fit(reference[:3], k=7).k == 3  # clamped to a tiny reference set


def test_the_flag_rule_is_one_and_flags_an_image_without_a_score():
    """predict's flag and the benchmarks' share the detector's rule (two copies differed on NaN: the benchmarks
    counted an image without a score in distribution)."""
    from types import SimpleNamespace

    from pneumonia_cnn.ood.detector import OODDetector
    rule = SimpleNamespace(threshold=2.0)
    assert OODDetector.flagged(rule, np.array([1.0, 2.0, 2.5, np.nan])).tolist() == [False, False, True, True]
