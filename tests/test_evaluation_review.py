"""Review fixes: file names that are not UTF-8 in figures and the HTML report, what ``adapt`` says it refitted,
a labelled folder without class folders, label CSVs with one class or ragged rows, a fixed probability as the
threshold on a CSV, and the stress table's header."""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pneumonia_cnn.errors import DatasetError, PneumoniaCNNError
from tests.conftest import SHARED_DATA, require_shared

NOT_UTF8 = os.fsdecode(b"x\xff.jpeg")  # what Python makes of the byte 0xff in a name: a lone surrogate


def shared_images(name: str, count: int) -> list[Path]:
    require_shared()
    return sorted((SHARED_DATA / "test" / name).iterdir())[:count]


def mixed_folder(root: Path) -> Path:
    """test/NORMAL and test/PNEUMONIA, each holding one image of the other class (a mistake either way, whatever
    the model) and one of its own; the misfiled NORMAL one's name is not UTF-8."""
    normal, pneumonia = shared_images("NORMAL", 1)[0], shared_images("PNEUMONIA", 1)[0]
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "test" / name).mkdir(parents=True)
    shutil.copy(pneumonia, root / "test" / "NORMAL" / NOT_UTF8)
    shutil.copy(normal, root / "test" / "NORMAL" / normal.name)
    shutil.copy(normal, root / "test" / "PNEUMONIA" / "misfiled.jpeg")
    shutil.copy(pneumonia, root / "test" / "PNEUMONIA" / pneumonia.name)
    return root


# ---------- 1. a file name that is not UTF-8 reaches a figure or the report escaped, as predict shows it

def test_figure_text_escapes_bytes_that_are_not_utf8_and_mathtext():
    from pneumonia_cnn.plots import figure_text
    assert figure_text(NOT_UTF8) == "x\\xff.jpeg"
    assert figure_text("FN p=0.10\nx$\\foo$.png") == "FN p=0.10\nx\\$\\foo\\$.png"  # lines kept, no mathtext


def test_the_mistakes_picture_names_a_file_that_is_not_utf8(tmp_path):
    from pneumonia_cnn.evaluation.figures import evaluation_figures
    from pneumonia_cnn.plots import plt
    probabilities = [0.9, 0.2, 0.1, 0.8]  # a false positive with the odd name, a false negative, two right
    report = {"class_names": ["NORMAL", "PNEUMONIA"], "counts": {"NORMAL": 2, "PNEUMONIA": 2}, "threshold": 0.5,
              "predictions": [{"label": y, "probability": p, "predicted": "PNEUMONIA" if p >= 0.5 else "NORMAL"}
                              for y, p in zip([0, 1, 0, 1], probabilities)],
              "metrics": {"confusion_matrix": {"tn": 1, "fp": 1, "fn": 1, "tp": 1}, "roc_auc": {"value": 0.5},
                          "pr_auc": {"value": 0.5}, "ece": {"value": 0.3}}}
    cached = SimpleNamespace(images=np.zeros((4, 8, 8), np.uint8),
                             paths=[f"/d/NORMAL/{NOT_UTF8}", "/d/PNEUMONIA/b$\\foo$.png", "/d/c.png", "/d/e.png"])
    titles = []
    original = plt.close
    plt.close = lambda figure: titles.extend(a.get_title() for a in figure.axes)  # read before it is closed
    try:
        paths = evaluation_figures(report, cached, tmp_path / "figures")
    finally:
        plt.close = original
    assert Path(paths["mistakes"]).stat().st_size > 0
    assert "FP p=0.90\nx\\xff.jpeg" in titles and "FN p=0.20\nb\\$\\foo\\$.png" in titles


def test_evaluate_and_report_draw_and_show_a_name_that_is_not_utf8(tmp_path):
    from pneumonia_cnn.evaluation.evaluate import evaluate
    from pneumonia_cnn.evaluation.report import write_report
    data = mixed_folder(tmp_path / os.fsdecode(b"site\xfe"))
    report = evaluate("builtin", data, "test", bootstrap=5, out=tmp_path / "m.json")
    assert set(report["figures"]) >= {"mistakes", "roc"} and Path(report["figures"]["mistakes"]).is_file()
    page = write_report("builtin", data=data, out=tmp_path / "r.html", bootstrap=5, stress=False)
    text = page.read_text(encoding="utf-8")
    assert "site\\xfe" in text and "\ufffd" not in text


