"""Probe of evaluate/report: the report's Data table shows what the run used (``--limit-images``, a val carved
from train), a split with one class gets its one-class intervals and says why AUCs are missing, few images are
warned about, and identical images under different names (conflicting labels too) are named."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from pneumonia_cnn import builtin
from pneumonia_cnn.checkpoint import save_checkpoint
from pneumonia_cnn.evaluation.metrics import bootstrap_metrics
from tests.conftest import SHARED_DATA, link_subset, require_shared


def builtin_with_config(path: Path, **config) -> Path:
    """The built-in model as a run's best.pt whose config (and record of its images) says how it was trained."""
    payload = torch.load(builtin.checkpoint_path(), map_location="cpu", weights_only=True)
    payload["config"] = dict(payload["config"], **config)
    payload["intended_use"]["trained_on"]["images"] = config.get("limit_images") or 4137
    return save_checkpoint(payload, path)


def data_rows(page: str) -> dict[str, list[str]]:
    """The Data section's table: split -> its cells as text."""
    section = page.split("<h2>Data</h2>", 1)[1].split("<h2>", 1)[0]
    rows = re.findall(r"<tr><td>([^<]*)</td>(.*?)</tr>", section)
    return {name: re.findall(r"<td>([^<]*)</td>", cells) for name, cells in rows}


def shared_test(name: str, count: int) -> list[Path]:
    require_shared()
    return sorted((SHARED_DATA / "test" / name).iterdir())[:count]


# ---------- 1. the report's Data table: what the run used, beside the folders on disk

def test_report_data_table_shows_the_images_a_limited_run_used(tmp_path, cache_dir):
    """A run trained with --limit-images 300 showed train 4137 images (the folder) next to a model card saying
    300: the table now gives the run's counts, and the folder's in a column of its own."""
    from pneumonia_cnn.evaluation.report import write_report
    require_shared()
    root = link_subset(tmp_path / "xray", {"train": 15, "val": 12, "test": 5})  # per class: 30 / 24 / 10 images
    run = tmp_path / "run"
    best = builtin_with_config(run / "best.pt", data=str(root), limit_images=10, min_val_images=10, seed=0,
                               val_from_train=0.0)
    page = write_report(best, out=tmp_path / "r.html", bootstrap=20, stress=False, cache_dir=cache_dir)
    rows = data_rows(page.read_text(encoding="utf-8"))
    # limit_images draws 10 of train's 30 and 10 of val's 24; test is evaluated whole
    for split, used, on_disk in (("train", 10, 30), ("val", 10, 24), ("test", 10, 10)):
        normal, pneumonia, images = rows[split][:3]
        assert int(images) == used and int(normal) + int(pneumonia) == used, split
        assert rows[split][4].startswith(f"{on_disk} images, "), split
    text = page.read_text(encoding="utf-8")
    assert "--limit-images 10 drew at most 10 images of train and of val" in text
    assert "The checkpoint records 10 training images" in text
    # 10 test images, 5 of a class: the metrics say their intervals are unreliable, on the page too
    assert re.search(r"Note: intervals unreliable: fewer than 10 (images|patients) of a class \((images|patients) per "
                     r"class: NORMAL \d, PNEUMONIA \d; 10 images in all\)", text)


def test_report_data_table_shows_a_val_carved_from_train_and_says_when_the_folder_is_another(tmp_path, cache_dir):
    """A val/ below --min-val-images is replaced by 10% of train's patients: the folder's 24 val images were not
    used, and train lost the carved ones. Another data folder than the run's is shown as the folders on disk."""
    from pneumonia_cnn.evaluation.report import write_report
    require_shared()
    root = link_subset(tmp_path / "xray", {"train": 15, "val": 12, "test": 5})
    best = builtin_with_config(tmp_path / "run" / "best.pt", data=str(root), min_val_images=100, limit_images=0,
                               val_from_train=0.0, seed=0)
    page = write_report(best, out=tmp_path / "r.html", bootstrap=5, stress=False, cache_dir=cache_dir)
    rows = data_rows(page.read_text(encoding="utf-8"))
    assert "val (carved from train)" in rows, rows
    train, val = rows["train"], rows["val (carved from train)"]
    assert int(train[2]) + int(val[2]) == 30 and 0 < int(val[2]) < 30  # train's 30 images, split by patient
    assert val[4].startswith("24 images, ") and val[4].endswith(" patients (not used: val carved from train)")
    other = link_subset(tmp_path / "other", {"test": 5})
    text = write_report(best, data=other, out=tmp_path / "o.html", bootstrap=5, stress=False,
                        cache_dir=cache_dir).read_text(encoding="utf-8")
    assert f"Folders on disk. This run was trained on {root}, not this folder." in text
    assert data_rows(text) == {"test": ["5", "5", "10", "10"]}  # 5 images per class, one patient each


