"""Left over from the output-guard and model-card reviews: show-samples' --out and report's default output replaced
whatever was at their path; a threshold given as a probability (``decision_fit.threshold_fixed``) was described by
info and the report as if fitted; and after ``adapt`` the out-of-distribution flag's bound was still said to be a
quantile of validation images, though the site's images set it (``adaptation.ood_fitted_on``)."""
import html
import shutil
from pathlib import Path

import pytest
import torch

from pneumonia_cnn import builtin
from tests.conftest import SHARED_DATA, require_shared
from tests.test_cli_guards import run
from tests.test_output_guards_review import _refused, run_folder, victim  # noqa: F401 (fixtures)

FIXED = "threshold 0.4 (fixed by --threshold, not fitted)"
FIXED_SINCE = "the threshold fixed since at 0.4 by --threshold, not fitted"


# ---------- show-samples --out and report's default output: only their own kind is replaced

def test_show_samples_replaces_only_its_own_picture(capsys, tmp_path, run_folder, victim, small_root):  # noqa: F811
    _refused(capsys, ["show-samples", "--data", small_root, "--per-class", "1", "--out", victim], victim,
             "exists and is not a show-samples picture (--out would replace it); choose another path, or remove it")
    for name in ("best.pt", "history.csv", "curves.png"):
        target = run_folder / name
        _refused(capsys, ["show-samples", "--data", small_root, "--per-class", "1", "--out", target], target,
                 f"--out would replace the {name} of the training run in {run_folder} (a run's own files are not "
                 f"replaced); choose another path")
    for suffix in ("png", "jpg", "pdf"):  # its own earlier picture is written again
        grid = tmp_path / f"grid.{suffix}"
        for seed in (0, 1):
            assert run(capsys, "show-samples", "--data", small_root, "--per-class", "1", "--seed", seed,
                       "--out", grid)[0] == 0, suffix
        assert grid.stat().st_size > 0


def test_reports_default_output_replaces_only_its_own_kind(capsys, tmp_path, run_folder, victim, small_root,  # noqa: F811
                                                           monkeypatch):
    page, metrics = run_folder / "report.html", run_folder / "report_test_metrics.json"
    shutil.copyfile(victim, page)
    _refused(capsys, ["report", run_folder, "--data", small_root, "--no-stress"], page,
             "exists and is not a pneumonia-cnn HTML report (the default --out would replace it); choose another "
             "path, or remove it")
    page.unlink()
    metrics.write_text('{"note": "not a report\'s metrics"}')
    _refused(capsys, ["report", run_folder / "best.pt", "--data", small_root, "--no-stress"], metrics,
             "exists and is not evaluate's metrics JSON (the default --out would replace it); choose another "
             "path, or remove it")
    assert not page.exists()
    monkeypatch.chdir(tmp_path)  # the built-in model's default: ./builtin_report.html
    shutil.copyfile(victim, tmp_path / "builtin_report.html")
    _refused(capsys, ["report", "builtin", "--data", small_root, "--no-stress"], Path("builtin_report.html"),
             "exists and is not a pneumonia-cnn HTML report (the default --out would replace it); choose another "
             "path, or remove it")


def test_reports_own_default_output_is_written_again(capsys, tmp_path, small_root):
    model = Path(shutil.copyfile(builtin.checkpoint_path(), tmp_path / "m.pt"))
    for _ in range(2):
        assert run(capsys, "report", model, "--data", small_root, "--no-stress", "--bootstrap", "5")[0] == 0
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>")
    assert '"metrics"' in (tmp_path / "report_test_metrics.json").read_text()


# ---------- a threshold given as a probability is said to be fixed, not fitted