# ---------- 2. adapt says what it refitted, and records on what images the OOD bound was fitted

def test_adapt_without_labels_says_the_decision_was_kept_and_records_the_ood_images(tmp_path, caplog):
    from pneumonia_cnn.adaptation import adapt, format_adaptation
    site = tmp_path / "site"
    site.mkdir()
    for path in shared_images("NORMAL", 16) + shared_images("PNEUMONIA", 16):
        (site / path.name).symlink_to(path)
    result = adapt("builtin", site, tmp_path / "adapted.pt", device="cpu")
    text = format_adaptation(result)
    assert "detector and threshold refitted" not in text
    assert "out-of-distribution detector refitted on the new site's 32 image(s) (unlabelled)" in text
    assert "decision threshold and calibration kept from the source checkpoint" in text
    record = torch.load(tmp_path / "adapted.pt", weights_only=False)["adaptation"]
    assert record["threshold_refitted_on_site"] is False
    assert record["ood_fitted_on"]["images"] == "site"
    assert (record["ood_fitted_on"]["site_images"], record["ood_fitted_on"]["bound_images"]) == (32, 16)


def test_refit_lines_with_labels_say_what_was_refitted():
    from pneumonia_cnn.adaptation import ood_fit_record, refit_lines
    result = {"kept_out": {}, "threshold_refitted": True, "calibration_refitted": False,
              "ood_fitted_on": ood_fit_record(40, 40)}
    detector, decision = refit_lines(result)
    assert "80 image(s) (40 unlabelled, 40 labelled)" in detector and "40 set its flag bound" in detector
    assert decision == ("decision threshold refitted on the labelled images' out-of-fold scores; calibration kept "
                        "from the source checkpoint (--recalibrate refits it)")


# ---------- 3. a labelled folder without class folders says so

def test_a_labelled_folder_without_class_folders_names_what_is_missing(tmp_path):
    from pneumonia_cnn.data.dataset import load_split
    for index in range(3):
        (tmp_path / f"{index}.png").write_bytes(b"")
    with pytest.raises(DatasetError) as error:
        load_split(tmp_path, None, class_names=("NORMAL", "PNEUMONIA"))
    assert str(error.value) == (f"{tmp_path}: no class folders NORMAL and PNEUMONIA (labelled images go in "
                                "NORMAL/, PNEUMONIA/ under it); it holds 3 image(s) directly, which carry no label")
    (tmp_path / "NORMAL").mkdir()
    with pytest.raises(DatasetError, match=r"no images found in its class folder\(s\) NORMAL/ \(looked for"):
        load_split(tmp_path, None, class_names=("NORMAL", "PNEUMONIA"))


# ---------- 4. label CSVs: one class warned about as a missing class folder is; a ragged row refused

def test_a_label_csv_with_one_class_is_warned_about(tmp_path, caplog):
    from pneumonia_cnn.data.dataset import load_split
    listing = tmp_path / "normal_only.csv"
    listing.write_text("path,label\na.png,NORMAL\nb.png,0\n")
    caplog.set_level(logging.WARNING)
    images = load_split(listing, "test")
    said = f"{listing}: class PNEUMONIA missing (no row labelled PNEUMONIA or 1)"
    assert images.notes == [said] and said in [r.getMessage() for r in caplog.records]
    with pytest.raises(DatasetError, match="only one class has images \\(NORMAL\\); training needs both"):
        load_split(listing, "train", require_both_classes=True)


@pytest.mark.parametrize("text, line, found", [
    ("path,label\na.png,NORMAL\nb.png,PNEUMONIA,x,y\n", 3, "4 column(s), but the header has 2"),
    ("a.png,0\n\n# note\nb.png,1,P1,extra\n", 4, "4 column(s), but path,label[,patient_id] has 3"),
])
def test_a_ragged_label_csv_row_is_refused_with_its_line(tmp_path, text, line, found):
    from pneumonia_cnn.data.dataset import read_csv_list
    listing = tmp_path / "ragged.csv"
    listing.write_text(text)
    with pytest.raises(DatasetError) as error:
        read_csv_list(listing)
    assert str(error.value) == f"{listing}:{line}: {found} (a ragged row; quote a name that holds a comma)"


