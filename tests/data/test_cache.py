import os
import time

import numpy as np
import pytest

from pneumonia_cnn.data.cache import build_or_load
from pneumonia_cnn.data.dataset import scan_folder
from tests.conftest import write_image


def make_set(root, count=4):
    rng = np.random.default_rng(0)
    for cls in ("NORMAL", "PNEUMONIA"):
        for i in range(count):
            write_image(root / cls / f"IM-{i:04d}-{cls}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    return root


def test_cache_reuses_and_invalidates_exactly_what_changed(tmp_path):
    root = make_set(tmp_path / "set")
    cache = tmp_path / "cache"
    first = build_or_load(scan_folder(root), (32, 32), cache_dir=cache, workers=2)
    assert first.decoded == 8 and first.images.shape == (8, 32, 32)
    again = build_or_load(scan_folder(root), (32, 32), cache_dir=cache)
    assert again.decoded == 0 and np.array_equal(np.asarray(again.images), np.asarray(first.images))
    changed = root / "NORMAL" / "IM-0001-NORMAL.png"
    write_image(changed, np.zeros((40, 40), np.uint8))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    (root / "PNEUMONIA" / "IM-0002-PNEUMONIA.png").unlink()
    write_image(root / "PNEUMONIA" / "IM-0009-new.png", np.full((40, 40), 200, np.uint8))
    updated = build_or_load(scan_folder(root), (32, 32), cache_dir=cache)
    assert updated.decoded == 2  # the changed and the added file, nothing else
    assert len(updated) == 8
    row = updated.paths.index(str(changed))
    assert np.asarray(updated.images[row]).max() == 0
    other = build_or_load(scan_folder(root), (16, 16), cache_dir=cache)
    assert other.decoded == 8  # another size is another cache


def test_unreadable_files_are_skipped_with_reason(tmp_path, caplog):
    root = make_set(tmp_path / "set", 2)
    (root / "NORMAL" / "broken.jpeg").write_bytes(b"not a jpeg")
    (root / "NORMAL" / "empty.png").write_bytes(b"")
    cached = build_or_load(scan_folder(root), (32, 32), cache_dir=tmp_path / "c")
    assert len(cached) == 4
    reasons = dict(cached.skipped)
    assert "empty file" in reasons[str(root / "NORMAL" / "empty.png")]
    assert any("broken.jpeg" in r.getMessage() for r in caplog.records)
    again = build_or_load(scan_folder(root), (32, 32), cache_dir=tmp_path / "c")
    assert again.decoded == 0 and dict(again.skipped) == reasons  # unchanged bad files are not read again


def test_killed_build_leaves_previous_cache_valid(tmp_path, monkeypatch):
    root = make_set(tmp_path / "set", 2)
    cache = tmp_path / "cache"
    good = build_or_load(scan_folder(root), (32, 32), cache_dir=cache)
    write_image(root / "NORMAL" / "IM-0005-x.png", np.zeros((40, 40), np.uint8))
    import pneumonia_cnn.data.cache as cache_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the manifest")
    monkeypatch.setattr(cache_module, "write_json_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        build_or_load(scan_folder(root), (32, 32), cache_dir=cache)
    monkeypatch.undo()
    (root / "NORMAL" / "IM-0005-x.png").unlink()
    reloaded = build_or_load(scan_folder(root), (32, 32), cache_dir=cache)
    assert reloaded.decoded == 0 and np.array_equal(np.asarray(reloaded.images), np.asarray(good.images))
    assert not list(cache.rglob("*.tmp"))


def test_a_damaged_or_older_manifest_is_rebuilt_not_trusted(tmp_path, caplog):
    import json
    root = make_set(tmp_path / "set")
    write_image(root / "NORMAL" / "colour.png", np.dstack([np.full((40, 40), 250, np.uint8),
                                                           np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)]))
    cache = tmp_path / "cache"
    first = build_or_load(scan_folder(root), (32, 32), cache_dir=cache)
    assert [m.saturation > 0.9 if m else None for m in first.metas()].count(True) == 1
    manifest_path = next(cache.rglob("manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    entry = next(e for e in manifest["entries"] if "checked" in e)
    entry["checked"] = {"format": "PNG"}  # a hand edit: no size
    manifest_path.write_text(json.dumps(manifest))
    rebuilt = build_or_load(scan_folder(root), (32, 32), cache_dir=cache)
    assert rebuilt.decoded == 9 and "cache manifest unreadable, rebuilding" in caplog.text
    assert [m.saturation > 0.9 if m else None for m in rebuilt.metas()].count(True) == 1
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 1  # written by a version whose entries kept no checks
    manifest_path.write_text(json.dumps(manifest))
    assert build_or_load(scan_folder(root), (32, 32), cache_dir=cache).decoded == 9


def test_a_manifest_that_is_json_but_not_an_object_is_rebuilt(tmp_path, caplog):
    """'[]' as manifest.json raised AttributeError in evaluate, stress and train."""
    root = make_set(tmp_path / "set")
    cache = tmp_path / "cache"
    build_or_load(scan_folder(root), (32, 32), cache_dir=cache)
    next(cache.rglob("manifest.json")).write_text("[]")
    assert build_or_load(scan_folder(root), (32, 32), cache_dir=cache).decoded == 8  # all again
    assert "cache manifest unreadable, rebuilding" in caplog.text