# ---------- 3. one class only: intervals of the metrics that class defines, and a note on the rest

def test_one_class_bootstrap_keeps_the_metrics_of_the_class_present():
    """Two PNEUMONIA images, one right (p 0.9) and one wrong (p 0.1): a resample holds both, twice the right one
    or twice the wrong one (1/4 each), so accuracy and sensitivity run from 0 to 1 and the Brier score from
    0.01 (0.1 squared) to 0.81 (0.9 squared). Every resample was discarded for lacking NORMAL: all [nan, nan]."""
    result = bootstrap_metrics([1, 1], [0.9, 0.1], 0.5, resamples=200, seed=0)
    assert result["accuracy"]["value"] == 0.5 and result["accuracy"]["ci95"] == [0.0, 1.0]
    assert result["sensitivity"]["ci95"] == [0.0, 1.0]
    assert result["brier"]["ci95"] == pytest.approx([0.01, 0.81])
    for name in ("specificity", "balanced_accuracy", "roc_auc", "pr_auc", "ppv", "npv"):
        assert all(math.isnan(v) for v in result[name]["ci95"]), name
    assert result["ppv"]["value"] == 1.0 and "wilson95" not in result["ppv"]  # fixed by the missing class
    negatives = bootstrap_metrics([0, 0], [0.1, 0.9], 0.5, resamples=200, seed=0)
    assert negatives["specificity"]["ci95"] == [0.0, 1.0] and negatives["accuracy"]["ci95"] == [0.0, 1.0]
    assert all(math.isnan(v) for v in negatives["f1"]["ci95"] + negatives["sensitivity"]["ci95"])


def test_evaluate_on_one_class_says_why_the_aucs_are_missing(tmp_path, cache_dir):
    from pneumonia_cnn.evaluation.evaluate import evaluate, format_table
    root = tmp_path / "one"
    (root / "test" / "NORMAL").mkdir(parents=True)
    (root / "test" / "PNEUMONIA").mkdir()
    for path in shared_test("PNEUMONIA", 12):
        (root / "test" / "PNEUMONIA" / path.name).symlink_to(path)
    report = evaluate("builtin", root, "test", device="cpu", bootstrap=100, figures=False, cache_dir=cache_dir)
    said = "ROC AUC and PR AUC need both classes: this split has only PNEUMONIA (12 images)"
    assert any(note.startswith(said) for note in report["notes"])
    assert f"note: {said}" in format_table(report)
    for name in ("accuracy", "sensitivity"):
        low, high = report["metrics"][name]["ci95"]
        assert 0.0 <= low <= report["metrics"][name]["value"] <= high <= 1.0, name
    assert all(math.isnan(v) for v in report["metrics"]["roc_auc"]["ci95"])


# ---------- 4. very few images: said, not a silent [nan, nan]

