"""Found by a probe of predict and explain (2026-11-28): a glob that matched folders dropped them silently, a
raw map explain did not write was replaced because the overlay beside it was explain's, and a file named with
the byte 0xff was shown exactly as one named ``x\\xff.jpeg`` (backslash, x, f, f) in every output. Real X-rays,
the built-in model."""
import csv
import io
import json
import os
import shutil

import pytest

from pneumonia_cnn.fileio import display_path, printable
from pneumonia_cnn.predict_io import collect_paths
from tests.conftest import SHARED_DATA, require_shared
from tests.interop.studies import xray_dicom
from tests.test_cli_guards import digest, run


@pytest.fixture()
def xrays():
    require_shared()
    return [*sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:2],
            *sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:2]]


def folders_and_a_file(tmp_path, xrays):
    """in/base.jpeg, and the folders in/dcm (DICOM files, a subfolder, a hidden and a non-image file) and in/dcm2."""
    images = tmp_path / "in"
    (images / "dcm" / "sub").mkdir(parents=True)
    (images / "dcm2").mkdir()
    shutil.copyfile(xrays[0], images / "base.jpeg")
    xray_dicom(xrays[1], images / "dcm" / "b.dcm")
    xray_dicom(xrays[2], images / "dcm" / "sub" / "a.dcm")
    (images / "dcm" / ".hidden.dcm").write_bytes(b"")
    (images / "dcm" / "notes.txt").write_text("not an image")
    shutil.copyfile(xrays[3], images / "dcm2" / "c.jpeg")
    return images


def test_a_folder_a_glob_matches_is_walked_as_one_given_directly(tmp_path, xrays, monkeypatch):
    folders_and_a_file(tmp_path, xrays)
    monkeypatch.chdir(tmp_path)
    walked = ["in/dcm/b.dcm", "in/dcm/sub/a.dcm", "in/dcm2/c.jpeg"]
    assert collect_paths(["in/dcm", "in/dcm2", "in/base.jpeg"]) == (walked + ["in/base.jpeg"], [])
    assert collect_paths(["in/d*", "in/base.jpeg"]) == (walked + ["in/base.jpeg"], [])  # it scored base.jpeg alone
    assert collect_paths(["in/d*"]) == (walked, [])  # "no image or DICOM files found"
    assert collect_paths(["in/dcm/sub/a.dcm", "in/d*"]) == (["in/dcm/sub/a.dcm", *walked[:1], *walked[2:]], [])
    assert collect_paths(["in/dcm*/"]) == ([f"in/dcm/{name}" for name in ("b.dcm", "sub/a.dcm")]
                                          + ["in/dcm2/c.jpeg"], [])
    # `in/**` matches in/ itself first: its walk, as for `in` given, covers every match below it (a review saw
    # the walk's images followed by the non-image files the glob matched too)
    assert collect_paths(["in/**"]) == collect_paths(["in"]) == (["in/base.jpeg", *walked], [])


def test_predict_and_explain_take_the_folders_a_quoted_glob_matches(tmp_path, xrays, monkeypatch, capsys):
    folders_and_a_file(tmp_path, xrays)
    monkeypatch.chdir(tmp_path)
    assert main_rows(capsys, "predict", "in/d*") == ["in/dcm/b.dcm", "in/dcm/sub/a.dcm", "in/dcm2/c.jpeg"]
    assert main_rows(capsys, "predict", "in/d*", "in/base.jpeg") == ["in/dcm/b.dcm", "in/dcm/sub/a.dcm",
                                                                      "in/dcm2/c.jpeg", "in/base.jpeg"]
    assert run(capsys, "explain", "in/d*", "--out", "maps")[0] == 0
    assert sorted(os.listdir("maps")) == sorted(f"{stem}_gradcam.{kind}" for stem in "abc" for kind in ("npy", "png"))


def main_rows(capsys, *argv) -> list[str]:
    from pneumonia_cnn.cli import main
    assert main([*argv, "--format", "csv"]) == 0
    return [row["path"] for row in csv.DictReader(io.StringIO(capsys.readouterr().out))]


