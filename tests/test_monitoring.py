"""Drift: PSI and KS by hand, the levels, the rolling window, and ``pneumonia-cnn drift`` on real folders."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from pneumonia_cnn.monitoring import DriftMonitor, compare, level_of, population_stability_index, reference_of
from tests.conftest import SHARED, SHARED_DATA


def test_psi_by_hand():
    reference = np.arange(10.0)  # two bins (five per bin) split at the median, 4.5
    current = [0.0, 0.0, 0.0, 10.0]  # shares 0.75 / 0.25 against 0.5 / 0.5
    expected = (0.75 - 0.5) * math.log(0.75 / 0.5) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert population_stability_index(reference, current) == pytest.approx(expected)  # 0.2747
    assert population_stability_index(reference, reference) == pytest.approx(0.0)
    # an empty bin counts as a share of 1e-4, so the index stays finite
    assert population_stability_index(reference, [0.0, 1.0]) == pytest.approx(
        (1 - 0.5) * math.log(1 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5))


def test_levels_and_compare():
    assert level_of(0.05, 0.5) == "ok" and level_of(0.2, 0.5) == "warning"
    assert level_of(0.3, 0.5) == "drift" and level_of(0.05, 0.0005) == "drift"
    rng = np.random.default_rng(0)
    reference = {"raw_scores": rng.normal(0, 1, 500), "ood_scores": rng.normal(0, 1, 500)}
    same = compare(reference, {"raw_scores": rng.normal(0, 1, 400), "ood_scores": rng.normal(0, 1, 400)})
    shifted = compare(reference, {"raw_scores": rng.normal(0, 1, 400), "ood_scores": rng.normal(1.5, 1, 400)})
    assert same["status"] == "ok" and same["raw_scores"]["ks_pvalue"] > 0.01
    assert shifted["status"] == "drift" and shifted["raw_scores"]["status"] == "ok"
    assert shifted["ood_scores"]["psi"] > 0.25 and shifted["ood_scores"]["ks_pvalue"] < 1e-10
    assert compare(None, {"raw_scores": [1.0]})["reason"].startswith("no validation scores in this checkpoint")


def test_window_collects_then_judges():
    monitor = DriftMonitor({"raw_scores": np.linspace(-3, 3, 200)}, window=50)
    for value in np.linspace(-3, 3, 49):
        monitor.add(value, None)
    assert monitor.report()["status"] == "collecting"
    monitor.add(0.0, None)
    assert monitor.report()["status"] == "ok"
    for _ in range(50):  # the window slides: only the last 50, all far above the reference, count
        monitor.add(5.0, None)
    assert monitor.report()["status"] == "drift" and monitor.report()["images"] == 50


def test_old_checkpoints_have_no_reference():
    assert reference_of({"model": {}}) is None
    reference = reference_of({"reference": {"val": {"raw_scores": [0.1, 0.2], "ood_scores": [1, 2]}}})
    assert list(reference["ood_scores"]) == [1, 2]


def drift_cli(*args):
    return subprocess.run([sys.executable, "-m", "pneumonia_cnn", "drift", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def test_drift_command_on_children_and_on_adults(trained_run):
    children = drift_cli(trained_run / "best.pt", "--data", SHARED_DATA / "test", "--format", "json")
    assert children.returncode == 0, children.stderr
    adults_dir = SHARED / "data" / "adult_xray_dev" / "covid_collection"
    if not adults_dir.is_dir():
        pytest.skip("adult_xray_dev is absent")
    adults = drift_cli(trained_run / "best.pt", "--data", adults_dir, "--format", "json")
    near, far = json.loads(children.stdout), json.loads(adults.stdout)
    assert near["images"] == 520 and far["images"] == 124 and near["reference_images"] == 20
    assert far["status"] == "drift" and far["ood_scores"]["status"] == "drift"
    assert far["ood_scores"]["psi"] > 3 * near["ood_scores"]["psi"]
    table = drift_cli(trained_run / "best.pt", "--data", adults_dir)
    assert table.stdout.startswith("drift: drift") and "OOD scores: PSI" in table.stdout
    # --fail-on: a scheduled check can tell a drift by the exit status (it was 0 whatever the status)
    assert adults.returncode == 0  # by default, as before
    assert drift_cli(trained_run / "best.pt", "--data", adults_dir, "--fail-on", "drift").returncode == 3
    assert drift_cli(trained_run / "best.pt", "--data", adults_dir, "--fail-on", "warning").returncode == 3
    missing = drift_cli(trained_run / "best.pt", "--data", "/nonexistent/folder")
    assert missing.returncode == 2 and "no images found" in missing.stderr and "Traceback" not in missing.stderr


def test_drift_exit_status_by_level():
    from pneumonia_cnn.monitoring import drift_exit_status
    expected = {"ok": (0, 0, 0), "collecting": (0, 0, 0), "warning": (0, 3, 0), "drift": (0, 3, 3),
                "unavailable": (0, 3, 3)}  # a check that cannot compare must not pass
    for status, codes in expected.items():
        assert tuple(drift_exit_status({"status": status}, level) for level in (None, "warning", "drift")) == codes


def test_drift_judges_only_enough_images_and_needs_one_readable(trained_run, tmp_path):
    few = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:3]
    one = drift_cli(trained_run / "best.pt", "--data", *few, "--format", "json")
    assert one.returncode == 0 and json.loads(one.stdout)["status"] == "collecting"  # not "drift" from 3 images
    assert json.loads(one.stdout)["reason"] == "3 of 30 images needed"
    (tmp_path / "a.jpeg").write_text("not an image")
    unreadable = drift_cli(trained_run / "best.pt", "--data", tmp_path / "a.jpeg")
    assert (unreadable.returncode, unreadable.stderr.strip()) == (
        2, f"error: none of the 1 image(s) could be read (first: {tmp_path / 'a.jpeg'}: not a readable image "
           f"(content is not JPEG, PNG, BMP, TIFF, GIF or DICOM))")
