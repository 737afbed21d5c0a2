"""Out-of-distribution flags and input checks, on shared X-rays and on images that are not chest X-rays."""
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from pneumonia_cnn.cli import main
from pneumonia_cnn.data.readers import ImageMeta
from pneumonia_cnn.inference import Predictor
from pneumonia_cnn.ood import input_warnings
from tests.conftest import SHARED_DATA, link_subset, require_shared


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory):
    """A model fitted on a few hundred real X-rays, so the OOD threshold is meaningful."""
    require_shared()
    from pneumonia_cnn.training import make_config, train
    root = link_subset(tmp_path_factory.mktemp("ood_data"), {"train": 300, "val": 420}, seed=1)  # all of val
    out = tmp_path_factory.mktemp("ood_run")
    train(make_config("tutorial", data=str(root), out=str(out), epochs=2, size=64, batch_size=32,
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
    warnings = input_warnings(xray, dicom, {"age_range_years": [0.5, 6]})
    assert len(warnings) == 4 and any("CT" in w for w in warnings) and any("45 years" in w for w in warnings)
    ok = ImageMeta("DICOM", (224, 224), tags={"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "AP",
                                              "PatientAge": "003Y"})
    assert input_warnings(xray, ok, {"age_range_years": [0.5, 6]}) == []


def test_info_states_intended_use_and_flag(ood_run, capsys):
    assert main(["info", str(ood_run / "best.pt")]) == 0
    text = capsys.readouterr().out
    assert "intended use" in text and "children aged 1 to 5" in text and "not a medical device" in text
    assert "out-of-distribution flag: fitted" in text
