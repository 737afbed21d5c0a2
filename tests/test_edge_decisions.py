"""Batch-level steps at their edges: `--prevalence estimate` and `adapt` refuse to learn from a handful of
images (the built-in model and real X-rays)."""
import json
import logging
import shutil

import httpx
import numpy as np
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.inference import Predictor
from pneumonia_cnn.inference.predictor import MIN_ESTIMATE_BATCH
from pneumonia_cnn.ood.scorers import NeighbourScore
from tests.conftest import PROJECT, SHARED_DATA, require_shared
from tests.serving.conftest import Server

EXAMPLES = sorted((PROJECT / "src/pneumonia_cnn/builtin/examples").glob("*.jpeg"))


def predict_json(capsys, *args):
    assert main(["predict", *map(str, args), "--format", "json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def in_distribution_files():
    """Shared test X-rays of both classes that the built-in model holds in distribution."""
    require_shared()
    files = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:20]
    files += sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:28]
    kept = [p for p, r in zip(files, Predictor("builtin", "cpu").predict_files(files)) if r.in_distribution]
    assert len(kept) >= MIN_ESTIMATE_BATCH
    return kept[:MIN_ESTIMATE_BATCH]


@pytest.mark.parametrize("chosen", [EXAMPLES[3:4], EXAMPLES[:1], EXAMPLES])  # one pneumonia, one normal, all four
def test_estimate_on_a_few_images_keeps_the_checkpoints_probabilities(chosen, capsys, caplog):
    caplog.set_level(logging.INFO)
    plain = predict_json(capsys, "builtin", *chosen)
    estimated = predict_json(capsys, "builtin", *chosen, "--prevalence", "estimate")
    assert [(r["probability"], r["threshold"], r["label"]) for r in estimated] == \
        [(r["probability"], r["threshold"], r["label"]) for r in plain]
    images = "image" if len(chosen) == 1 else "images"
    assert (f"prevalence not estimated: {len(chosen)} in-distribution {images}, fewer than {MIN_ESTIMATE_BATCH}; "
            f"probabilities stated for the checkpoint's rate of 0.751") in caplog.text


def test_estimate_starts_at_the_minimum(in_distribution_files):
    plain = Predictor("builtin", "cpu").predict_files(in_distribution_files)
    estimating = Predictor("builtin", "cpu", prevalence="estimate")
    below = estimating.predict_files(in_distribution_files[:-1])
    assert [p.probability for p in below] == [p.probability for p in plain[:-1]]
    assert estimating.last_notes == [f"prevalence not estimated: {MIN_ESTIMATE_BATCH - 1} in-distribution "
                                     f"images, fewer than {MIN_ESTIMATE_BATCH}; probabilities stated for the "
                                     f"checkpoint's rate of 0.751"]
    at = estimating.predict_files(in_distribution_files)
    assert f"estimated from this batch ({MIN_ESTIMATE_BATCH} in-distribution images" in estimating.last_notes[0]
    assert max(abs(a.probability - b.probability) for a, b in zip(at, plain)) > 1e-3


def test_site_batch_endpoint_applies_the_same_minimum(tmp_path):
    running = Server("builtin", "--prevalence", "estimate", workdir=tmp_path)
    try:
        answer = httpx.post(f"{running.url}/predict/batch", timeout=120,
                            files=[("files", (p.name, p.read_bytes())) for p in EXAMPLES]).json()
    finally:
        running.stop()
    plain = Predictor("builtin", "cpu").predict_files(EXAMPLES)
    assert [r["probability"] for r in answer["results"]] == pytest.approx([p.probability for p in plain], abs=1e-6)
    assert answer["notes"] == [f"prevalence not estimated: {len(EXAMPLES)} in-distribution images, fewer than "
                               f"{MIN_ESTIMATE_BATCH}; probabilities stated for the checkpoint's rate of 0.751"]


def adapt_cli(capsys, data, out):
    code = main(["adapt", "builtin", "--data", str(data), "--out", str(out), "--device", "cpu"])
    return code, capsys.readouterr()


def test_adapt_refuses_fewer_site_images_than_it_needs(in_distribution_files, tmp_path, capsys):
    code, output = adapt_cli(capsys, EXAMPLES[0], tmp_path / "one.pt")
    assert code == 2 and output.err == (f"error: {EXAMPLES[0]}: 1 distinct readable image(s); adapt needs at least 32 "
                                        f"of the site's images (batch-norm statistics and the out-of-distribution "
                                        f"refit from fewer are too noisy to trust)\n")
    copies = tmp_path / "copies"  # 40 copies of one X-ray had been adapted to as the site's 40 images
    copies.mkdir()
    for index in range(40):
        shutil.copyfile(in_distribution_files[0], copies / f"copy{index:02d}{in_distribution_files[0].suffix}")
    code, output = adapt_cli(capsys, copies, tmp_path / "copies.pt")
    assert code == 2 and f"{copies}: 1 distinct readable image(s) (39 copies of others counted once); adapt needs " \
                         f"at least 32" in output.err
    site = tmp_path / "site"
    site.mkdir()
    for path in in_distribution_files[:-1]:
        (site / path.name).symlink_to(path)
    code, output = adapt_cli(capsys, site, tmp_path / "31.pt")
    assert code == 2 and f"{site}: 31 distinct readable image(s); adapt needs at least 32" in output.err
    assert not (tmp_path / "one.pt").exists() and not (tmp_path / "31.pt").exists()
    (site / in_distribution_files[-1].name).symlink_to(in_distribution_files[-1])
    code, output = adapt_cli(capsys, site, tmp_path / "32.pt")
    assert code == 0 and "re-estimated on 32 unlabelled image(s)" in output.out
    adapted = Predictor(tmp_path / "32.pt", "cpu").predict_files(in_distribution_files[:4])
    assert all(p.error is None and p.ood_score is not None for p in adapted)


def test_a_knn_scorer_needs_a_reference():
    with pytest.raises(ValueError, match="at least one reference image"):
        NeighbourScore.fit(np.zeros((0, 8)))
    assert NeighbourScore.fit(np.eye(3)).k == 3
