"""README (The data): a file of several frames or pages (a multi-page TIFF, a multi-frame DICOM) is scored on
its first, and every output now says so; it had been scored on page 1 without a word (a second view, or a
tomosynthesis stack, unread)."""
import json

import numpy as np
import pytest
from PIL import Image

from pneumonia_cnn.inference import Predictor
from tests.conftest import SHARED_DATA, link_subset, require_shared
from tests.data.test_reader_defects import write_dicom

NOTE = "the file holds {} frames or pages: only the first was scored"


@pytest.fixture(scope="module")
def xray():
    require_shared()
    return np.asarray(Image.open(sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]).convert("L"))


def tiff_pages(path, first, pages: int):
    images = [Image.fromarray(first)] + [Image.fromarray(255 - first)] * (pages - 1)
    images[0].save(path, save_all=True, append_images=images[1:])
    return path


def test_every_frame_or_page_beyond_the_first_is_noted_and_the_first_is_scored(xray, tmp_path):
    files = [tiff_pages(tmp_path / "three.tif", xray, 3), tiff_pages(tmp_path / "one.tif", xray, 1),
             write_dicom(tmp_path / "two.dcm", np.stack([xray, 255 - xray]), frames=2),
             write_dicom(tmp_path / "single.dcm", xray)]
    three, one, two, single = Predictor("builtin", "cpu").predict_files(files)
    assert three.warnings == [NOTE.format(3)] and two.warnings == [NOTE.format(2)]
    assert one.warnings == [] and single.warnings == []
    assert three.in_distribution is True and two.in_distribution is True  # a note, not a flag
    assert three.probability == pytest.approx(one.probability, abs=1e-9)  # page 1 is what was scored
    assert two.probability == pytest.approx(single.probability, abs=1e-9)


def test_evaluate_s_cache_keeps_the_page_count(xray, tmp_path):
    from pneumonia_cnn.evaluation.evaluate import evaluate
    root = link_subset(tmp_path / "data", {"test": 2})
    tiff_pages(root / "test" / "NORMAL" / "pages.tif", xray, 2)
    evaluate("builtin", root, "test", cache_dir=tmp_path / "cache", bootstrap=10, figures=False)
    manifest = json.loads(next((tmp_path / "cache").rglob("manifest.json")).read_text())
    checked = {entry["path"].rsplit("/", 1)[1]: entry.get("checked") for entry in manifest["entries"]}
    assert checked["pages.tif"]["frames"] == 2
    assert sum(c is None for c in checked.values()) == 4  # the linked one-page X-rays say nothing