def test_a_map_explain_did_not_write_is_kept_beside_its_own_overlay(tmp_path, xrays, capsys):
    image, maps = tmp_path / "base.jpeg", tmp_path / "m6"
    shutil.copyfile(xrays[0], image)
    assert run(capsys, "explain", image, "--out", maps)[0] == 0
    assert run(capsys, "explain", image, "--out", maps)[0] == 0  # its own pair: made again
    (maps / "base_gradcam.npy").write_text("precious\n")
    before = digest(maps / "base_gradcam.png")
    status, error = run(capsys, "explain", image, "--out", maps)
    assert (status, error) == (2, f"error: {maps / 'base_gradcam.npy'}: holds a file this version of explain did "
                                  f"not write (an earlier version's overlay, or another program's); the overlay "
                                  f"of {image} would replace it; give another --out, or remove it")
    assert (maps / "base_gradcam.npy").read_text() == "precious\n" and digest(maps / "base_gradcam.png") == before
    other = tmp_path / "other.jpeg"  # another image's genuine map is not this overlay's either
    shutil.copyfile(xrays[2], other)
    assert run(capsys, "explain", other, "--out", tmp_path / "m7")[0] == 0
    shutil.copyfile(tmp_path / "m7" / "other_gradcam.npy", maps / "base_gradcam.npy")
    status, error = run(capsys, "explain", image, "--out", maps)
    assert status == 2 and error.startswith(f"error: {maps / 'base_gradcam.npy'}: holds a file this version")
    (maps / "base_gradcam.npy").unlink()  # removed, as the message says: the overlay is its own, made again
    assert run(capsys, "explain", image, "--out", maps)[0] == 0 and (maps / "base_gradcam.npy").is_file()


BYTE_NAME = b"x\xff.jpeg"  # not UTF-8
BACKSLASH_NAME = "x\\xff.jpeg"  # backslash, x, f, f


@pytest.fixture()
def ambiguous(tmp_path, xrays):
    folder = tmp_path / "amb"
    folder.mkdir()
    shutil.copyfile(xrays[0], os.fsencode(folder) + b"/" + BYTE_NAME)
    shutil.copyfile(xrays[2], folder / BACKSLASH_NAME)
    return folder


def test_two_names_one_escaped_one_with_a_backslash_are_told_apart_in_every_format(ambiguous, capsys, monkeypatch):
    from pneumonia_cnn.cli import main
    monkeypatch.chdir(ambiguous.parent)  # short paths: the table cuts a long one
    shown = {os.fsdecode(b"amb/" + BYTE_NAME): "amb/x\\xff.jpeg", f"amb/{BACKSLASH_NAME}": "amb/x\\\\xff.jpeg"}
    assert {display_path(name) for name in shown} == set(shown.values())  # both were "amb/x\\xff.jpeg"
    for fmt in ("csv", "json", "table", "fhir"):
        assert main(["predict", "amb", "--format", fmt]) == 0
        out = capsys.readouterr().out
        if fmt == "csv":
            paths = [row["path"] for row in csv.DictReader(io.StringIO(out))]
        elif fmt == "json":
            paths = [row["path"] for row in json.loads(out)]
        elif fmt == "fhir":
            paths = image_identifiers(json.loads(out))
        else:
            paths = [line.split("  ")[0].rstrip() for line in out.splitlines()[1:]]
        assert sorted(paths) == sorted(shown.values()), fmt



