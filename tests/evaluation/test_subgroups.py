"""``evaluate --by FIELD``: metrics per subgroup with intervals and the largest gap, checked by hand on a small
case; fields from a CSV column, from DICOM headers and as age bands; the HTML report's table."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.evaluation.evaluate import evaluate
from pneumonia_cnn.evaluation.report import subgroup_section
from pneumonia_cnn.evaluation.subgroups import MISSING, age_band, age_years, subgroup_metrics
from pneumonia_cnn.metrics import point_metrics
from tests.interop.studies import xray_dicom


def test_hand_checked_small_case():
    #            group A: TP   FN   TN   FP          group B: all right           no value
    labels = [1, 1, 0, 0, 1, 1, 0, 0, 1]
    scores = [0.9, 0.4, 0.2, 0.6, 0.8, 0.7, 0.1, 0.3, 0.9]
    values = ["A", "A", "A", "A", "B", "B", "B", "B", MISSING]
    result = subgroup_metrics("site", labels, scores, 0.5, values, resamples=50, seed=1)
    a, b, missing = result["groups"]
    assert (a["value"], b["value"], missing["value"]) == ("A", "B", MISSING)  # (missing) comes last
    assert (a["n_images"], a["n_positive"], a["n_negative"], missing["n_images"]) == (4, 2, 2, 1)
    assert a["metrics"]["sensitivity"]["value"] == 0.5 and a["metrics"]["specificity"]["value"] == 0.5
    assert a["metrics"]["roc_auc"]["value"] == 0.75  # 3 of the 4 positive-negative pairs ranked right
    assert b["metrics"]["accuracy"]["value"] == 1.0 and b["metrics"]["roc_auc"]["value"] == 1.0
    assert a["metrics"]["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 1, "tp": 1}
    low, high = a["metrics"]["accuracy"]["ci95"]
    assert 0 <= low <= 0.5 <= high <= 1
    assert result["largest_gap"]["sensitivity"] == {"gap": 0.5, "best": "B", "worst": "A"}
    assert result["largest_gap"]["roc_auc"] == {"gap": 0.25, "best": "B", "worst": "A"}
    brier_a = np.mean((np.array(scores[:4]) - labels[:4]) ** 2)
    brier_b = np.mean((np.array(scores[4:8]) - labels[4:8]) ** 2)
    assert result["largest_gap"]["brier"] == {"gap": pytest.approx(brier_a - brier_b), "best": "B", "worst": "A"}
    assert np.isnan(missing["metrics"]["roc_auc"]["value"]) and "missing" not in json.dumps(result["largest_gap"])


@pytest.mark.parametrize("text, years, band", [("003Y", 3, "1-5y"), ("018M", 1.5, "1-5y"), ("006W", 6 / 52.1775, "<1y"),
                                               ("045Y", 45, "40-64y"), ("70", 70, "65y+"), ("", None, MISSING),
                                               ("abc", None, MISSING)])
def test_age_bands(text, years, band):
    assert age_years(text) == (None if years is None else pytest.approx(years))
    assert age_band(age_years(text)) == band


def test_evaluate_by_a_csv_column(trained_run, small_root, cache_dir, tmp_path):
    images = [p for name in ("NORMAL", "PNEUMONIA") for p in sorted((small_root / "test" / name).iterdir())[:6]]
    sexes = ["F", "M", "F", "M", "F", ""] * 2
    rows = ["path,label,patient_id,sex"] + [f"{p},{p.parent.name},,{s}" for p, s in zip(images, sexes)]
    (tmp_path / "site.csv").write_text("\n".join(rows) + "\n")
    report = evaluate(trained_run, tmp_path / "site.csv", "site", cache_dir=cache_dir, bootstrap=30, figures=False,
                      by=["sex"])
    (table,) = report["subgroups"]
    assert [g["value"] for g in table["groups"]] == ["F", "M", MISSING]
    assert [g["n_images"] for g in table["groups"]] == [6, 4, 2]
    by_path = {p["path"]: p for p in report["predictions"]}
    women = [by_path[str(p)] for p, s in zip(images, sexes) if s == "F"]
    expected = point_metrics([p["label"] for p in women], [p["probability"] for p in women], report["threshold"])
    for metric in ("accuracy", "sensitivity", "specificity", "roc_auc", "brier"):
        assert table["groups"][0]["metrics"][metric]["value"] == pytest.approx(expected[metric], nan_ok=True)
    with pytest.raises(Exception, match="--by colour: not a column of .*site.csv nor a DICOM attribute"):
        evaluate(trained_run, tmp_path / "site.csv", "site", cache_dir=cache_dir, bootstrap=5, figures=False,
                 by=["colour"])
    # Excel's "CSV UTF-8" (a byte-order mark), a blank first line and a comment: read as the images are (--by sex
    # said "not a column", or ended in IndexError), and a row given twice counted once (it inflated the counts)
    odd = tmp_path / "odd.csv"
    (tmp_path / "linked").symlink_to(images[0].parent)  # the same file through a link, and as "M"
    respelled = f"linked/{images[0].name},{images[0].parent.name},,M"
    odd.write_bytes(b"\xef\xbb\xbf\n# exported\n" + ("\n".join(rows + rows[1:3] + [respelled]) + "\n").encode())
    again = evaluate(trained_run, odd, "site", cache_dir=cache_dir, bootstrap=30, figures=False, by=["sex"])
    assert again["n_images"] == 12 and [g["n_images"] for g in again["subgroups"][0]["groups"]] == [6, 4, 2]
    for metric in ("accuracy", "sensitivity", "specificity", "roc_auc", "brier"):
        assert again["subgroups"][0]["groups"][0]["metrics"][metric]["value"] == \
            pytest.approx(table["groups"][0]["metrics"][metric]["value"], nan_ok=True)


def test_evaluate_by_dicom_tags_from_the_cli(trained_run, small_root, cache_dir, tmp_path, capsys):
    for index, source in enumerate(sorted((small_root / "test" / "NORMAL").iterdir())[:4]
                                   + sorted((small_root / "test" / "PNEUMONIA").iterdir())[:4]):
        xray_dicom(source, tmp_path / "dicom" / source.parent.name / f"{index}.dcm", sex="FM"[index % 2],
                   age=["003Y", "045Y"][index // 2 % 2], patient_id=f"S{index}")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(trained_run), "--data", str(tmp_path / "dicom"), "--split", "x",
                 "--bootstrap", "20", "--cache-dir", str(cache_dir), "--no-figures", "--out", str(out),
                 "--by", "PatientSex", "--by", "AgeBand", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "by PatientSex:" in printed and "by AgeBand:" in printed and "largest gap" in printed
    sex, age = json.loads(out.read_text())["subgroups"]
    assert [(g["value"], g["n_images"]) for g in sex["groups"]] == [("F", 4), ("M", 4)]
    assert [(g["value"], g["n_images"]) for g in age["groups"]] == [("1-5y", 4), ("40-64y", 4)]


def test_html_table_shows_every_group_and_the_gap():
    result = subgroup_metrics("InstitutionName", [1, 0, 1, 0], [0.9, 0.2, 0.3, 0.6], 0.5, ["S<1>", "S<1>", "S2", "S2"],
                              resamples=10)
    page = subgroup_section(result)
    assert "<h3>By InstitutionName</h3>" in page and "S&lt;1&gt;<br>n=2 (1+/1-)" in page
    assert "<td>Sensitivity (recall)</td><td>0.0000 [" in page  # columns in sorted order: S2, then S<1>
    assert "1.0000 (S&lt;1&gt; vs S2)" in page


def test_subgroup_intervals_are_printed_with_the_values_decimals():
    """Probe: "pr_auc 0.999 [1.00, 1.00]" read as a lower bound above the value; 0.9981 to 3 decimals is 0.998."""
    from pneumonia_cnn.evaluation.subgroups import _cell
    assert _cell({"value": 0.9991, "ci95": [0.9981, 0.9997]}) == "0.999 [0.998, 1.000]"
    assert _cell({"value": 0.0193, "ci95": [0.0107, 0.0292]}) == "0.019 [0.011, 0.029]"


def test_csv_columns_are_found_by_name_as_the_images_are_read(tmp_path):
    """`label,path,sex` (the dataset reader takes columns by name): the subgroup columns had been looked for only
    when the path came first, so --by sex was refused and --by AgeBand gave every image "(missing)"."""
    from pneumonia_cnn.evaluation.subgroups import field_values
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "site.csv").write_text("label,path,sex,age\n0,a.png,F,007Y\n1,b.png,M,3\n")
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    assert field_values(paths, "sex", tmp_path / "site.csv") == ["F", "M"]
    assert field_values(paths, "AgeBand", tmp_path / "site.csv") == ["6-17y", "1-5y"]


def test_age_bands_are_ordered_by_age_not_as_text():
    report = subgroup_metrics("AgeBand", [0, 1, 0, 1, 0, 1, 0, 1], [0.2, 0.8] * 4, 0.5,
                              ["18-39y", "18-39y", "1-5y", "1-5y", "6-17y", "6-17y", MISSING, MISSING], resamples=10)
    assert [group["value"] for group in report["groups"]] == ["1-5y", "6-17y", "18-39y", MISSING]


def test_groups_with_few_of_a_class_are_said_to_have_unreliable_intervals():
    """As evaluate notes it of a whole split: a group with fewer than 10 images (patients) of a class it holds.
    Group A: 12 positives, 3 negatives; B: 10 and 10; C: 9 positives only; (missing): 2 negatives."""
    from pneumonia_cnn.evaluation.subgroups import format_subgroups
    labels = [1] * 12 + [0] * 3 + [1] * 10 + [0] * 10 + [1] * 9 + [0] * 2
    values = ["A"] * 15 + ["B"] * 20 + ["C"] * 9 + [MISSING] * 2
    scores = np.linspace(0.05, 0.95, len(labels))
    result = subgroup_metrics("site", labels, scores, 0.5, values, resamples=20, seed=1)
    assert result["notes"] == [f"intervals unreliable in A (12+/3- images), C (9+/0- images), {MISSING} (0+/2- "
                               "images): fewer than 10 images of a class; a bootstrap of so few barely varies, so "
                               "those intervals are too narrow or undefined, and gaps to those groups are uncertain"]
    assert format_subgroups(result).splitlines()[-1] == f"note: {result['notes'][0]}"
    assert result["notes"][0] in subgroup_section(result).replace("&lt;", "<").replace("&gt;", ">")
    # counted by patient when there are patients: B's 20 images are 2 patients of each class
    patients = [f"a{i}" for i in range(15)] + [f"b{i // 5}" for i in range(20)] + [f"c{i}" for i in range(11)]
    by_patient = subgroup_metrics("site", labels, scores, 0.5, values, patients=patients, resamples=20, seed=1)
    assert by_patient["notes"][0].startswith("intervals unreliable in A (12+/3- patients), B (2+/2- patients), C ")
    enough = subgroup_metrics("site", [1] * 10 + [0] * 10, np.linspace(0, 1, 20), 0.5, ["A"] * 20, resamples=20)
    assert enough["notes"] == []


def test_a_gap_to_a_group_of_few_images_is_marked():
    """A group of 4 images was named best in every metric, its gaps printed as any other's."""
    from pneumonia_cnn.evaluation.subgroups import format_subgroups
    rng = np.random.default_rng(0)
    labels = np.array([1, 0] * 20 + [1, 1, 1, 0])
    scores = np.where(labels == 1, rng.uniform(0.3, 1.0, len(labels)), rng.uniform(0.0, 0.7, len(labels)))
    scores[-4:] = [0.9, 0.95, 0.99, 0.01]  # the tiny group: all right
    values = np.array(["big"] * 40 + ["tiny"] * 4)
    result = subgroup_metrics("site", labels, scores, 0.5, values, resamples=50, seed=1)
    assert result["few_per_class"] == ["tiny"]
    table = format_subgroups(result).splitlines()
    accuracy = next(line for line in table if line.startswith("accuracy "))
    assert accuracy.endswith(f"({'tiny'} vs big) *")
    assert ("note: * a gap to a group of fewer than 10 of a class: its size alone can make it best or worst (a group "
            "of 4 images had been best in every metric)") in table