def test_evaluate_on_one_image_warns_that_its_intervals_are_unreliable(tmp_path, cache_dir, capsys):
    from pneumonia_cnn.cli import main
    image = shared_test("PNEUMONIA", 1)[0]
    (tmp_path / "single" / "test" / "PNEUMONIA").mkdir(parents=True)
    (tmp_path / "single" / "test" / "PNEUMONIA" / image.name).symlink_to(image)
    out = tmp_path / "single.json"
    assert main(["evaluate", "--data", str(tmp_path / "single"), "--bootstrap", "50", "--no-figures", "--no-progress",
                 "--device", "cpu", "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    said = "intervals unreliable: fewer than 10 patients of a class (patients per class: PNEUMONIA 1; 1 image in all)"
    assert f"note: {said}" in printed
    assert any(note.startswith(said) for note in json.loads(out.read_text())["notes"])


# ---------- 5. identical images under different names, conflicting labels too

def test_evaluate_names_identical_images_and_conflicting_labels_and_keeps_them(tmp_path, cache_dir, capsys):
    from pneumonia_cnn.cli import main
    normal, pneumonia = shared_test("NORMAL", 4), shared_test("PNEUMONIA", 4)
    root = tmp_path / "dup"
    for name, paths in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        (root / "test" / name).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, root / "test" / name / path.name)
    for index in range(3):  # three NORMAL images copied under another name, in their own class
        shutil.copy(normal[index], root / "test" / "NORMAL" / f"copy{index}.jpeg")
    shutil.copy(normal[3], root / "test" / "PNEUMONIA" / "misfiled.jpeg")  # one also filed as PNEUMONIA
    out = tmp_path / "dup.json"
    assert main(["evaluate", "--data", str(root), "--bootstrap", "20", "--no-figures", "--no-progress", "--device",
                 "cpu", "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n_images"] == 12 and report["counts"] == {"NORMAL": 7, "PNEUMONIA": 5}  # all kept
    groups = report["duplicates"]
    assert len(groups) == 4 and all(len(g["paths"]) == 2 for g in groups)
    conflicting = [g for g in groups if g["conflicting"]]
    assert [Path(p).name for p in conflicting[0]["paths"]] == [normal[3].name, "misfiled.jpeg"]
    assert conflicting[0]["labels"] == ["NORMAL", "PNEUMONIA"] and len(conflicting) == 1
    assert ("note: 4 groups of identical images (the same file bytes) under different names, 8 images in all, each "
            "counted in the metrics: ") in printed
    assert "; and 1 more (all in the JSON's duplicates)" in printed
    assert (f"note: conflicting labels, the same image under two classes (1 group): test/NORMAL/{normal[3].name} "
            f"(NORMAL) = test/PNEUMONIA/misfiled.jpeg (PNEUMONIA)") in printed
    assert sum(note.startswith(("4 groups of identical", "conflicting labels")) for note in report["notes"]) == 2


def test_stress_says_no_drop_rather_than_a_worst_case_of_plus_zero():
    """A probe: when no shift lowered anything, stress named a "worst case" and drops of "+0.000"."""
    from pneumonia_cnn.evaluation.stress import format_stress
    base = {"roc_auc": 0.95, "sensitivity": 0.9, "specificity": 0.8}
    rows = [{"shift": "gamma 0.6", "roc_auc": 0.96, "sensitivity": 0.9, "specificity": 0.85, "delta_roc_auc": 0.01,
             "delta_sensitivity": 0.0, "delta_specificity": 0.05}]
    result = {"split": "test", "n_images": 20, "threshold": 0.5, "baseline": base, "shifts": rows,
              "worst_roc_auc": rows[0], "largest_sensitivity_drop": 0.0, "largest_specificity_drop": 0.05}
    assert format_stress(result).splitlines()[-1] == ("no shift lowered the ROC AUC; largest drops: sensitivity none, "
                                                      "specificity none")
    rows[0].update(roc_auc=0.90, delta_roc_auc=-0.05)
    result["largest_sensitivity_drop"] = -0.1
    assert format_stress(result).splitlines()[-1] == ("worst case: gamma 0.6 (ROC AUC 0.9000); largest drops: "
                                                      "sensitivity -0.100, specificity none")


def test_a_csv_or_a_flat_folder_is_named_as_itself_not_as_the_test_split(tmp_path, capsys):
    """A probe: `evaluate --data site.csv` and a folder without splits printed "test: 16 images", and compare
    said "split test holds one class only", of sets that have no test split."""
    from pneumonia_cnn.cli import main
    from pneumonia_cnn.data.dataset import evaluated_name
    (tmp_path / "kaggle" / "test").mkdir(parents=True)
    assert evaluated_name(tmp_path / "kaggle", "test") == "test"
    assert evaluated_name(tmp_path / "site.csv", "test") == "site.csv"
    assert evaluated_name(tmp_path / "flat", "test") == "flat"
    for itself in (".", "./", "test/.."):  # the folder itself (compare said ". holds one class only")
        assert evaluated_name(tmp_path / "kaggle", itself) == "kaggle"
    examples = sorted(builtin.example_paths())
    rows = [f"{path},{0 if 'NORMAL' in path.name else 1}" for path in examples]
    (tmp_path / "site.csv").write_text("\n".join(rows) + "\n")
    assert main(["evaluate", "--data", str(tmp_path / "site.csv"), "--out", str(tmp_path / "m.json"),
                 "--bootstrap", "100", "--no-figures", "--no-progress", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "\nsite.csv: 4 images " in f"\n{out}" and "test: 4 images" not in out
