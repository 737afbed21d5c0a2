"""Drift on images like the reference's says "ok": the PSI judged against its own chance distribution at the
sample size; real shift (adult X-rays) still reads "drift"; a copy of an image counts once."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pneumonia_cnn.monitoring import DriftMonitor, compare, drift_of_files, reference_of
from tests.conftest import SHARED, SHARED_DATA, require_shared


@pytest.fixture(scope="module")
def builtin_reference():
    from pneumonia_cnn.checkpoint import load_checkpoint
    reference = reference_of(load_checkpoint("builtin"))
    assert len(reference["raw_scores"]) == 559 and "ood_scores" in reference
    return reference


def statuses(reference, source, count, draws, seed):
    """How many of ``draws`` samples of ``count`` (without replacement) from ``source`` read ok/warning/drift."""
    rng, tally = np.random.default_rng(seed), {"ok": 0, "warning": 0, "drift": 0}
    for _ in range(draws):
        pick = rng.choice(len(source["raw_scores"]), count, replace=False)
        current = {name: list(np.asarray(source[name])[pick]) for name in ("raw_scores", "ood_scores")}
        tally[compare(reference, current, 30)["status"]] += 1
    return tally


@pytest.mark.parametrize("count", [30, 100])
def test_the_models_own_validation_scores_read_ok(builtin_reference, count):
    """Samples of the builtin model's own stored validation scores: with the fixed 0.1/0.25 levels, 30 of them read
    "drift" 5 times in 6 (measured: 260 of 300) and 100 of them "warning" 2 times in 5 (121 of 300); judged at
    their own size, 0-1 of 300."""
    tally = statuses(builtin_reference, builtin_reference, count, draws=200, seed=count)
    assert tally["drift"] <= 2 and tally["warning"] <= 10, tally  # at most 1% false "drift", 5% "warning"


def test_fresh_samples_of_one_distribution_read_ok():
    """A true null: reference and new scores drawn afresh from one distribution (each reference anew, so that its
    own noise counts too). A score's warning level is exceeded by chance 1% of the time, its drift level 0.1%
    (plus KS p < 0.001: 0.1%); the fixed levels had said "drift" for most samples of 30."""
    rng, tally = np.random.default_rng(11), {"ok": 0, "warning": 0, "drift": 0}
    for _ in range(4):
        reference = {"raw_scores": rng.standard_t(5, 559)}
        for _ in range(100):
            tally[compare(reference, {"raw_scores": list(rng.standard_t(5, 30))}, 30)["status"]] += 1
    assert tally["drift"] <= 8 and tally["warning"] + tally["drift"] <= 16, tally  # 2%, 4% of 400


def test_psi_levels_are_deterministic_and_never_below_the_usual_ones(builtin_reference):
    from pneumonia_cnn.monitoring import PSI_DRIFT, PSI_WARNING, null_psi, psi_levels
    raw = builtin_reference["raw_scores"]
    assert np.array_equal(null_psi(raw, 30), null_psi(raw, 30))
    small, large = psi_levels(raw, 30), psi_levels(raw, 5000)
    assert small == psi_levels(np.array(raw), 30) and small[0] > 1.0 and small[1] > small[0]
    assert large == (PSI_WARNING, PSI_DRIFT)  # many images: the usual reading of the index


def val_sample(seed, count=30):
    require_shared()
    images = sorted(p for folder in ("NORMAL", "PNEUMONIA") for p in (SHARED_DATA / "val" / folder).iterdir())
    return [str(p) for p in np.random.default_rng(seed).choice(images, count, replace=False)]


@pytest.mark.parametrize("seed", [0, 1])
def test_thirty_validation_images_are_not_drift(seed):
    """30 X-rays drawn from the model's own validation folder had read "drift" (PSI 0.29 and 1.0 here, above the
    fixed 0.25); their PSI is within what 30 images give by chance."""
    report = drift_of_files("builtin", val_sample(seed))
    assert report["images"] == 30 and report["status"] == "ok", report
    for name in ("raw_scores", "ood_scores"):
        assert report[name]["psi_warning"] > 1.0 and report[name]["psi"] < report[name]["psi_warning"]


def test_adult_xrays_still_read_drift():
    """Real shift: all 178 adult X-rays, and a sample of 30 of them (the fewest judged), read "drift" on both
    scores, their PSI above this size's drift level."""
    adults = sorted(str(p) for p in (SHARED / "data" / "adult_xray_dev").glob("*/*.jp*g"))
    if len(adults) < 30:
        pytest.skip("adult_xray_dev is absent")
    for paths in (adults, list(np.random.default_rng(0).choice(adults, 30, replace=False))):
        report = drift_of_files("builtin", paths)
        assert report["status"] == "drift" and report["images"] == len(paths)
        assert all(report[name]["status"] == "drift" for name in ("raw_scores", "ood_scores")), report
        assert report["ood_scores"]["psi"] > report["ood_scores"]["psi_drift"]


def test_copies_count_once(tmp_path):
    """30 copies of one X-ray had been judged as 30 new images ("KS p=2.5e-20 -> drift")."""
    one = val_sample(0, 1)[0]
    for index in range(30):
        shutil.copy(one, tmp_path / f"c{index}.jpeg")
    result = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "drift", "builtin", "--data", str(tmp_path),
                             "--format", "json"], capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    assert (report["status"], report["images"], report["copies_counted_once"]) == ("collecting", 1, 29), report
    assert report["reason"] == "1 of 30 images needed; 29 copies of others counted once"
    assert {item["copy_of"] for item in report["copies"]} == {str(tmp_path / "c0.jpeg")}


def test_a_copy_under_another_format_counts_once(tmp_path):
    """The same pixels as a PNG are the same image; 31 distinct validation images and 29 copies judge 31."""
    from pneumonia_cnn.inference.bundle import load_bundle
    paths = val_sample(1, 31)
    pixels, _ = load_bundle("builtin").preprocessing.read_path(paths[0])
    Image.fromarray(pixels).save(tmp_path / "same.png")
    copies = [str(tmp_path / "same.png")] + [shutil.copy(paths[i % 5], tmp_path / f"d{i}.jpeg") for i in range(28)]
    report = drift_of_files("builtin", paths + [str(p) for p in copies])
    assert (report["images"], report["copies_counted_once"]) == (31, 29) and report["status"] == "ok"
    assert report["copies"][0] == {"path": str(tmp_path / "same.png"), "copy_of": paths[0]}


def test_the_servers_window_counts_a_resent_image_once(builtin_reference):
    """With the image's hash as ``key``, a copy already in the window is set aside; once it slid out, it counts."""
    monitor = DriftMonitor(builtin_reference, window=100)
    pick = np.random.default_rng(0).permutation(559)[:101]  # stored in class order: a random hundred
    raw, ood = builtin_reference["raw_scores"][pick], builtin_reference["ood_scores"][pick]
    for index in range(100):
        monitor.add(raw[index], ood[index], key=f"image{index}")
    for _ in range(50):
        monitor.add(raw[0], ood[0], key="image0")
    report = monitor.report()
    assert (report["images"], report["copies_counted_once"], report["status"]) == (100, 50, "ok")
    monitor.add(raw[100], ood[100], key="image100")  # image0 slides out: a new send of it is new again
    monitor.add(raw[0], ood[0], key="image0")
    assert (monitor.report()["images"], monitor.report()["copies_counted_once"]) == (100, 50)
    assert list(monitor.raw)[-1] == raw[0]
