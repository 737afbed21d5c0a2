"""Hostile inputs to train, evaluate, demo and show-samples: each is refused (or skipped) in one line naming the file,
never with a traceback, and a refused command leaves nothing behind."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import SHARED_DATA, link_subset, require_shared
from .test_cli_guards import run

TINY = ("--epochs", "1", "--size", "32", "--batch-size", "4", "--no-progress", "--no-evaluate-test", "--no-ood")


def refused_in_one_line(status: int, error: str, expected: str) -> None:
    assert "Traceback" not in error
    assert len(error.splitlines()) == 1, error
    assert (status, error) == (2, f"error: {expected}")


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture()
def tiny_root(tmp_path) -> Path:
    """A private Kaggle-layout tree (links to real X-rays): a broken guard would train into it, not the shared one."""
    require_shared()
    return link_subset(tmp_path / "data", {"train": 3, "test": 2})


def test_a_symbolic_link_loop_in_a_csv_is_skipped_as_in_a_folder(capsys, caplog, tmp_path, cache_dir):
    require_shared()
    images = tmp_path / "images"
    images.mkdir()
    rows = ["path,label"]
    for label, name in ((0, "NORMAL"), (1, "PNEUMONIA"), (1, "PNEUMONIA")):
        source = sorted((SHARED_DATA / "test" / name).iterdir())[len(rows)]
        shutil.copyfile(source, images / source.name)
        rows.append(f"images/{source.name},{label}")
    (images / "loopA.jpeg").symlink_to("loopB.jpeg")  # loopA -> loopB -> loopA
    (images / "loopB.jpeg").symlink_to("loopA.jpeg")
    rows.append("images/loopA.jpeg,0")
    labels = tmp_path / "loop.csv"
    labels.write_text("\n".join(rows) + "\n")
    status, error = run(capsys, "evaluate", "--data", labels, "--out", tmp_path / "x.json", "--bootstrap", "1",
                        "--no-figures")
    assert "Traceback" not in error and status == 0, error
    skipped = [line for line in caplog.messages if "loopA" in line]  # the one line a folder's loop gets
    assert skipped == [f"skipped {images / 'loopA.jpeg'}: Too many levels of symbolic links"]
    report = json.loads((tmp_path / "x.json").read_text())
    assert report["n_images"] == 3 and [row["path"] for row in report["skipped"]] == [str(images / "loopA.jpeg")]
    status, error = run(capsys, "train", "--data", labels, "--out", tmp_path / "run", "--cache-dir", cache_dir, *TINY)
    assert "Traceback" not in error and status == 0, error
    assert (tmp_path / "run" / "best.pt").is_file()


def test_a_bad_value_in_a_config_file_names_the_file(capsys, tmp_path, tiny_root):
    config, out = tmp_path / "a.yaml", tmp_path / "run"
    config.write_text('epochs: "ten"\n')
    status, error = run(capsys, "train", "--config", config, "--data", tiny_root, "--out", out)
    refused_in_one_line(status, error, f"{config}: epochs: expected int, got 'ten'")
    config.write_text("lr: 0.01\ndevice: tpu\n")
    status, error = run(capsys, "train", "--config", config, "--data", tiny_root, "--out", out)
    refused_in_one_line(status, error, f"{config}: device: 'tpu': not a device (use auto, cpu or cuda)")
    config.write_text("epochs: 5\n")  # a flag's value is the flag's: the file is not blamed for it
    status, error = run(capsys, "train", "--config", config, "--data", tiny_root, "--out", out, "--epochs", "0")
    refused_in_one_line(status, error, "epochs: 0 is below the minimum 1")
    assert not out.exists()


def test_a_config_that_is_no_regular_file_says_what_it_is(capsys, tmp_path, tiny_root):
    out = tmp_path / "run"
    status, error = run(capsys, "train", "--config", "/dev/zero", "--data", tiny_root, "--out", out)
    refused_in_one_line(status, error, "/dev/zero: not a readable config file (not a regular file: a device)")
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    status, error = run(capsys, "train", "--config", fifo, "--data", tiny_root, "--out", out)
    refused_in_one_line(status, error, f"{fifo}: not a readable config file (not a regular file: a named pipe (FIFO))")
    status, error = run(capsys, "train", "--config", tmp_path / "none.yaml", "--data", tiny_root, "--out", out)
    refused_in_one_line(status, error, f"{tmp_path / 'none.yaml'}: config file not found")
    assert not out.exists()


def test_train_refuses_the_data_folder_as_its_run_folder_or_around_it(capsys, tmp_path, tiny_root):
    before = tree(tiny_root)
    status, error = run(capsys, "train", "--data", tiny_root, "--out", tiny_root, *TINY)
    refused_in_one_line(status, error, f"{tiny_root}: --out is the data folder {tiny_root}, which training reads "
                                       f"(its checkpoints and plots would sit among the images); choose a folder "
                                       f"outside it")
    spelt_otherwise = tmp_path / "link"
    spelt_otherwise.symlink_to(tiny_root)
    status, error = run(capsys, "train", "--data", spelt_otherwise, "--out", f"{tiny_root}/", *TINY)
    assert status == 2 and "--out is the data folder" in error
    status, error = run(capsys, "train", "--data", tiny_root, "--out", tmp_path, *TINY)
    refused_in_one_line(status, error, f"{tmp_path}: --out holds the data folder {tiny_root}, which training reads "
                                       f"(the run's files would sit above the images); choose a folder outside it")
    assert tree(tiny_root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link"]


def test_a_failed_demo_leaves_nothing_it_made(capsys, tmp_path):
    require_shared()
    image = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]
    out = tmp_path / "runs" / "demo_f"
    status, error = run(capsys, "demo", "--data", image, "--out", out)
    refused_in_one_line(status, error, f"{image}: a file, not a folder of class folders (predict takes images; "
                                       f"--data takes a folder or a CSV list)")
    assert not (tmp_path / "runs").exists()
    unreadable = tmp_path / "hd"
    for name in ("NORMAL", "PNEUMONIA"):
        (unreadable / "train" / name).mkdir(parents=True)
        (unreadable / "train" / name / "x.png").write_text("not an image")
    kept = tmp_path / "kept"  # an earlier demo's folder: what it held stays, what this run made goes
    kept.mkdir()
    (kept / ".pneumonia-cnn-demo").touch()
    (kept / "notes.txt").write_text("mine")
    for folder in (tmp_path / "runs" / "demo_hd", kept):
        status, error = run(capsys, "demo", "--data", unreadable, "--out", folder, "--epochs", "1", "--size", "32")
        assert status == 2 and "Traceback" not in error and "none of its 2 image(s) could be read" in error
    assert not (tmp_path / "runs").exists()
    assert tree(kept) == [".pneumonia-cnn-demo", "notes.txt"]


def test_show_samples_refuses_a_suffix_it_cannot_draw_before_drawing(capsys, tmp_path):
    from pneumonia_cnn.samples import picture_formats
    require_shared()
    formats = ", ".join("." + kind for kind in picture_formats())  # matplotlib's: AVIF where Pillow writes it
    assert {".png", ".pdf", ".svg", ".jpeg"} <= set(formats.split(", ")) and ".raw" not in formats
    out = tmp_path / "ss" / "x.txt"
    status, error = run(capsys, "show-samples", "--data", SHARED_DATA, "--split", "test", "--out", out)
    refused_in_one_line(status, error, f"{out}: .txt is not a picture format show-samples writes; use one of {formats}")
    out = tmp_path / "ss" / "x"
    status, error = run(capsys, "show-samples", "--data", SHARED_DATA, "--split", "test", "--out", out)
    refused_in_one_line(status, error, f"{out}: no suffix to name its format; use one of {formats}")
    assert not (tmp_path / "ss").exists()
    picture = tmp_path / "ss" / "x.PNG"  # the suffix's case does not matter, as to matplotlib
    status, error = run(capsys, "show-samples", "--data", SHARED_DATA, "--split", "test", "--out", picture,
                        "--per-class", "1")
    assert status == 0 and picture.read_bytes()[:4] == b"\x89PNG"


def test_show_samples_says_which_images_it_skipped_and_when_a_row_is_short(caplog, tmp_path):
    """Unreadable images were left out of the grid without a word, and 23 asked gave 20 columns."""
    from pneumonia_cnn.samples import show_samples
    require_shared()
    root = link_subset(tmp_path / "data", {"test": 3})
    (root / "test" / "NORMAL" / "empty.jpeg").write_bytes(b"")
    (root / "test" / "NORMAL" / "notes.png").write_text("not an image")
    show_samples(root, "test", tmp_path / "grid.png", per_class=4)
    said = [record.getMessage() for record in caplog.records]
    assert f"skipped {root / 'test' / 'NORMAL' / 'empty.jpeg'}: empty file (0 bytes)" in said
    assert any(line.startswith(f"skipped {root / 'test' / 'NORMAL' / 'notes.png'}: ") for line in said)
    assert said[-2:] == [f"{root / 'test'}: 3 readable NORMAL image(s), fewer than --per-class 4",
                         f"{root / 'test'}: 3 readable PNEUMONIA image(s), fewer than --per-class 4"]
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_show_samples_says_so_when_a_class_has_no_readable_image(caplog, tmp_path):
    from pneumonia_cnn.samples import show_samples
    require_shared()
    root = link_subset(tmp_path / "data", {"test": 3})
    for path in (root / "test" / "NORMAL").iterdir():
        path.unlink()
    (root / "test" / "NORMAL" / "empty.jpeg").write_bytes(b"")
    show_samples(root, "test", tmp_path / "grid.png", per_class=3)
    assert f"{root / 'test'}: 0 readable NORMAL image(s), fewer than --per-class 3" in [
        record.getMessage() for record in caplog.records]  # its row was empty without a word
