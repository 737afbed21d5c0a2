"""Review fixes: ``evaluate`` and ``report`` replace their set of outputs (JSON, figures folder, page) together
or not at all; ``--no-figures`` leaves no earlier result's pictures beside the new JSON; a refit on a CSV is
refused before any image is read; few bootstrap resamples are said to give rough intervals; ``--by`` twice
gives one table."""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from pneumonia_cnn.evaluation import evaluate as evaluate_module
from pneumonia_cnn.evaluation import report as report_module
from pneumonia_cnn.evaluation import staging
from pneumonia_cnn.evaluation.evaluate import evaluate
from pneumonia_cnn.evaluation.report import write_report
from tests.conftest import link_subset, require_shared
from tests.test_cli_guards import run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Three real X-rays of each class in test/ (nothing else: no val/)."""
    require_shared()
    return link_subset(tmp_path_factory.mktemp("tiny"), {"test": 3})


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` (hidden ones too) with its digest."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt_at_third_picture(monkeypatch):
    from pneumonia_cnn import plots
    original, calls = plots.save_figure, []

    def save(figure, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(figure, path, *args, **kwargs)
    monkeypatch.setattr(plots, "save_figure", save)
    monkeypatch.setattr("pneumonia_cnn.evaluation.figures.save_figure", save)
    return calls


# ---------- 1. an interrupt leaves the previous set of outputs whole, or the new set whole

def test_ctrl_c_while_the_pictures_are_drawn_leaves_the_previous_json_and_pictures(tiny, tmp_path, monkeypatch):
    out = tmp_path / "o" / "m.json"
    evaluate("builtin", tiny, "test", bootstrap=5, out=out, cache_dir=tmp_path / "cache")
    before = snapshot(out.parent)
    assert set(before) == {"m.json", *(f"m_figures/{name}" for name in staging.FIGURE_FILES)}
    calls = interrupt_at_third_picture(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        evaluate("builtin", tiny, "test", threshold="0.3", bootstrap=5, out=out, cache_dir=tmp_path / "cache")
    assert len(calls) == 3 and snapshot(out.parent) == before  # the same files, nothing new, no temporary left


def test_a_signal_while_the_set_is_put_in_place_waits_until_it_is_whole(tiny, tmp_path, monkeypatch):
    out = tmp_path / "m.json"
    evaluate("builtin", tiny, "test", bootstrap=5, out=out, cache_dir=tmp_path / "cache")
    before = snapshot(tmp_path / "m_figures")
    place = staging._place_folder

    def interrupted_while_placing(temporary, final):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the pictures and before the JSON are in place
        place(temporary, final)
    monkeypatch.setattr(staging, "_place_folder", interrupted_while_placing)
    with pytest.raises(KeyboardInterrupt):
        evaluate("builtin", tiny, "test", threshold="0.3", bootstrap=5, out=out, cache_dir=tmp_path / "cache")
    written = json.loads(out.read_text())
    assert written["threshold"] == 0.3 and set(written["figures"]) == {"roc", "pr", "confusion", "reliability",
                                                                       "histogram", "mistakes"}
    after = snapshot(tmp_path / "m_figures")
    assert set(after) == set(before) and after["roc.png"] != before["roc.png"]  # the new pictures beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.json", "m_figures"]


def test_deferred_signals_are_raised_once_the_step_has_ended():
    with pytest.raises(KeyboardInterrupt):
        with staging.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done = True  # reached: the signal waited
    assert done and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_report_interrupted_in_its_stress_panel_keeps_the_previous_page_metrics_and_pictures(tiny, tmp_path,
                                                                                             monkeypatch):
    page = tmp_path / "r.html"
    write_report("builtin", data=tiny, out=page, bootstrap=5, stress=False, cache_dir=tmp_path / "cache")
    before = snapshot(tmp_path)
    assert {"r.html", "r_test_metrics.json", "r_test_figures/roc.png"} <= set(before)

    def stress(*_args, **_kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(report_module, "stress_test", stress)
    with pytest.raises(KeyboardInterrupt):
        write_report("builtin", data=tiny, out=page, bootstrap=7, stress=True, cache_dir=tmp_path / "cache")
    assert snapshot(tmp_path) == before


def test_report_embeds_the_pictures_it_drew(tiny, tmp_path):
    page = write_report("builtin", data=tiny, out=tmp_path / "r.html", bootstrap=5, stress=False,
                        cache_dir=tmp_path / "cache")
    text = page.read_text(encoding="utf-8")
    # 6 figures and the training curves, drawn from the built-in model's history
    assert text.count("data:image/png;base64,") == 7 and (tmp_path / "r_test_figures" / "mistakes.png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------- 1b. --no-figures: an earlier result's pictures do not stay beside the new JSON

def test_no_figures_over_an_earlier_result_removes_its_pictures(tiny, tmp_path, capsys):
    out = tmp_path / "m.json"
    common = ("evaluate", "--data", tiny, "--out", out, "--bootstrap", "5", "--no-progress", "--cache-dir",
              tmp_path / "cache")
    assert run(capsys, *common)[0] == 0 and (tmp_path / "m_figures" / "roc.png").is_file()
    status, error = run(capsys, *common, "--no-figures", "--threshold", "0.3")
    assert (status, error) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.json"]
    assert "figures" not in json.loads(out.read_text())


def test_no_figures_removes_only_the_pictures_the_replaced_json_listed(tiny, tmp_path, capsys):
    """A review found --no-figures deleting another result's pictures (test.json and test_metrics.json share
    test_figures/) and an empty folder of the user's; only the replaced JSON's own pictures go now."""
    common = ("evaluate", "--data", tiny, "--bootstrap", "5", "--no-progress", "--cache-dir", tmp_path / "cache")
    assert run(capsys, *common, "--out", tmp_path / "test_metrics.json")[0] == 0
    pictures = snapshot(tmp_path / "test_figures")
    assert len(pictures) == 6
    assert run(capsys, *common, "--out", tmp_path / "test.json", "--no-figures") == (0, "")
    assert snapshot(tmp_path / "test_figures") == pictures  # test_metrics.json's, kept
    (tmp_path / "test_figures" / "notes.txt").write_text("mine\n")
    assert run(capsys, *common, "--out", tmp_path / "test_metrics.json", "--no-figures") == (0, "")
    assert sorted(p.name for p in (tmp_path / "test_figures").iterdir()) == ["notes.txt"]  # its own pictures went


def test_a_place_that_cannot_take_its_picture_is_refused_before_anything_moves(tiny, tmp_path, capsys):
    """A folder where a picture goes had failed midway through the final step: a mix of old and new pictures,
    the old JSON, and an error naming a temporary file."""
    out = tmp_path / "m.json"
    common = ("evaluate", "--data", tiny, "--out", out, "--bootstrap", "5", "--no-progress", "--cache-dir",
              tmp_path / "cache")
    assert run(capsys, *common)[0] == 0
    (tmp_path / "m_figures" / "roc.png").unlink()
    (tmp_path / "m_figures" / "roc.png").mkdir()
    before = snapshot(tmp_path)
    status, error = run(capsys, *common, "--threshold", "0.3")
    assert (status, error) == (2, f"error: {tmp_path / 'm_figures' / 'roc.png'}: a folder is there, where the file "
                                  f"goes")
    assert snapshot(tmp_path) == before and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pictures_go_into_a_figures_folder_and_leave_its_other_files(tiny, tmp_path):
    out = tmp_path / "m.json"
    (tmp_path / "m_figures").mkdir()
    (tmp_path / "m_figures" / "notes.txt").write_text("mine\n")
    evaluate("builtin", tiny, "test", bootstrap=5, out=out, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "m_figures").iterdir()) == sorted({"notes.txt", *staging.FIGURE_FILES})


# ---------- 2. few resamples: the intervals are said to be rough

def test_few_bootstrap_resamples_are_said_to_give_rough_intervals(tiny, tmp_path):
    few = evaluate("builtin", tiny, "test", bootstrap=1, cache_dir=tmp_path / "cache")
    enough = evaluate("builtin", tiny, "test", bootstrap=100, cache_dir=tmp_path / "cache")
    assert [n for n in few["notes"] if n.startswith("intervals rough: 1 bootstrap resample, fewer than 100")]
    assert not [n for n in enough["notes"] if n.startswith("intervals rough")]


def test_compare_says_so_too(tiny, tmp_path):
    import torch

    from pneumonia_cnn.builtin import checkpoint_path
    from pneumonia_cnn.evaluation.compare import compare_runs, format_comparison
    second = tmp_path / "other.pt"  # another model: a copy of one is refused (the same weights twice)
    checkpoint = torch.load(checkpoint_path(), weights_only=True, map_location="cpu")
    checkpoint["state_dict"]["head.bias"] += 0.5
    torch.save(checkpoint, second)
    result = compare_runs(["builtin", second], tiny, bootstrap=3, cache_dir=tmp_path / "cache")
    assert "note: intervals rough: 3 bootstrap resamples" in format_comparison(result)


# ---------- 3. a refit on a CSV is refused before any image is read

@pytest.mark.parametrize("option", [("--threshold", "youden"), ("--calibration", "platt")])
def test_a_refit_on_a_csv_is_refused_up_front(tiny, tmp_path, capsys, monkeypatch, option):
    labels = tmp_path / "labels.csv"
    rows = [f"{p},{p.parent.name}" for p in sorted((tiny / "test").rglob("*.jpeg"))]
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")

    def no_work(*_args, **_kwargs):
        raise AssertionError("images were read before the refusal")
    monkeypatch.setattr(evaluate_module, "load_bundle", no_work)
    monkeypatch.setattr(evaluate_module, "cached_split", no_work)
    for out in (["--out", tmp_path / "m.json"], []):  # without --out too: it said where the metrics would go first
        status, error = run(capsys, "evaluate", "--data", labels, *out, *option)
        assert status == 2 and "\n" not in error
        assert error.startswith(f"error: {labels}: {' '.join(option)} refits on a val split, and a CSV has none (")
        assert error.endswith(", or a folder with val/" if option[0] == "--threshold" else ": give a folder with val/")
    assert not (tmp_path / "m.json").exists()


def test_a_split_given_for_a_csv_is_refused_up_front(tiny, tmp_path, capsys, monkeypatch):
    """A CSV has no splits: `--split test` was ignored by evaluate, stress and compare, and the metrics JSON still
    said "split": "test"."""
    labels = tmp_path / "labels.csv"
    images = sorted((tiny / "test").rglob("*.jpeg"))
    labels.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    monkeypatch.setattr(evaluate_module, "cached_split", lambda *a, **k: pytest.fail("images read before the refusal"))
    for command in (["evaluate"], ["stress"], ["compare", "builtin", tmp_path / "never-read.pt"]):
        out = [] if command[0] == "compare" else ["--out", tmp_path / "m.json"]
        assert run(capsys, *command, "--data", labels, "--split", "val", *out) == (
            2, f"error: {labels}: --split val names a split folder, and a CSV has none (every row it lists is "
               f"evaluated); leave --split out"), command
    assert not (tmp_path / "m.json").exists()


# ---------- 4. --by the same field twice: one table

def test_by_the_same_field_twice_gives_one_table(tiny, tmp_path):
    labels = tmp_path / "labels.csv"
    images = sorted((tiny / "test").rglob("*.jpeg"))
    labels.write_text("path,label,sex\n" + "".join(f"{p},{p.parent.name},{'FM'[i % 2]}\n"
                                                    for i, p in enumerate(images)))
    report = evaluate("builtin", labels, "test", bootstrap=5, by=["sex", "Sex", "sex"], cache_dir=tmp_path / "c")
    assert [result["field"] for result in report["subgroups"]] == ["sex"]


def test_a_failure_in_the_final_step_names_the_output_not_its_temporary_file(tmp_path, monkeypatch):
    from pneumonia_cnn.fileio import OutputError

    def refused(source, _target):
        raise PermissionError(13, "Permission denied", str(source))
    staged = staging.Staged()
    staged.text(tmp_path / "m.json", "{}\n")
    monkeypatch.setattr(staging.os, "replace", refused)
    with pytest.raises(OutputError) as caught:
        staged.commit()
    assert (caught.value.filename, caught.value.strerror) == (str(tmp_path / "m.json"), "Permission denied")
    staged.discard()
    assert list(tmp_path.iterdir()) == []