def test_explain_and_predicts_skip_lines_tell_the_two_names_apart(ambiguous, capsys, caplog, monkeypatch, tmp_path):
    """A review: explain printed both as "amb/x\\xff.jpeg: ... -> ov/x\\xff_gradcam.png", and predict's
    line for a missing file showed the backslash name as the byte name."""
    from pneumonia_cnn.cli import main
    monkeypatch.chdir(ambiguous.parent)
    assert main(["explain", "amb", "--out", str(tmp_path / "ov")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split(": p=")[0] for line in lines) == ["amb/x\\\\xff.jpeg", "amb/x\\xff.jpeg"]
    assert len({line.split(" -> ")[1] for line in lines}) == 2  # and their overlays
    assert main(["predict", f"amb/z{BACKSLASH_NAME[1:]}", "amb", "--format", "csv"]) == 0
    assert "skipped amb/z\\\\xff.jpeg: no such file or folder" in [r.getMessage() for r in caplog.records]

def test_displayed_paths_keep_every_other_name_as_it_was():
    assert display_path("chest/肺炎 a.jpeg") == "chest/肺炎 a.jpeg"
    assert display_path(os.fsdecode(b"bad\xff.jpeg")) == "bad\\xff.jpeg"
    assert display_path("ward\\3.jpeg") == "ward\\\\3.jpeg"
    # a C1 control and the byte that display_path shows as \x85 differ on a terminal too
    assert printable(display_path("a\x85.jpeg")) == "a\\u0085.jpeg"
    assert printable(display_path(os.fsdecode(b"a\x85.jpeg"))) == "a\\x85.jpeg"


def image_identifiers(document) -> list[str]:
    """The image identifiers of a FHIR document's Observations, wherever they are nested."""
    if isinstance(document, list):
        return [value for item in document for value in image_identifiers(item)]
    if not isinstance(document, dict):
        return []
    if document.get("system") == "urn:pneumonia-cnn:image":
        return [document["value"]]
    return [value for item in document.values() for value in image_identifiers(item)]


def test_a_ctrl_c_while_explain_writes_a_pair_waits_until_both_are_in_place(tmp_path, xrays, monkeypatch):
    """A review: Ctrl-C between the overlay's rename and its map's left the new overlay beside the old map, whose
    digest it then disowned, so every later explain into that folder refused its own map."""
    import signal

    import numpy as np

    from pneumonia_cnn import explanation
    png = tmp_path / "x_gradcam.png"
    gray, cam = np.zeros((64, 64), np.uint8), np.random.default_rng(0).random((64, 64)).astype(np.float32)
    explanation.write_overlay(png, gray, cam, xrays[0])
    old_map = png.with_suffix(".npy").read_bytes()
    original = explanation.write_bytes

    def interrupted_midway(target, payload, name):
        original(target, payload, name)
        if str(name).endswith(".png"):
            os.kill(os.getpid(), signal.SIGINT)  # arrives as the pair is being put in place
    monkeypatch.setattr(explanation, "write_bytes", interrupted_midway)
    with pytest.raises(KeyboardInterrupt):
        explanation.write_overlay(png, gray, cam * 2, xrays[0])
    new_map = png.with_suffix(".npy").read_bytes()
    assert new_map != old_map and explanation._overlay_record(png, "pneumonia-cnn map") == \
        explanation._map_digest(png.with_suffix(".npy"))  # the pair is whole: the new overlay owns the new map


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_a_checkpoint_among_the_images_without_the_double_dash_is_refused_with_the_way_to_write_it(
        command, trained_run, tmp_path, xrays, capsys):
    """`predict runs/a runs/b scans/` (an ensemble, its `--` forgotten) scored runs/b's pictures as X-rays, exit 0."""
    second = tmp_path / "b"
    second.mkdir()
    shutil.copyfile(trained_run / "best.pt", second / "best.pt")
    shutil.copyfile(xrays[0], second / "curves.png")  # a run folder's pictures: read as images before
    out = ["--out", tmp_path / "maps"] if command == "explain" else []
    status, error = run(capsys, command, trained_run, second, xrays[0], *out)
    assert (status, error) == (2, f"error: {second}: a checkpoint among the images; for an ensemble, put -- after "
                                  f"the checkpoints: pneumonia-cnn {command} {trained_run} {second} -- IMAGES")
    status, error = run(capsys, command, xrays[0], second, *out)  # no checkpoint first: it goes first
    assert (status, error) == (2, f"error: {second}: a checkpoint among the images; give the checkpoint first: "
                                  f"pneumonia-cnn {command} {second} IMAGES")
    assert not (tmp_path / "maps").exists()


def test_a_first_name_that_is_a_broken_link_says_so(tmp_path, xrays, capsys):
    """A link loop given first read "no such checkpoint, file or folder", as though nothing were there."""
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    assert run(capsys, "predict", tmp_path / "loop_a", xrays[0]) == (
        2, f"error: {tmp_path / 'loop_a'}: no such checkpoint, file or folder (a symbolic link loop)")
    assert run(capsys, "predict", tmp_path / "dangling", xrays[0]) == (
        2, f"error: {tmp_path / 'dangling'}: no such checkpoint, file or folder (a symbolic link to a missing file)")