def test_trailing_empty_cells_are_not_ragged(tmp_path):
    from pneumonia_cnn.data.dataset import read_csv_list
    listing = tmp_path / "excel.csv"
    listing.write_text("path,label,patient_id\na.png,NORMAL,,\nb.png,PNEUMONIA,P2\n")
    assert read_csv_list(listing).patients == ["a", "P2"]


# ---------- 5. a fixed probability as the threshold is fitted on no images: nothing to refuse

def test_a_fixed_threshold_on_a_label_csv_is_not_refused(tmp_path):
    from pneumonia_cnn.evaluation.evaluate import evaluate, format_table
    listing = tmp_path / "ok.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for name in ("NORMAL", "PNEUMONIA")
                                                for p in shared_images(name, 1)))
    report = evaluate("builtin", listing, "test", threshold="0.4", bootstrap=5, figures=False,
                      save_as=tmp_path / "fixed.pt")
    assert report["threshold"] == pytest.approx(0.4) and report["decision_refit"]["fixed"] == pytest.approx(0.4)
    assert "decision set for this evaluation: the threshold (0.4), on the stored" in format_table(report)
    assert "fitted on no images" in format_table(report)
    saved = torch.load(tmp_path / "fixed.pt", weights_only=False)
    assert saved["threshold"] == pytest.approx(0.4) and saved["decision_fit"]["threshold_fixed"] == pytest.approx(0.4)
    assert "threshold_fit" not in (saved.get("reference") or {})
    again = evaluate(tmp_path / "fixed.pt", listing, "test", bootstrap=5, figures=False)  # its decision: unfitted
    assert again["threshold"] == pytest.approx(0.4)
    # a policy fitted on data still is refused: the CSV has no other split, so it would fit on these images
    with pytest.raises(PneumoniaCNNError, match="among the images the refitted decision"):
        evaluate("builtin", listing, "test", threshold="youden", bootstrap=5, figures=False)


# ---------- 6. the stress table's header stands over its columns

def test_the_stress_header_is_aligned_with_its_columns():
    from pneumonia_cnn.evaluation.stress import format_stress
    base = {"roc_auc": 0.91, "sensitivity": 0.8, "specificity": 0.75}
    shifted = {"shift": "gamma 0.6", "roc_auc": 0.85, "sensitivity": None, "specificity": 0.7,
               "delta_roc_auc": -0.06, "delta_specificity": -0.05}
    result = {"split": "test", "n_images": 20, "threshold": 0.5, "baseline": base, "shifts": [shifted],
              "worst_roc_auc": {"shift": "gamma 0.6", "roc_auc": 0.85}, "largest_sensitivity_drop": 0,
              "largest_specificity_drop": -0.05}
    lines = format_stress(result).splitlines()
    header, rows = lines[1], lines[2:4]
    ends = [match.end() for match in re.finditer(r"ROC AUC|sensitivity|specificity", header)]
    assert len(ends) == 3
    for row in rows:
        cells = [match.end() for match in re.finditer(r"\d\.\d{4}|-(?= )|-$", row[18:])]
        assert [18 + end for end in cells] == ends, (header, row)
    changes = [match.start() for match in re.finditer(r"\(change\)", header)]
    deltas = [match.start() for match in re.finditer(r"\([+-]\d\.\d{3}\)", rows[1])]  # no sensitivity: no change
    assert deltas == [changes[0], changes[2]]


def test_rows_with_and_without_the_optional_patient_id_are_not_ragged(tmp_path):
    """path,label[,patient_id]: a row may leave its optional last cells out, with or without a header."""
    from pneumonia_cnn.data.dataset import read_csv_list
    for text in ("a.png,0\nb.png,1,P1\n", "path,label,patient_id\na.png,NORMAL\nb.png,PNEUMONIA,P2\n"):
        listing = tmp_path / "mixed.csv"
        listing.write_text(text)
        assert [Path(p).name for p in read_csv_list(listing).paths] == ["a.png", "b.png"]
