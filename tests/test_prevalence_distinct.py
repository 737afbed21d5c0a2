"""Found by a hostile probe (2026-11-27): ``--prevalence estimate`` counted copies of one image towards its floor of
32 images (``--adapt-batch`` counted distinct ones): 32 copies of one NORMAL X-ray were "32 in-distribution images",
the estimated rate 0.000, and the probability fell from 0.0336 to 0.0000. Real X-rays, the built-in model."""
import shutil
from pathlib import Path

from pneumonia_cnn import builtin
from pneumonia_cnn.inference import Predictor
from pneumonia_cnn.inference.predictor import MIN_ESTIMATE_BATCH
from tests.conftest import SHARED_DATA, require_shared

EXAMPLE = Path(builtin.checkpoint_path()).parent / "examples" / "NORMAL_IM-0128-0001.jpeg"


def test_copies_of_one_image_are_one_image_for_the_prevalence_estimate(tmp_path):
    copies = [Path(shutil.copyfile(EXAMPLE, tmp_path / f"copy{i}.jpeg")) for i in range(MIN_ESTIMATE_BATCH)]
    plain = Predictor("builtin", "cpu").predict_files([EXAMPLE])[0]
    estimating = Predictor("builtin", "cpu", prevalence="estimate")
    answers = estimating.predict_files(copies)
    assert {a.probability for a in answers} == {plain.probability}
    assert any(note.startswith("prevalence not estimated: 1 in-distribution image, fewer than 32")
               for note in estimating.last_notes)


def test_the_estimate_counts_each_distinct_image_once(tmp_path):
    """Real images and a copy of each: estimated as from the images alone (the same count, rate and answers)."""
    require_shared()
    sources = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:30] + \
        sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:20]
    doubled = [*sources, *(Path(shutil.copyfile(s, tmp_path / s.name)) for s in sources)]
    alone = Predictor("builtin", "cpu", prevalence="estimate")
    expected = alone.predict_files(sources)
    twice = Predictor("builtin", "cpu", prevalence="estimate")
    got = twice.predict_files(doubled)
    assert "estimated from this batch" in " ".join(alone.last_notes)
    assert twice.last_notes == alone.last_notes
    assert [a.probability for a in got[:len(sources)]] == [a.probability for a in expected]
