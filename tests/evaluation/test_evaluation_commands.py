import json

import numpy as np
import pytest

from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.cli import main
from pneumonia_cnn.evaluation import stress
from pneumonia_cnn.evaluation.evaluate import evaluate


def test_threshold_is_chosen_on_val_never_on_test(trained_run, small_root, cache_dir, tmp_path, monkeypatch):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    import pneumonia_cnn.evaluation.evaluate as module
    splits_read = []
    original = module.load_split

    def spy(data, split, *args, **kwargs):
        splits_read.append(split)
        return original(data, split, *args, **kwargs)
    monkeypatch.setattr(module, "load_split", spy)
    report = evaluate(run / "best.pt", small_root, "test", threshold="sensitivity:0.9", cache_dir=cache_dir,
                      bootstrap=20, figures=False)
    assert splits_read == ["val", "test"]  # the threshold came from val; test was only scored
    saved = load_checkpoint(run / "best.pt")
    assert saved["threshold"] == report["threshold"] and "val" in saved["threshold_policy"]
    with pytest.raises(Exception, match="never chosen on the test split"):
        module.fit_threshold_on_validation(run / "best.pt", small_root, "youden", val_split="test")


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


def test_stress_and_compare_commands(trained_run, small_root, cache_dir, capsys, tmp_path):
    assert main(["stress", str(trained_run), "--data", str(small_root), "--cache-dir", str(cache_dir),
                 "--format", "json", "--out", str(tmp_path / "s.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["shifts"]) == 11 and result["worst_roc_auc"]["shift"]
    assert main(["compare", str(trained_run / "best.pt"), str(trained_run / "last.pt"), "--data", str(small_root),
                 "--cache-dir", str(cache_dir), "--bootstrap", "20"]) == 0
    table = capsys.readouterr().out
    assert "DeLong" in table and "roc_auc" in table and "p =" in table
