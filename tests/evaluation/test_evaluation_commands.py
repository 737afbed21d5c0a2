import json

import numpy as np
import pytest

from pneumonia_cnn import builtin
from pneumonia_cnn.cli import main
from pneumonia_cnn.evaluation import stress
from pneumonia_cnn.evaluation.evaluate import evaluate


def test_threshold_is_chosen_on_val_never_on_test(trained_run, small_root, cache_dir, tmp_path, monkeypatch):
    import pneumonia_cnn.evaluation.evaluate as module
    scored = []
    original = module.Scorer.score

    def spy(self, pixels, *args, **kwargs):
        scored.append(len(pixels))
        return original(self, pixels, *args, **kwargs)
    monkeypatch.setattr(module.Scorer, "score", spy)
    before = (trained_run / "best.pt").read_bytes()
    report = evaluate(trained_run / "best.pt", small_root, "test", threshold="sensitivity:0.9", cache_dir=cache_dir,
                      bootstrap=20, figures=False)
    assert report["decision_refit"]["split"] == "val" and report["decision_refit"]["images"] == 20
    assert scored[0] == 20  # the refit scored the 20 val images; test was scored afterwards, only to report
    from pneumonia_cnn.calibration import fit_decision
    from pneumonia_cnn.inference import Predictor
    val = sorted((small_root / "val").glob("*/*.jpeg"))
    raw = [p.raw_score for p in Predictor(trained_run / "best.pt", "cpu").predict_files(val)]
    expected = fit_decision([int("PNEUMONIA" in str(p)) for p in val], raw, "sensitivity:0.9", "none")
    assert report["threshold"] == pytest.approx(expected.threshold, abs=1e-6)
    assert (trained_run / "best.pt").read_bytes() == before  # evaluate never rewrites what it reads
    with pytest.raises(Exception, match="are among the images the refitted decision"):
        evaluate(trained_run / "best.pt", small_root, "test", threshold="youden", val_split="test",
                 cache_dir=cache_dir, bootstrap=5, figures=False)


def test_csv_external_set(trained_run, small_root, cache_dir, tmp_path):
    rows = ["path,label"] + [f"{p},{name}" for name in ("NORMAL", "PNEUMONIA")
                             for p in sorted((small_root / "test" / name).iterdir())[:4]]
    (tmp_path / "external.csv").write_text("\n".join(rows) + "\n")
    report = evaluate(trained_run, tmp_path / "external.csv", "external", cache_dir=cache_dir, bootstrap=20,
                      figures=False)
    assert report["n_images"] == 8 and report["counts"] == {"NORMAL": 4, "PNEUMONIA": 4}


def test_each_shift_does_what_it_says():
    rng = np.random.default_rng(0)
    image = (np.clip(rng.normal(0.5, 0.15, (64, 64)), 0, 1) * 255).astype(np.uint8)
    image[20:40, 20:40] = 220
    x = image.astype(float)
    assert stress.gamma(image, 0.6).mean() > x.mean() > stress.gamma(image, 1.6).mean()  # brighter / darker
    assert stress.contrast(image, 0.7).std() < x.std() < stress.contrast(image, 1.3).std()
    assert abs(stress.contrast(image, 0.7).mean() - x.mean()) < 2
    roughness = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
    assert roughness(stress.blur(image, 2)) < roughness(stress.blur(image, 1)) < roughness(image)
    noisy = stress.noise(image, 0.05, 1)
    assert 8 < (noisy.astype(float) - x).std() < 16 and np.array_equal(noisy, stress.noise(image, 0.05, 1))
    assert 0 < np.abs(stress.jpeg(image, 30).astype(float) - x).mean() < 20
    assert roughness(stress.down_up(image, 0.5)) < roughness(image)
    cropped = stress.border_crop(image, 0.10)
    assert cropped.shape == image.shape and cropped[10:54, 10:54].mean() != x[10:54, 10:54].mean()
    assert (cropped > 200).sum() > (image > 200).sum()  # the central square is magnified
    rotated = stress.rotate(image, 5)
    assert rotated.shape == image.shape and not np.array_equal(rotated, image)
    assert set(stress.SHIFT_PANEL) >= {"gamma 0.6", "gamma 1.6", "contrast x0.7", "contrast x1.3", "blur sigma 1",
                                       "blur sigma 2", "noise std 0.05", "jpeg q30", "down-up x0.5",
                                       "border crop 10%", "rotate 5deg"}


