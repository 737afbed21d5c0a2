"""Probe of evaluate/stress/report outputs: an --out inside the data folder read is refused before any scoring;
a report's metrics JSON is kept from another checkpoint or data set; stress on one class says so and records no
drop it did not measure; a subgroup gap leaves out what a group cannot measure; an undefined metric says why."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from pneumonia_cnn import builtin
from tests.conftest import SHARED_DATA, link_subset, require_shared
from tests.test_cli_guards import digest, run


@pytest.fixture()
def root(tmp_path) -> Path:
    """A Kaggle-layout folder of this test's own (an output there must never reach the session's small_root)."""
    require_shared()
    return link_subset(tmp_path / "data", {"test": 3})


def no_scoring(monkeypatch):
    """Any scoring fails the test: the refusals come first."""
    from pneumonia_cnn.evaluation import evaluate, report, stress

    def scored(*args, **kwargs):
        raise AssertionError("scored before the refusal")
    monkeypatch.setattr(evaluate, "evaluate", scored)
    monkeypatch.setattr(report, "evaluate", scored)
    monkeypatch.setattr(stress, "stress_test", scored)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------- 1. an output inside the data folder read: refused in one line, before any scoring

def test_evaluate_out_inside_the_data_folder_it_reads_is_refused_before_scoring(capsys, tmp_path, root,
                                                                                monkeypatch):
    """`evaluate --data o/data --split test --out o/data/test/NORMAL/m.json` wrote m.json and m_figures/*.png among
    the X-rays: the next run scored the plots as X-rays (exit 0), or, with m_figures/ in test/, failed forever on
    a class folder "not among the model's classes". A linked folder is the folder it links to."""
    no_scoring(monkeypatch)
    before = listing(root)
    (tmp_path / "linked").symlink_to(root / "test")
    test = root / "test"
    cases = [(["--data", root, "--split", "test"], test / "NORMAL" / "m.json"),
             (["--data", root, "--split", "test"], test / "m.json"),
             (["--data", root, "--split", "test"], tmp_path / "linked" / "PNEUMONIA" / "m.json"),
             (["--data", test], test / "m.json"),  # the split folder itself as --data
             (["--data", root, "--split", "test", "--no-figures"], test / "NORMAL" / "m.json")]
    for data, out in cases:
        status, error = run(capsys, "evaluate", *data, "--out", out, "--no-progress")
        shown = test if data[1] == root else data[1]
        assert (status, error) == (2, f"error: {out}: --out is inside {shown}, which evaluate reads (the metrics "
                                      f"JSON and its figures would join the images, read as X-rays next time); "
                                      f"choose a path outside it"), (data, out)
    assert listing(root) == before


def test_stress_and_report_out_inside_the_data_folder_are_refused_too(capsys, root, monkeypatch):
    no_scoring(monkeypatch)
    before = listing(root)
    out = root / "test" / "NORMAL" / "s.json"
    status, error = run(capsys, "stress", "builtin", "--data", root, "--out", out)
    assert (status, error) == (2, f"error: {out}: --out is inside {root / 'test'}, which stress reads (its JSON would "
                                  f"join the images, read as X-rays next time); choose a path outside it")
    page = root / "test" / "r.html"
    status, error = run(capsys, "report", "builtin", "--data", root, "--out", page, "--no-stress")
    assert (status, error) == (2, f"error: {page}: --out is inside {root / 'test'}, which report reads (the page, "
                                  f"its metrics JSON and figures would join the images, read as X-rays next time); "
                                  f"choose a path outside it")
    assert listing(root) == before


def test_the_top_of_a_kaggle_root_beside_its_splits_is_not_read_and_takes_the_metrics(capsys, root, cache_dir):
    """Only the folders read are refused: as train allows a run folder beside the splits, so does evaluate."""
    out = root / "m.json"
    assert run(capsys, "evaluate", "--data", root, "--out", out, "--no-figures", "--bootstrap", "5", "--no-progress",
               "--device", "cpu", "--cache-dir", cache_dir)[0] == 0
    assert json.loads(out.read_text())["n_images"] == 6


# ---------- 2. a report's metrics JSON: not replaced by the metrics of another checkpoint or data set

def fake_report(folder: Path, checkpoint: Path, data: Path, name: str = "report", split: str = "test") -> Path:
    """What `pneumonia-cnn report` leaves: the page and, beside it, the metrics JSON the page shows."""
    (folder / f"{name}.html").write_text("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>"
                                         "pneumonia-cnn report run-f</title></head><body></body></html>")
    metrics = folder / f"{name}_{split}_metrics.json"
    metrics.write_text(json.dumps({"checkpoint": [str(checkpoint)], "data": str(data), "split": split,
                                   "metrics": {"accuracy": {"value": 0.9}}}))
    return metrics


def test_a_reports_metrics_json_is_kept_from_another_checkpoint_or_data_set(capsys, tmp_path, root, monkeypatch):
    """`evaluate --checkpoint runs/g --out runs/f/report_test_metrics.json` replaced the JSON (and figures) of the
    report of run f, whose page still described f; both checkpoints are called best.pt, so they are told apart
    by the files themselves."""
    no_scoring(monkeypatch)
    runs = {}
    for name in ("f", "g"):
        runs[name] = tmp_path / "runs" / name
        runs[name].mkdir(parents=True)
        shutil.copyfile(builtin.checkpoint_path(), runs[name] / "best.pt")
    metrics = fake_report(runs["f"], runs["f"] / "best.pt", root)
    before = digest(metrics)
    page = runs["f"] / "report.html"
    status, error = run(capsys, "evaluate", "--checkpoint", runs["g"], "--data", root, "--out", metrics)
    assert (status, error) == (2, f"error: {metrics}: holds the metrics of {runs['f'] / 'best.pt'} with its saved "
                                  f"decision; these of {runs['g'] / 'best.pt'} would replace them: give another --out "
                                  f"({page} shows them)")
    other = link_subset(tmp_path / "other", {"test": 2})
    status, error = run(capsys, "evaluate", "--checkpoint", runs["f"], "--data", other, "--out", metrics)
    assert (status, error) == (2, f"error: {metrics}: holds the metrics of {root} (test split); these of {other} "
                                  f"(test) would replace them: give another --out ({page} shows them)")
    status, error = run(capsys, "evaluate", "--checkpoint", runs["f"], "--data", root, "--threshold", "youden",
                        "--out", metrics)
    assert status == 2 and "these of best.pt with --threshold would replace them" in error
    # a report written with --out elsewhere, its name and split with underscores
    named = fake_report(tmp_path, runs["f"] / "best.pt", root, name="my_report", split="test_b")
    status, error = run(capsys, "evaluate", "--checkpoint", runs["g"], "--data", root, "--split", "test_b", "--out",
                        named)
    assert status == 2 and error.endswith(f"give another --out ({tmp_path / 'my_report.html'} shows them)")
    assert digest(metrics) == before


def test_the_reports_metrics_json_still_takes_its_own_model_again(capsys, tmp_path, root, cache_dir):
    run_f = tmp_path / "f"
    run_f.mkdir()
    shutil.copyfile(builtin.checkpoint_path(), run_f / "best.pt")
    metrics = fake_report(run_f, run_f / "best.pt", root)
    assert run(capsys, "evaluate", "--checkpoint", run_f, "--data", root, "--out", metrics, "--no-figures",
               "--bootstrap", "5", "--no-progress", "--device", "cpu", "--cache-dir", cache_dir)[0] == 0
    assert json.loads(metrics.read_text())["n_images"] == 6


# ---------- 3. stress on one class or one image: notes, and no drop it did not measure

def test_stress_on_one_image_says_why_and_records_no_specificity_drop(capsys, tmp_path, cache_dir):
    require_shared()
    image = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0]
    (tmp_path / "one" / "test" / "PNEUMONIA").mkdir(parents=True)
    (tmp_path / "one" / "test" / "PNEUMONIA" / image.name).symlink_to(image)
    out = tmp_path / "s.json"
    from pneumonia_cnn.cli import main
    assert main(["stress", "builtin", "--data", str(tmp_path / "one"), "--out", str(out), "--device", "cpu",
                 "--cache-dir", str(cache_dir)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert all(row["specificity"] is None for row in result["shifts"])
    assert result["largest_specificity_drop"] is None  # it was 0 (an int): "no drop"
    assert isinstance(result["largest_sensitivity_drop"], float)
    said = ["ROC AUC needs both classes: this split has only PNEUMONIA (1 image); specificity is undefined too (no "
            "NORMAL image), so neither is measured under any shift",
            "changes unreliable: fewer than 10 images of a class (images per class: PNEUMONIA 1; 1 image in all); "
            "one image's call moves a sensitivity or specificity by 1/n of its class"]
    assert result["notes"] == said
    assert all(f"note: {note}" in printed for note in said)


def test_stress_json_holds_no_drop_and_no_worst_case_where_the_table_says_none():
    """A rise was stored as the "largest drop" (+0.05) and a shift that lowered nothing as the worst case, where the
    table said "none" and "no shift lowered the ROC AUC"."""
    from pneumonia_cnn.evaluation.stress import _largest_drop
    rows = [{"delta_sensitivity": 0.05, "delta_specificity": -0.1}, {"delta_sensitivity": 0.0}]
    assert _largest_drop(rows, "sensitivity") == 0.0 and _largest_drop(rows, "specificity") == -0.1
    assert _largest_drop([{"sensitivity": None}], "sensitivity") is None
    assert _largest_drop([{"delta_sensitivity": 0.05}, {"delta_sensitivity": 0.02}], "sensitivity") == 0.0  # rises
    from pneumonia_cnn.evaluation.stress import format_stress, stress_test
    require_shared()
    result = stress_test("builtin", SHARED_DATA, "val", device="cpu", shifts={"unchanged": lambda g, i: g})
    assert result["shifts"][0]["delta_roc_auc"] == 0.0 and result["worst_roc_auc"] is None
    assert (result["largest_sensitivity_drop"], result["largest_specificity_drop"]) == (0.0, 0.0)
    assert format_stress(result).splitlines()[-1] == ("no shift lowered the ROC AUC; largest drops: sensitivity "
                                                      "none, specificity none")


def test_stress_tables_show_an_undefined_value_and_drop_as_such():
    from pneumonia_cnn.evaluation.report import _stress_section
    from pneumonia_cnn.evaluation.stress import format_stress
    base = {"roc_auc": None, "sensitivity": 1.0, "specificity": None, "accuracy": 1.0}
    rows = [{"shift": "gamma 0.6", "roc_auc": None, "sensitivity": 0.5, "specificity": None, "accuracy": 0.5,
             "delta_sensitivity": -0.5}]
    result = {"data": "one", "split": "test", "n_images": 2, "threshold": 0.5, "baseline": base, "shifts": rows,
              "worst_roc_auc": None, "largest_sensitivity_drop": -0.5, "largest_specificity_drop": None,
              "notes": ["ROC AUC needs both classes"]}
    # the defined drop is printed and the undefined one named, before the notes (no line at all before)
    assert format_stress(result).splitlines()[-2:] == [
        "ROC AUC undefined; largest drops: sensitivity -0.500, specificity undefined",
        "note: ROC AUC needs both classes"]
    result["worst_roc_auc"] = {"shift": "gamma 0.6", "roc_auc": 0.7}  # a line of drops, a specificity of none
    assert "largest drops: sensitivity -0.500, specificity undefined" in format_stress(result)
    result["worst_roc_auc"] = None
    section = _stress_section(result)  # the report of a one-class split had failed on formatting None
    assert "<td>undefined</td>" in section and "Worst case" not in section and "ROC AUC needs both" in section


# ---------- 4. subgroup gaps: only what a group measures; an undefined metric says why

def test_a_metric_a_group_cannot_measure_is_left_out_of_the_largest_gap():
    """Group B has no NORMAL image: its NPV is 0 whatever the model does (no call there can be a true negative)
    and its PPV 1; they were shown "0.000 (no CI)" and gave the NPV a "largest gap 1.000 (C vs B)"."""
    from pneumonia_cnn.evaluation.subgroups import format_subgroups, subgroup_metrics
    labels = [1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0]
    scores = [0.9, 0.1, 0.2, 0.7, 0.9, 0.2, 0.8, 0.9, 0.1, 0.8, 0.3]
    values = ["A"] * 4 + ["B"] * 3 + ["C"] * 4
    result = subgroup_metrics("site", labels, scores, 0.5, values, resamples=30, seed=0)
    b = result["groups"][1]
    assert (b["n_negative"], b["metrics"]["npv"]["value"], b["metrics"]["ppv"]["value"]) == (0, 0.0, 1.0)
    gaps = result["largest_gap"]
    assert gaps["npv"] == {"gap": 0.5, "best": "C", "worst": "A"}  # A 1/2, C 2/2: B left out
    assert gaps["ppv"]["worst"] == "A" and gaps["ppv"]["best"] == "C"
    assert gaps["sensitivity"]["worst"] == "A"  # B measures sensitivity (2 of 3)
    text = format_subgroups(result)
    npv_row = next(line for line in text.splitlines() if line.startswith("npv"))
    assert "0.000 (fixed)" in npv_row and npv_row.endswith("0.500 (C vs A) *")
    assert "left out of the largest gap" in text


def test_a_metric_without_a_denominator_is_printed_undefined_with_its_reason():
    """A model that calls nothing PNEUMONIA has no PPV: the table printed "nan   [nan, nan]", unexplained."""
    from pneumonia_cnn.evaluation.subgroups import metric_line
    nothing = {"tn": 10, "fp": 0, "fn": 10, "tp": 0}
    nan = {"value": math.nan, "ci95": [math.nan, math.nan]}
    names = ("NORMAL", "PNEUMONIA")
    assert metric_line("ppv", nan, nothing, names) == f"{'ppv':<20}undefined   (no image called PNEUMONIA)"
    only = {"tn": 0, "fp": 0, "fn": 1, "tp": 3}
    assert metric_line("specificity", nan, only, names).endswith("undefined   (no NORMAL image)")
    assert metric_line("roc_auc", nan, only, names).endswith("undefined   (needs both classes)")
    assert metric_line("npv", {"value": 0.5, "ci95": [0.25, 0.75]}, nothing, names) == \
        f"{'npv':<20}   0.5000   [0.2500, 0.7500]"


def test_evaluates_table_says_why_ppv_is_undefined(tmp_path, root, cache_dir):
    from pneumonia_cnn.evaluation.evaluate import evaluate, format_table
    report = evaluate("builtin", root, "test", device="cpu", threshold="0.99999", bootstrap=5, figures=False,
                      cache_dir=cache_dir)
    assert report["metrics"]["confusion_matrix"]["tp"] + report["metrics"]["confusion_matrix"]["fp"] == 0
    assert f"{'ppv':<20}undefined   (no image called PNEUMONIA)" in format_table(report).splitlines()


# ---------- a file of a figure's name that evaluate did not write: kept, refused before any scoring


def test_a_file_evaluate_did_not_write_where_a_figure_goes_is_kept_and_refused(capsys, tmp_path, root, cache_dir,
                                                                                monkeypatch):
    """An X-ray saved as ``x_figures/roc.png`` had been replaced by the ROC curve without a word."""
    out, figures = tmp_path / "o" / "x.json", tmp_path / "o" / "x_figures"
    figures.mkdir(parents=True)
    xray = next((root / "test" / "NORMAL").iterdir())
    shutil.copyfile(xray, figures / "roc.png")
    before = digest(figures / "roc.png")
    scoring = {}
    real_evaluate = __import__("pneumonia_cnn.evaluation.evaluate", fromlist=["cached_split"])
    monkeypatch.setattr(real_evaluate, "cached_split", lambda *a, **k: scoring.setdefault("scored", True) and None)
    status, error = run(capsys, "evaluate", "--data", root, "--split", "test", "--out", out, "--no-progress")
    assert (status, error) == (2, f"error: {figures / 'roc.png'}: holds a file evaluate did not write (its roc "
                                  f"figure goes there); remove it, give --no-figures, or give another --out")
    assert digest(figures / "roc.png") == before and "scored" not in scoring and not out.exists()


def test_evaluate_replaces_its_own_figures_and_an_earlier_versions_untitled_ones(capsys, tmp_path, root, cache_dir):
    """An earlier version drew the figures untitled, and another result may share the folder (``test.json`` and
    ``test_metrics.json`` both draw into ``test_figures/``): a picture matplotlib made is evaluate's to replace."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    out, figures = tmp_path / "x.json", tmp_path / "x_figures"
    common = ["--data", root, "--split", "test", "--cache-dir", cache_dir, "--no-progress", "--out", out]
    assert run(capsys, "evaluate", *common)[0] == 0
    assert Image.open(figures / "roc.png").info["Title"] == "pneumonia-cnn evaluate"
    assert run(capsys, "evaluate", *common)[0] == 0  # its own figures, titled
    out.unlink()  # no JSON lists the pictures any more
    figure = plt.figure()
    figure.savefig(figures / "pr.png")  # as an earlier version drew it: matplotlib's, untitled
    plt.close(figure)
    assert run(capsys, "evaluate", *common)[0] == 0
    Image.open(figures / "pr.png").save(figures / "pr.png")  # the same pixels, saved by another program
    status, error = run(capsys, "evaluate", *common)
    assert status == 2 and error.startswith(f"error: {figures / 'pr.png'}: holds a file evaluate did not write")