def test_a_fixed_threshold_is_described_as_fixed_by_info_and_report(capsys, tmp_path, small_root):
    from pneumonia_cnn.evaluation.report import write_report
    from pneumonia_cnn.info import describe_checkpoint
    fixed = tmp_path / "fixed.pt"
    assert run(capsys, "evaluate", "--data", small_root, "--threshold", "0.4", "--no-figures", "--bootstrap", "5",
               "--out", tmp_path / "e.json", "--save-as", fixed)[0] == 0
    assert torch.load(fixed, weights_only=False)["decision_fit"]["threshold_fixed"] == pytest.approx(0.4)
    card = describe_checkpoint(str(fixed))
    assert f"classes: NORMAL, PNEUMONIA; {FIXED};" in card and FIXED_SINCE in card
    page = write_report(fixed, data=small_root, bootstrap=5, stress=False).read_text()
    assert f"<h2>Decision</h2><p>T{FIXED[1:]};" in page and FIXED_SINCE in page
    assert "threshold 0.4 (policy: fixed by --threshold, not fitted)" in page
    # a policy fitted on data since replaces the fixed one: no longer said to be fixed
    refit = tmp_path / "refit.pt"
    assert run(capsys, "evaluate", "--checkpoint", fixed, "--data", small_root, "--threshold", "youden",
               "--no-figures", "--bootstrap", "5", "--out", tmp_path / "r.json", "--save-as", refit)[0] == 0
    card = describe_checkpoint(str(refit))
    assert "fixed by --threshold" not in card and "threshold fixed since" not in card and "(youden)" in card


# ---------- after adapt, the flag's bound is said to be set by the site's images

def test_an_adapted_detector_is_described_as_fitted_on_the_site(capsys, tmp_path, small_root):
    from pneumonia_cnn.evaluation.report import write_report
    from pneumonia_cnn.info import describe_checkpoint
    require_shared()
    site = tmp_path / "site"
    site.mkdir()
    for path in sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:40]:
        (site / path.name).symlink_to(path)
    adapted = tmp_path / "adapted.pt"
    assert run(capsys, "adapt", "builtin", "--data", site, "--out", adapted)[0] == 0
    said = "quantile of 20 of the new site's 40 images, drawn at random by adapt, not validation images) is flagged"
    assert said in describe_checkpoint(str(adapted))
    assert "quantile of validation images" not in describe_checkpoint(str(adapted))
    assert html.escape(said) in write_report(adapted, data=small_root, bootstrap=5, stress=False).read_text()
    # a checkpoint adapted before the record was kept is described as before
    older = torch.load(adapted, weights_only=False)
    del older["adaptation"]["ood_fitted_on"]
    torch.save(older, tmp_path / "older.pt")
    assert "quantile of validation images) is flagged" in describe_checkpoint(str(tmp_path / "older.pt"))
    assert "quantile of validation images) is flagged" in describe_checkpoint("builtin")


def test_evaluates_default_metrics_are_replaced_only_by_the_same_checkpoint_and_decision(capsys, tmp_path,
                                                                                        small_root):
    """RUN/test_metrics.json, written by evaluate's default --out, had been replaced by any evaluation of the same
    data and split: of last.pt, of an ensemble, of a refitted decision. Those now need --out; the run's own
    best.pt with its saved decision still rewrites it."""
    from tests.test_cli_guards import digest
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("best.pt", "last.pt"):
        shutil.copyfile(builtin.checkpoint_path(), folder / name)
    metrics = folder / "test_metrics.json"
    quick = ["--data", small_root, "--no-figures", "--bootstrap", "5"]
    assert run(capsys, "evaluate", "--checkpoint", folder, *quick)[0] == 0
    before = digest(metrics)
    refused = {(folder / "last.pt",): "last.pt", (folder, "--threshold", "youden"): "best.pt with --threshold",
               (folder, "--prevalence", "0.3"): "best.pt with --prevalence",
               (folder, builtin.checkpoint_path()): "best.pt, best.pt"}
    for argv, these in refused.items():
        checkpoints = [a for a in argv if not str(a).startswith("--") and a not in ("youden", "0.3")]
        options = [a for a in argv if a not in checkpoints]
        status, error = run(capsys, "evaluate", "--checkpoint", *checkpoints, *options, *quick)
        assert (status, error) == (2, f"error: {metrics}: holds the metrics of best.pt with its saved decision; "
                                      f"these of {these} would replace them: give --out"), argv
        assert digest(metrics) == before
    assert run(capsys, "evaluate", "--checkpoint", folder / "best.pt", "--threshold", "saved", *quick)[0] == 0
    assert run(capsys, "evaluate", "--checkpoint", folder / "last.pt", *quick, "--out", tmp_path / "last.json")[0] == 0