def test_stress_and_compare_commands(trained_run, small_root, cache_dir, capsys, tmp_path, caplog):
    assert main(["stress", str(trained_run), "--data", str(small_root), "--cache-dir", str(cache_dir),
                 "--format", "json", "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["shifts"]) == 11 and result["worst_roc_auc"]["shift"]
    # another model: a run's last.pt may hold its best.pt's weights (refused: the same model twice)
    assert main(["compare", str(trained_run / "best.pt"), "builtin", "--data", str(small_root),
                 "--cache-dir", str(cache_dir), "--bootstrap", "20"]) == 0
    table = capsys.readouterr().out
    assert "DeLong" in table and "roc_auc" in table and "p =" in table
    assert "  patient bootstrap (20 resamples): difference [" in table  # a patient's images are not independent
    rows = table.splitlines()
    auc = next(i for i, row in enumerate(rows) if row.startswith("roc_auc "))
    assert rows[auc + 1].startswith("  95% CI ") and rows[auc + 1].count("[") == 2  # one interval per run
    # two run folders of one name: each column is its own model (both read as the second one's)
    import shutil
    for name in ("a", "b"):
        (tmp_path / name / "run").mkdir(parents=True)
    shutil.copy(trained_run / "best.pt", tmp_path / "a" / "run" / "best.pt")
    shutil.copy(builtin.checkpoint_path(), tmp_path / "b" / "run" / "best.pt")
    assert main(["compare", str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "--data", str(small_root),
                 "--cache-dir", str(cache_dir), "--bootstrap", "20", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == ["a/run", "b/run"]
    aucs = [result["metrics"][name]["roc_auc"]["value"] for name in result["runs"]]
    assert aucs == pytest.approx([result["delong"][0]["auc_a"], result["delong"][0]["auc_b"]])
    paired = result["delong"][0]["bootstrap"]
    assert paired["unit"] == "patient" and paired["resamples"] == 20 and paired["ci95"][0] <= paired["ci95"][1]
    assert 0 < paired["p_value"] <= 1
    one_class = tmp_path / "one"
    (one_class / "test").mkdir(parents=True)
    (one_class / "test" / "NORMAL").symlink_to(small_root / "test" / "NORMAL")
    assert main(["compare", str(trained_run / "best.pt"), "builtin", "--data", str(one_class),
                 "--cache-dir", str(cache_dir), "--bootstrap", "20"]) == 2
    assert "holds one class only: ROC AUC and DeLong's test need both" in capsys.readouterr().err
    # both runs scan the same folder: its note was printed once per run
    missing = [r.getMessage() for r in caplog.records if r.getMessage().endswith("class folder missing")]
    assert missing == [f"{one_class / 'test' / 'PNEUMONIA'}: class folder missing"]


def test_stress_says_where_its_json_went(trained_run, small_root, cache_dir, capsys, tmp_path):
    out = tmp_path / "stress.json"
    assert main(["stress", str(trained_run), "--data", str(small_root), "--cache-dir", str(cache_dir),
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"written: {out}"  # as evaluate says (it said nothing)
    assert len(json.loads(out.read_text())["shifts"]) == 11


def test_compare_of_one_run_is_refused_before_scoring(trained_run, capsys, tmp_path):
    """One run has nothing to be compared with: it printed one column and no test, exit 0."""
    assert main(["compare", str(trained_run), "--data", str(tmp_path / "never-read")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: compare needs two or more runs, one was given ({trained_run}); one model's metrics: "
        f"pneumonia-cnn evaluate --checkpoint {trained_run} --data ...")


def test_compare_of_a_copy_of_a_run_is_refused_before_scoring(trained_run, capsys, tmp_path, monkeypatch):
    """A byte-identical copy under another name was compared with its original: "difference +0.0000, p = 1"."""
    import shutil

    from pneumonia_cnn.evaluation import compare
    shutil.copyfile(trained_run / "best.pt", tmp_path / "copy.pt")
    monkeypatch.setattr(compare, "evaluate", lambda *a, **k: pytest.fail("scored before the refusal"))
    assert main(["compare", str(trained_run), str(tmp_path / "copy.pt"), "--data", str(tmp_path / "never-read")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'copy.pt'}: holds the same weights as {trained_run / 'best.pt'}; compare needs different "
        f"models or decisions (these give every metric alike)")


def test_compare_of_a_last_pt_differing_only_in_its_calibration_images_rate_is_refused(trained_run, capsys, tmp_path,
                                                                                       monkeypatch):
    """A run's last.pt with best.pt's weights differs in the calibration's recorded rate alone (None vs the val
    images'), which moves no figure compare gives: it was compared with best.pt, "difference +0.0000, p = 1"."""
    import torch

    from pneumonia_cnn.evaluation import compare
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True, map_location="cpu")
    checkpoint["calibration"] = dict(checkpoint["calibration"], prior=None)
    checkpoint["threshold_policy"] = f"{checkpoint['threshold']}"  # another name for the same threshold
    torch.save(checkpoint, tmp_path / "last.pt")
    monkeypatch.setattr(compare, "evaluate", lambda *a, **k: pytest.fail("scored before the refusal"))
    assert main(["compare", str(trained_run / "best.pt"), str(tmp_path / "last.pt"), "--data",
                 str(tmp_path / "never-read")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'last.pt'}: holds the same weights as {trained_run / 'best.pt'}; compare needs")


def test_compare_of_one_model_with_another_decision_is_compared(trained_run, small_root, cache_dir, capsys, tmp_path):
    """The same weights with a refitted threshold (evaluate --save-as): sensitivity and specificity differ."""
    import torch
    checkpoint = torch.load(trained_run / "best.pt", weights_only=True, map_location="cpu")
    checkpoint["threshold"], checkpoint["threshold_policy"] = 0.123, "0.123"
    torch.save(checkpoint, tmp_path / "other_threshold.pt")
    assert main(["compare", str(trained_run / "best.pt"), str(tmp_path / "other_threshold.pt"), "--data",
                 str(small_root), "--cache-dir", str(cache_dir), "--bootstrap", "20", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(result["thresholds"].values()) == pytest.approx(sorted([0.123, checkpoint_threshold(trained_run)]))


def checkpoint_threshold(run) -> float:
    import torch
    return float(torch.load(run / "best.pt", weights_only=True, map_location="cpu")["threshold"])


def test_compare_table_says_undefined_where_a_metric_has_no_value():
    """NPV with no negative call printed nan in compare's table; the JSON had null and evaluate "undefined"."""
    from pneumonia_cnn.evaluation.compare import ROWS, format_comparison
    metrics = {metric: {"value": 0.5, "ci95": [0.25, 0.75]} for metric in ROWS}
    undefined = dict(metrics, npv={"value": float("nan"), "ci95": [None, None]})
    result = {"runs": ["a", "b"], "metrics": {"a": metrics, "b": undefined}, "thresholds": {"a": 0.5, "b": 0.5},
              "delong": [], "n_images": 10, "split": "test", "data": "d"}
    lines = format_comparison(result).splitlines()
    assert next(line for line in lines if line.startswith("npv ")) == f"{'npv':<20}{'0.5000':>16}{'undefined':>16}"
    assert "nan" not in "\n".join(lines)
