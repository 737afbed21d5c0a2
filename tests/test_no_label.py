"""README (Intended use): an image that is not an X-ray (blank, noise, a colour photograph) is scored and flagged,
but given no label: a blank image had been labelled PNEUMONIA at 0.9967 in every output, a positive FHIR
interpretation and an SR finding "Present" included, so an interface reading only the label recorded pneumonia."""
import csv
import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from pneumonia_cnn.cli import main
from pneumonia_cnn.interop.dicom_sr import ModelIdentity, build_sr, read_sr
from tests.conftest import SHARED_DATA, link_subset, require_shared
from tests.interop.studies import xray_dicom


def blank_and_noise(folder):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((300, 300), 128, np.uint8)).save(folder / "blank.png")
    noise = np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    return folder / "blank.png", folder / "noise.png"


def test_predict_gives_no_label_to_what_is_not_an_xray_in_every_format(tmp_path, capsys):
    require_shared()
    blank, noise = blank_and_noise(tmp_path)
    xray = SHARED_DATA / "test" / "PNEUMONIA" / sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0].name
    files = [str(blank), str(noise), str(xray)]
    assert main(["predict", *files, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["label"] for row in rows] == [None, None, "PNEUMONIA"]
    assert rows[0]["probability"] > 0.99 and rows[0]["in_distribution"] is False  # still scored, and flagged
    assert rows[0]["warnings"][0] == "not an X-ray: the image is blank (almost uniform)"
    assert main(["predict", *files, "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["label"] for row in table] == ["", "", "PNEUMONIA"]
    assert main(["predict", *files]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[2:4] for line in lines] == [["no", "label"], ["no", "label"], ["PNEUMONIA", "yes"]]
    assert main(["predict", *files, "--format", "fhir"]) == 0
    report = json.loads(capsys.readouterr().out)
    observations = report["contained"]
    assert ["interpretation" in o for o in observations] == [False, False, True]
    assert observations[2]["interpretation"][0]["coding"][0]["code"] == "POS"
    label = observations[0]["component"][0]
    assert label["code"]["text"] == "Label at the operating threshold" and "valueCodeableConcept" not in label
    assert label["dataAbsentReason"]["coding"][0]["code"] == "not-applicable"
    assert report["conclusion"].startswith("3 image(s): 1 PNEUMONIA, 2 without a label (not a chest X-ray); "
                                           "2 outside the training population")


def test_explain_says_no_label(tmp_path, capsys):
    blank, _ = blank_and_noise(tmp_path / "in")
    assert main(["explain", str(blank), "--out", str(tmp_path / "maps")]) == 0
    assert capsys.readouterr().out.split(" -> ")[0].endswith(" no label")


def test_the_sr_of_an_image_given_no_label_states_the_finding_unknown(tmp_path):
    source = pydicom.dcmread(xray_dicom(np.full((32, 32), 100, np.uint8), tmp_path / "s.dcm", "CR"))
    model = ModelIdentity("pneumonia-cnn seed", "seed-run-1", ("software pneumonia-cnn 0.1.0",), "PNEUMONIA")
    entry = {"probability": 0.9967, "label": None, "threshold": 0.93, "in_distribution": False, "ood_score": 120.0,
             "warnings": ["not an X-ray: the image is blank (almost uniform)"]}
    build_sr(source, entry, model).save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    figures = read_sr(pydicom.dcmread(tmp_path / "sr.dcm"))
    assert figures["finding"] == "Unknown" and figures["probability"] == pytest.approx(0.9967)
    build_sr(source, {**entry, "label": "PNEUMONIA"}, model).save_as(tmp_path / "sr2.dcm", enforce_file_format=True)
    assert read_sr(pydicom.dcmread(tmp_path / "sr2.dcm"))["finding"] == "Present"


def test_evaluate_keeps_the_threshold_s_decision_in_its_metrics(tmp_path):
    """evaluate's metrics are those of the threshold over every image: an image given no label is still counted
    as the threshold decides (it had been counted NORMAL once its label was gone)."""
    from pneumonia_cnn.evaluation.evaluate import evaluate
    require_shared()
    root = link_subset(tmp_path / "data", {"test": 3})
    blank_and_noise(root / "test" / "NORMAL")
    report = evaluate("builtin", root, "test", bootstrap=10, figures=False)
    rows = {row["path"].rsplit("/", 1)[1]: row for row in report["predictions"]}
    assert rows["blank.png"]["predicted"] is None and rows["blank.png"]["probability"] > report["threshold"]
    decided = [row["probability"] >= report["threshold"] for row in report["predictions"]]
    truth = [row["label"] == 1 for row in report["predictions"]]
    false_positives = sum(d and not t for d, t in zip(decided, truth))
    assert false_positives >= 2  # blank and noise, both above the threshold in NORMAL
    assert report["metrics"]["confusion_matrix"]["fp"] == false_positives
    assert rows["blank.png"]["positive"] is True  # the threshold's decision, beside the withheld label


def test_evaluate_by_a_field_and_its_figures_count_them_as_the_overall_metrics_do(tmp_path, capsys):
    """evaluate --by had counted them NORMAL (specificity 1.0 in a subgroup holding every image, 0.6 overall),
    and the figure of confident mistakes left them out."""
    import json

    from pneumonia_cnn.evaluation.figures import confident_mistakes
    require_shared()
    root = link_subset(tmp_path / "data", {"test": 3})
    blank_and_noise(root / "test" / "NORMAL")
    out = tmp_path / "by.json"
    assert main(["evaluate", "--data", str(root), "--split", "test", "--by", "Modality", "--bootstrap", "10",
                 "--format", "json", "--out", str(out), "--no-figures"]) == 0
    report = json.loads(out.read_text())
    (group,) = report["subgroups"][0]["groups"]  # every image: no DICOM, Modality "(missing)"
    assert group["n_images"] == report["n_images"] == 8
    assert group["metrics"]["specificity"]["value"] == report["metrics"]["specificity"]["value"] == 3 / 5
    labels = np.array([row["label"] for row in report["predictions"]])
    scores = np.array([row["probability"] for row in report["predictions"]])
    names = [report["predictions"][i]["path"].rsplit("/", 1)[1] for i in confident_mistakes(report, labels, scores)]
    assert sorted(names) == ["blank.png", "noise.png"]  # the false positives the metrics count


def test_a_dicom_whose_header_says_it_is_no_chest_xray_gets_no_label_and_a_lateral_view_keeps_its_own(tmp_path,
                                                                                                      capsys):
    """A head CT (DICOM modality CT, body part HEAD) was shown as PNEUMONIA in red at 0.998 on serve's page, beside
    the warning that it is not a frontal chest radiograph: a label for it means nothing. Another modality, another
    body part or a SOP class of another modality's image now get no label; a lateral chest view and a secondary
    capture (its header cannot tell) keep theirs beside their warning."""
    require_shared()
    source = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0]
    cases = {"ct_head.dcm": dict(modality="CR", Modality="CT", body_part="HEAD"),
             "knee.dcm": dict(body_part="KNEE"),
             "ct_class.dcm": dict(modality="CR", SOPClassUID="1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
             "lateral.dcm": dict(view="LL"),
             "capture.dcm": dict(modality="CR", Modality="SC"),
             "frontal.dcm": {}}
    files = [str(xray_dicom(source, tmp_path / name, **options)) for name, options in cases.items()]
    assert main(["predict", *files, "--format", "json"]) == 0
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in json.loads(capsys.readouterr().out)}
    assert {name: rows[name]["label"] for name in cases} == {
        "ct_head.dcm": None, "knee.dcm": None, "ct_class.dcm": None, "lateral.dcm": "PNEUMONIA",
        "capture.dcm": "PNEUMONIA", "frontal.dcm": "PNEUMONIA"}
    assert rows["ct_head.dcm"]["warnings"][0].startswith("not a frontal chest radiograph: DICOM modality CT")
    assert rows["lateral.dcm"]["in_distribution"] is False and rows["frontal.dcm"]["in_distribution"] is True
    assert rows["ct_head.dcm"]["probability"] == pytest.approx(rows["frontal.dcm"]["probability"])  # still scored
