"""Found by a hostile review of the command line (2026-11-27): outputs that replaced what a command reads (an
image a label list names, a run's other checkpoint, the curves a report embeds, a device or pipe), two
trainings in one run folder, overlays written among the images, and the details that made output unusable
(bare NaN in JSON, escape sequences in the table, a long name ending the whole predict)."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumonia_cnn import builtin
from pneumonia_cnn.fileio import FolderLock
from tests.conftest import write_image
from tests.test_cli_guards import digest, run

EXAMPLE = Path(builtin.checkpoint_path()).parent / "examples" / "NORMAL_IM-0128-0001.jpeg"


def test_a_second_training_into_a_run_folder_being_written_is_refused(capsys, tmp_path, small_root):
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, "held by the test"):  # what a first training holds while it runs
        status, error = run(capsys, "train", "--data", small_root, "--out", out, "--epochs", "1", "--size", "32")
    assert (status, error) == (2, f"error: {out}: another training is writing this run folder (it holds "
                                  f"{out / '.lock'}); wait for it, or give another --out")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_training_that_fails_at_once_leaves_no_folder(capsys, tmp_path):
    empty = tmp_path / "data"
    (empty / "train").mkdir(parents=True)
    status, _ = run(capsys, "train", "--data", empty, "--out", tmp_path / "new" / "sub" / "run", "--epochs", "1")
    assert status == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_training_that_loses_the_race_for_a_new_folder_leaves_the_winners_lock(tmp_path, monkeypatch):
    """Two trainings start together on a folder neither sees yet: the one refused must not remove the folder
    and lock that the other has just made and holds."""
    from pneumonia_cnn.cli import training
    from pneumonia_cnn.errors import PneumoniaCNNError
    out, winner = tmp_path / "new_run", []
    original = FolderLock.acquire

    def lose_the_race(lock):
        winner.append(original(FolderLock(out, "the winner")))  # it locks between our mkdir and our lock
        return original(lock)
    monkeypatch.setattr(FolderLock, "acquire", lose_the_race)
    with pytest.raises(PneumoniaCNNError, match="another training is writing this run folder"):
        with training.run_folder_lock(out):
            pass
    assert (out / ".lock").is_file()
    monkeypatch.setattr(FolderLock, "acquire", original)
    with pytest.raises(PneumoniaCNNError, match="another training is writing"):  # still held by the winner
        FolderLock(out, "another training is writing").acquire()
    winner[0].release()


def test_outputs_that_are_what_a_command_reads_are_refused(capsys, tmp_path, trained_run, small_root):
    listed = tmp_path / "imgs" / "x.jpeg"
    listed.parent.mkdir()
    shutil.copyfile(EXAMPLE, listed)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nimgs/x.jpeg,0\n")
    before = digest(listed)
    status, error = run(capsys, "evaluate", "--data", labels, "--out", listed, "--no-figures")
    assert (status, error) == (2, f"error: {listed}: --out would overwrite {listed} (read with {labels}), which "
                                  f"this command reads; choose another path")
    assert digest(listed) == before
    (tmp_path / "config.json").write_text("{}")  # beside the CSV (an unzipped .keras holds one): still an input
    status, error = run(capsys, "evaluate", "--data", labels, "--out", labels, "--no-figures")
    assert (status, error) == (2, f"error: {labels}: --out would overwrite {labels}, which this command reads; "
                                  f"choose another path")
    run_copy = Path(shutil.copytree(trained_run, tmp_path / "run"))
    checkpoint = run_copy / "best.pt"
    for argv, target, item in (
            (["evaluate", "--checkpoint", checkpoint, "--data", small_root], run_copy / "last.pt", checkpoint),
            (["report", run_copy, "--no-stress"], run_copy / "curves.png", run_copy),
            (["adapt", checkpoint, "--data", small_root / "test"], run_copy / "config.json", checkpoint)):
        kept = digest(target)
        status, error = run(capsys, *argv, "--out", target)
        assert (status, error) == (2, f"error: {target}: --out would overwrite {target} (read with {item}), which "
                                      f"this command reads; choose another path")
        assert digest(target) == kept
    for _ in range(2):  # a command's own earlier output in the run folder is not an input: written again
        assert run(capsys, "export", run_copy, "--format", "torchscript", "--out", run_copy / "model.pt")[0] == 0


def test_an_output_that_is_a_pipe_or_device_is_refused(capsys, tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    status, error = run(capsys, "export", "--out", pipe)
    assert (status, error) == (2, f"error: {pipe}: --out is not a regular file (a device, pipe or socket); give a "
                                  f"file path")
    assert pipe.is_fifo()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_output_folder_that_takes_no_file_is_refused_before_the_work(capsys, small_root):
    status, error = run(capsys, "evaluate", "--data", small_root, "--out", "/proc/x.json")
    assert status == 2 and error.startswith("error: /proc/x.json: cannot write in its folder /proc (")


def test_explain_writes_no_overlay_among_the_images_it_reads(capsys, tmp_path):
    folder = tmp_path / "xrays"
    folder.mkdir()
    shutil.copyfile(EXAMPLE, folder / "a.jpeg")
    for argv, out in ((["explain", folder], folder / "maps"), (["explain", folder / "a.jpeg"], folder)):
        status, error = run(capsys, *argv, "--out", out)
        assert (status, error) == (2, f"error: {out}: --out is among the images explain reads ({folder}); give a "
                                      f"folder outside it")
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpeg"]
    assert run(capsys, "explain", folder / "a.jpeg", "--out", tmp_path / "maps")[0] == 0  # beside, not among


def test_demo_refuses_a_run_folder_inside_its_data(capsys, tmp_path, small_root):
    data = Path(shutil.copytree(small_root, tmp_path / "data", symlinks=True))
    status, error = run(capsys, "demo", "--data", data, "--out", data / "train" / "EXTRA", "--epochs", "1")
    assert status == 2 and "--out is inside the data folder" in error
    assert sorted(p.name for p in (data / "train").iterdir()) == ["NORMAL", "PNEUMONIA"]


def test_a_name_too_long_for_the_system_is_one_row_not_the_end_of_predict(capsys, tmp_path):
    from pneumonia_cnn.cli import main
    long_name = str(tmp_path / ("b" * 300 + ".jpeg"))
    assert main(["predict", long_name, str(EXAMPLE), "--format", "csv"]) == 0
    import csv
    rows = capsys.readouterr().out.splitlines()
    from pneumonia_cnn import builtin
    assert "File name too long" in rows[1] and next(csv.reader([rows[1]]))[9] == builtin.card()["run_id"]
    assert rows[2].startswith(f"{EXAMPLE},0.03") and len(rows) == 3


def test_the_table_shows_control_characters_escaped(capsys, tmp_path):
    named = tmp_path / "esc\x1b[31mred.jpeg"
    shutil.copyfile(EXAMPLE, named)
    from pneumonia_cnn.cli import main
    assert main(["predict", str(named)]) == 0
    table = capsys.readouterr().out
    assert "\x1b" not in table and "esc\\x1b[31mred.jpeg" in table


@pytest.mark.parametrize("field, value, reason", [
    ("class_names", ["X", "X"], "class_names must be a list of two different names, not ['X', 'X']"),
    ("threshold_policy", "sensitivity:abc", "threshold_policy 'sensitivity:abc' is not a threshold policy"),
    ("tta", "no", "tta must be true or false, not str 'no'"),
])
def test_checkpoint_fields_that_mean_nothing_are_refused_at_load(capsys, tmp_path, model_copy_factory, field, value,
                                                                 reason):
    path = model_copy_factory(tmp_path, {field: value})
    status, error = run(capsys, "predict", path, EXAMPLE)
    assert status == 2 and error.startswith(f"error: {path}: not a usable checkpoint: {reason}")


def test_an_ood_detector_of_a_later_version_is_refused(capsys, tmp_path, model_copy_factory):
    payload = torch.load(builtin.checkpoint_path(), weights_only=False)
    path = model_copy_factory(tmp_path, {"ood": {**payload["ood"], "version": 9}})
    status, error = run(capsys, "predict", path, EXAMPLE)
    assert status == 2 and error.endswith("ood: not a detector this version can read (version 9; this version "
                                          "reads version 2)")


@pytest.fixture()
def model_copy_factory():
    def make(folder, changes):
        payload = torch.load(builtin.checkpoint_path(), weights_only=False)
        payload.update(changes)
        torch.save(payload, folder / "edited.pt")
        return folder / "edited.pt"
    return make


def test_json_output_is_strict_json(capsys, tmp_path, small_root):
    """One class only: the AUC is undefined. Python wrote a bare NaN, which strict parsers refuse."""
    labels = tmp_path / "normal_only.csv"
    images = sorted((small_root / "test" / "NORMAL").iterdir())[:4]
    labels.write_text("path,label\n" + "".join(f"{p},0\n" for p in images))
    out = tmp_path / "m.json"
    assert run(capsys, "evaluate", "--data", labels, "--out", out, "--no-figures", "--bootstrap", "20")[0] == 0

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    report = json.loads(out.read_text(), parse_constant=refuse)
    assert report["metrics"]["roc_auc"]["value"] is None


def test_a_label_list_naming_one_image_as_both_classes_is_refused(capsys, tmp_path, small_root):
    image = sorted((small_root / "test" / "NORMAL").iterdir())[0]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{image},0\n{image},1\n")
    status, error = run(capsys, "evaluate", "--data", labels, "--no-figures", "--out", tmp_path / "m.json")
    assert (status, error) == (2, f"error: {labels}:3: {image} is labelled 1, but 0 at line 2")


def test_save_as_without_a_refit_is_an_error_not_silence(capsys, tmp_path, small_root):
    for refit in ([], ["--threshold", "saved"]):  # "saved" keeps the stored threshold: nothing to write either
        status, error = run(capsys, "evaluate", "--data", small_root, "--save-as", tmp_path / "a.pt", "--out",
                            tmp_path / "m.json", *refit)
        assert (status, error) == (2, "error: --save-as writes the decision refitted by --threshold or "
                                      "--calibration: give one")


def test_evaluations_written_to_one_folder_keep_their_own_figures(capsys, tmp_path, small_root):
    for name in ("first.json", "second.json"):
        assert run(capsys, "evaluate", "--data", small_root, "--out", tmp_path / name, "--bootstrap", "20")[0] == 0
    first = json.loads((tmp_path / "first.json").read_text())["figures"]
    assert all(Path(p).parent == tmp_path / "first_figures" and Path(p).is_file() for p in first.values())
    assert (tmp_path / "second_figures").is_dir()


def test_the_cache_sees_new_content_under_an_old_size_and_mtime(tmp_path):
    """cp -p / rsync -a / touch -d: the cache kept the previous pixels of a file whose size and mtime were
    restored; the inode change time, which only the system sets, now tells."""
    from pneumonia_cnn.data.cache import build_or_load
    from pneumonia_cnn.data.dataset import load_split
    root = tmp_path / "data"
    for label, value in (("NORMAL", 40), ("PNEUMONIA", 200)):
        write_image(root / "test" / label / "a.bmp", np.full((64, 64), value, np.uint8))
    split = load_split(root, "test")
    first = np.asarray(build_or_load(split, (32, 32), cache_dir=tmp_path / "cache").images).mean(axis=(1, 2))
    normal, pneumonia = root / "test" / "NORMAL" / "a.bmp", root / "test" / "PNEUMONIA" / "a.bmp"
    times = [os.stat(p).st_mtime_ns for p in (normal, pneumonia)]
    contents = normal.read_bytes(), pneumonia.read_bytes()
    normal.write_bytes(contents[1]), pneumonia.write_bytes(contents[0])
    for path, mtime in zip((normal, pneumonia), times):
        os.utime(path, ns=(mtime, mtime))
    again = np.asarray(build_or_load(load_split(root, "test"), (32, 32), cache_dir=tmp_path / "cache").images)
    assert list(first) == [40, 200] and list(again.mean(axis=(1, 2))) == [200, 40]
