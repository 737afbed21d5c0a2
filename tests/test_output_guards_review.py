"""Found by a hostile probe (2026-11-28): outputs that replaced whatever was at their path (another run's
checkpoint, its config.json, an X-ray, training's test_metrics.json), full disks reported without the file,
empty paths read as the current folder, an unbounded --bootstrap, an empty overlay folder made for nothing, a
model counted twice in an ensemble, and --recalibrate doing nothing unsaid."""
import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from pneumonia_cnn import builtin
from pneumonia_cnn.fileio import atomic_path
from tests.conftest import full_disk_for_temporary_files
from tests.test_cli_guards import digest, run

EXAMPLE = Path(builtin.checkpoint_path()).parent / "examples" / "NORMAL_IM-0128-0001.jpeg"


@pytest.fixture()
def run_folder(tmp_path) -> Path:
    """What training leaves: best.pt and last.pt beside the run's config.json, history and test metrics."""
    from pneumonia_cnn.training.config import TrainConfig
    folder = tmp_path / "run2"
    folder.mkdir()
    for name in ("best.pt", "last.pt"):
        shutil.copyfile(builtin.checkpoint_path(), folder / name)
    (folder / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    (folder / "history.csv").write_text("epoch,loss\n1,0.5\n")
    (folder / "test_metrics.json").write_text(json.dumps({"data": "kaggle", "split": "test", "metrics": {}}))
    return folder


@pytest.fixture()
def victim(tmp_path) -> Path:
    return Path(shutil.copyfile(EXAMPLE, tmp_path / "victim.jpeg"))


def _refused(capsys, argv, target, message):
    before = digest(target) if target.exists() else None
    status, error = run(capsys, *argv)
    assert (status, error) == (2, f"error: {target}: {message}"), argv
    assert (digest(target) if target.exists() else None) == before, argv


def test_a_checkpoint_output_never_replaces_a_runs_checkpoint_or_another_file(capsys, tmp_path, run_folder, victim,
                                                                              small_root):
    site = small_root / "test" / "NORMAL"
    adapt = ["adapt", "builtin", "--data", site, "--out"]
    save_as = ["evaluate", "--data", small_root, "--threshold", "youden", "--no-figures", "--save-as"]
    for argv, flag in ((adapt, "--out"), (save_as, "--save-as")):
        for name in ("best.pt", "last.pt", "config.json"):
            target = run_folder / name
            _refused(capsys, [*argv, target], target, f"{flag} would replace the {name} of the training run in "
                                                      f"{run_folder} (a run's own files are not replaced); choose "
                                                      f"another path")
        _refused(capsys, [*argv, victim], victim, f"exists and is not a checkpoint ({flag} would replace it); choose "
                                                  f"another path, or remove it")
    assert not any(p.name.startswith(".") and p.suffix == ".tmp" for p in run_folder.iterdir())


def test_a_standalone_checkpoint_is_replaced_so_the_same_command_runs_again(capsys, tmp_path, small_root):
    out = Path(shutil.copyfile(builtin.checkpoint_path(), tmp_path / "site.pt"))  # an earlier adapt's, say
    before = digest(out)
    argv = ["adapt", "builtin", "--data", small_root / "train", "--out", out]
    assert run(capsys, *argv)[0] == 0
    assert digest(out) != before
    assert run(capsys, *argv)[0] == 0  # and again


def test_json_and_html_outputs_replace_only_their_own_kind(capsys, tmp_path, run_folder, victim, small_root):
    metrics = run_folder / "test_metrics.json"
    evaluated = tmp_path / "e.json"
    evaluated.write_text(json.dumps({"data": str(small_root), "split": "test", "metrics": {}}))
    cases = [
        (["evaluate", "--data", small_root, "--no-figures", "--out", victim], victim, "evaluate's metrics JSON"),
        (["stress", "--data", small_root, "--out", victim], victim, "stress's JSON"),
        (["report", "builtin", "--data", small_root, "--no-stress", "--out", victim], victim,
         "a pneumonia-cnn HTML report"),
        (["stress", "--data", small_root, "--out", evaluated], evaluated, "stress's JSON"),  # evaluate's
    ]
    for argv, target, kind in cases:
        _refused(capsys, argv, target, f"exists and is not {kind} (--out would replace it); choose another path, or "
                                       f"remove it")
    for argv in (["report", run_folder, "--data", small_root, "--no-stress", "--out", metrics],
                 ["evaluate", "--data", small_root, "--no-figures", "--out", run_folder / "history.csv"],
                 ["evaluate", "--data", small_root, "--no-figures", "--out", metrics]):  # builtin's, not run2's
        target = Path(argv[-1])
        _refused(capsys, argv, target, f"--out would replace the {target.name} of the training run in {run_folder} "
                                       f"(a run's own files are not replaced); choose another path")


def test_a_commands_own_earlier_output_is_written_again(capsys, tmp_path, small_root):
    out, page = tmp_path / "e.json", tmp_path / "r.html"
    for _ in range(2):
        assert run(capsys, "evaluate", "--data", small_root, "--no-figures", "--bootstrap", "5", "--out", out)[0] == 0
        assert run(capsys, "report", "builtin", "--data", small_root, "--no-stress", "--bootstrap", "5",
                   "--out", page)[0] == 0
    assert json.loads(out.read_text())["n_images"] > 0 and page.read_text().startswith("<!doctype html>")


def test_an_atomic_write_that_fails_for_want_of_room_names_its_file(tmp_path):
    from pneumonia_cnn.fileio import OutputError
    target = tmp_path / "out.json"
    with pytest.raises(OutputError) as caught, atomic_path(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(caught.value) == f"{target}: No space left on device" and caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []  # the temporary file is gone


def test_a_short_write_on_a_full_disk_is_said_to_be_one(tmp_path, monkeypatch):
    """numpy's write to a handle says "36864 requested and 9184 written" and no reason."""
    from pneumonia_cnn.fileio import OutputError
    full = os.statvfs_result((4096, 4096, 16, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(os, "statvfs", lambda _folder: full)
    target = tmp_path / "map.npy"
    with pytest.raises(OutputError, match=f"^{target}: No space left on device$"), atomic_path(target):
        raise OSError("36864 requested and 9184 written")


def test_json_writers_on_a_full_disk_name_the_output(capsys, tmp_path, small_root, monkeypatch):
    """Simulated (a tmpfs needs root: ``test_a_full_disk_is_named_by_every_writer``): the write of the output's
    temporary file fails as on a full disk; it said "[Errno 28] No space left on device", naming no file."""
    full_disk_for_temporary_files(monkeypatch, tmp_path)
    for argv in (["stress", "--data", small_root], ["evaluate", "--data", small_root, "--no-figures",
                                                    "--bootstrap", "5"]):
        out = tmp_path / f"{argv[0]}.json"
        assert run(capsys, *argv, "--out", out) == (2, f"error: {out}: No space left on device")
    assert os.listdir(tmp_path) == []


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped elsewhere: the simulated tests above stand in)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def _fill(disk: Path, leave_kb: int):
    (disk / f"filler-{uuid.uuid4().hex}").write_bytes(b"\0" * ((64 - leave_kb) * 1024))


def test_a_full_disk_is_named_by_every_writer(capsys, tiny_disk, small_root):
    _fill(tiny_disk, 0)
    for argv, out in ((["stress", "--data", small_root], "s.json"),
                      (["evaluate", "--data", small_root, "--no-figures", "--bootstrap", "5"], "e.json"),
                      (["report", "builtin", "--data", small_root, "--no-stress", "--bootstrap", "5"], "r.html"),
                      (["export"], "m.onnx")):
        written = tiny_disk / ("r_test_metrics.json" if out == "r.html" else out)  # the report's JSON comes first
        assert run(capsys, *argv, "--out", tiny_disk / out) == (2, f"error: {written}: No space left on device")


def test_explain_on_a_nearly_full_disk_says_so_and_leaves_no_folder(capsys, tiny_disk):
    _fill(tiny_disk, 36)  # the map (196 KiB) is cut short: numpy said "36864 requested and 9184 written"
    maps = tiny_disk / "maps"
    status, error = run(capsys, "explain", EXAMPLE, "--out", maps)
    assert (status, error) == (2, f"error: {maps / EXAMPLE.stem}_gradcam.npy: No space left on device")
    assert not maps.exists()


@pytest.mark.parametrize("argv, message", [
    (("drift", "builtin", "--data", ""), "argument --data: empty; give a path"),
    (("explain", "x.jpeg", "--out", ""), "argument --out: empty; give a path"),
    (("explain", "x.jpeg", "--out", "maps", "--layer", ""), "argument --layer: empty; give a name"),
    (("adapt", "builtin", "--data", "site", "--out", ""), "argument --out: empty; give a path"),
    (("evaluate", "--data", "d", "--by", " "), "argument --by: empty; give a name"),
    (("evaluate", "--data", "d", "--save-as", ""), "argument --save-as: empty; give a path"),
    (("evaluate", "--checkpoint", "", "--data", "d"), "argument --checkpoint: empty; give a path"),
    (("stress", "", "--data", "d"), "argument checkpoint: empty; give a path"),
    (("predict", ""), "argument [CHECKPOINT] PATH: empty; give a path"),
    (("predict", "a.pt", "b.pt", "--", ""), "argument PATH: empty; give a path"),
    (("train", "--data", "d", "--out", ""), "argument --out: empty; give a path"),
    (("export", "--out", ""), "argument --out: empty; give a path"),
])
def test_an_empty_path_or_name_is_refused_when_parsed(capsys, argv, message):
    status, error = run(capsys, *argv)
    assert status == 2 and error.splitlines()[-1].endswith(message)


def test_bootstrap_has_an_upper_bound(capsys):
    from pneumonia_cnn.cli import build_parser
    for command in (["evaluate", "--data", "d"], ["report", "r"], ["compare", "a", "--data", "d"]):
        status, error = run(capsys, *command, "--bootstrap", "99999999999")
        assert status == 2 and error.splitlines()[-1].endswith(
            "argument --bootstrap: 99999999999 is out of range: give a whole number from 1 to 100000")
        assert build_parser().parse_args([*command, "--bootstrap", "100000"]).bootstrap == 100000


def test_explain_of_unreadable_images_only_makes_no_folder(capsys, tmp_path):
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"garbage")
    status, _ = run(capsys, "explain", bad, "--out", tmp_path / "new" / "maps")
    assert status == 1 and sorted(os.listdir(tmp_path)) == ["bad.jpeg"]


def test_one_checkpoint_twice_is_refused(capsys, tmp_path, run_folder, small_root):
    best = run_folder / "best.pt"
    for argv, item, said in (
            (["evaluate", "--data", small_root, "--checkpoint", run_folder, run_folder], run_folder,
             "--checkpoint names it twice"),
            (["evaluate", "--data", small_root, "--checkpoint", run_folder, best], best,
             f"--checkpoint names the file {run_folder} loads ({best}) again"),
            (["compare", "builtin", "builtin", "--data", small_root], "builtin", "compare names it twice")):
        assert run(capsys, *argv) == (2, f"error: {item}: {said}; give each model once")


def test_recalibrate_without_labelled_images_is_refused(capsys, tmp_path, small_root):
    status, error = run(capsys, "adapt", "--data", small_root / "test", "--recalibrate", "--out", tmp_path / "a.pt")
    assert (status, error) == (2, "error: --recalibrate refits the calibration on the labelled images: give "
                                  "--labelled DIR")
    assert not (tmp_path / "a.pt").exists()
