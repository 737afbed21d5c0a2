"""The command line refuses, in one line and before any work, what would destroy an input, quietly use
another model, or silently do nothing; and it keeps what was done (key files, run folders, overlays)."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pneumonia_cnn import builtin
from pneumonia_cnn.cli import main
from tests.conftest import KERAS_FIXTURES, SHARED_DATA, write_image

EXAMPLES = Path(builtin.checkpoint_path()).parent / "examples"


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(capsys, *argv) -> tuple[int, str]:
    """``main`` in this process (argparse's own refusals exit 2): the exit status and stderr, stripped."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err.strip()


@pytest.fixture()
def model_copy(tmp_path) -> Path:
    return Path(shutil.copy(builtin.checkpoint_path(), tmp_path / "ck.pt"))


def test_an_output_that_is_an_input_is_refused_before_anything_is_written(capsys, tmp_path, model_copy,
                                                                           small_root):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},1\n" for p in sorted(EXAMPLES.glob("PNEUMONIA*"))))
    keras = Path(shutil.copy(KERAS_FIXTURES / "seed_cnn_64x64.h5", tmp_path / "k.h5"))
    image = sorted((small_root / "test" / "NORMAL").iterdir())[0]
    cases = [  # (argv, the input it would destroy, the argument that names that input)
        (("evaluate", "--checkpoint", model_copy, "--data", labels, "--out", model_copy), model_copy, model_copy),
        (("evaluate", "--data", labels, "--out", labels), labels, labels),
        (("evaluate", "--checkpoint", model_copy, "--data", labels, "--save-as", model_copy), model_copy, model_copy),
        (("stress", model_copy, "--data", small_root, "--out", model_copy), model_copy, model_copy),
        (("report", model_copy, "--data", small_root, "--out", model_copy), model_copy, model_copy),
        (("export", model_copy, "--out", model_copy), model_copy, model_copy),
        (("export", model_copy, "--format", "onnx-int8", "--data", small_root, "--out", model_copy), model_copy,
         model_copy),
        (("adapt", model_copy, "--data", small_root / "test", "--out", model_copy), model_copy, model_copy),
        (("import-keras", keras, "--out", keras), keras, keras),
    ]
    for argv, victim, named in cases:
        before = digest(victim)
        status, error = run(capsys, *argv)
        flag = "--save-as" if "--save-as" in argv else "--out"
        assert (status, error) == (2, f"error: {victim}: {flag} would overwrite {named}, which this command reads; "
                                      f"choose another path"), argv
        assert digest(victim) == before, argv
    # an image written into a data folder's subfolders (an existing one, or a new one) would join the data
    for target in (image, small_root / "train" / "NORMAL" / "s.png"):
        before = target.exists() and digest(target)
        status, error = run(capsys, "show-samples", "--data", small_root, "--split", "test", "--out", target)
        assert (status, error) == (2, f"error: {target}: --out would join the data in {small_root}, which this "
                                      f"command reads; choose a path outside its subfolders")
        assert (target.exists() and digest(target)) == before
    # a flat folder of images (adapt --data, predict DIR): an image at its top is data too
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, source in enumerate(sorted((small_root / "test" / "NORMAL").iterdir())[:2]):
        (flat / f"x{index}.jpeg").write_bytes(source.read_bytes())
    before = digest(flat / "x0.jpeg")
    status, error = run(capsys, "adapt", "builtin", "--data", flat, "--out", flat / "x0.jpeg")
    assert (status, error) == (2, f"error: {flat / 'x0.jpeg'}: --out would overwrite an image in {flat}, which "
                                  f"this command reads; choose another path")
    assert digest(flat / "x0.jpeg") == before
    # beside the data, at its top, is where a picture of it may go
    assert run(capsys, "show-samples", "--data", small_root, "--split", "test", "--per-class", "1",
               "--out", small_root / "samples.png")[0] == 0 and (small_root / "samples.png").is_file()
    (small_root / "samples.png").unlink()


def test_the_output_path_is_checked_before_the_scoring(capsys, tmp_path):
    (tmp_path / "folder").mkdir()
    status, error = run(capsys, "stress", "builtin", "--data", tmp_path, "--out", tmp_path / "folder")
    assert (status, error) == (2, f"error: {tmp_path / 'folder'}: --out is a folder; give a file path")
    status, error = run(capsys, "evaluate", "--data", tmp_path, "--out", "/proc/nope/e.json")
    assert status == 2 and error.startswith("error: /proc/nope/e.json: cannot create its folder (")


def test_a_checkpoint_that_is_not_there_is_an_error_not_the_builtin_model(capsys, tmp_path):
    image = EXAMPLES / "NORMAL_IM-0128-0001.jpeg"
    for command in ("predict", "explain"):
        extra = ("--out", tmp_path / "maps") if command == "explain" else ()
        status, error = run(capsys, command, tmp_path / "runs" / "typo" / "best.pt", image, *extra)
        assert (status, error) == (2, f"error: {tmp_path / 'runs' / 'typo' / 'best.pt'}: checkpoint not found")
        status, error = run(capsys, command, tmp_path / "runs" / "typo", image, *extra)  # a mistyped run folder
        assert (status, error) == (2, f"error: {tmp_path / 'runs' / 'typo'}: no such checkpoint, file or folder")
    run_folder = tmp_path / "unfinished"
    run_folder.mkdir()
    (run_folder / "config.json").write_text("{}")
    status, error = run(capsys, "predict", run_folder, image)
    assert (status, error) == (2, f"error: {run_folder}: run folder has no best.pt or last.pt (training has not "
                                  f"written one yet)")
    assert not (tmp_path / "maps").exists()


def test_nothing_to_score_is_an_error(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    status, error = run(capsys, "predict", tmp_path / "empty")
    assert (status, error) == (2, f"error: {tmp_path / 'empty'}: no image or DICOM files found")
    status, error = run(capsys, "explain", tmp_path / "empty", "--out", tmp_path / "maps")
    assert (status, error) == (2, f"error: {tmp_path / 'empty'}: no image or DICOM files found")
    image = next((SHARED_DATA / "test" / "NORMAL").iterdir())
    status, error = run(capsys, "explain", image, "--out", image)  # was a raw "[Errno 17] File exists"
    assert (status, error) == (2, f"error: {image}: --out is a file; give a folder for the overlays")


@pytest.mark.parametrize("argv, message", [
    (("predict", "x.jpeg", "--batch-size", "-1"), "argument --batch-size: -1 is out of range: give a whole number "
                                                  "of at least 1"),
    (("predict", "x.jpeg", "--batch-size", "0"), "argument --batch-size: 0 is out of range"),
    (("evaluate", "--data", "d", "--bootstrap", "0"), "argument --bootstrap: 0 is out of range"),
    (("show-samples", "--data", "d", "--per-class", "-3"), "argument --per-class: -3 is out of range: give a "
                                                           "whole number from 1 to 100"),
    (("demo", "--epochs", "0"), "argument --epochs: 0 is out of range"),
    (("summary", "--size", "100000"), "argument --size: 100000 is out of range: give a whole number from 32 to "
                                      "2048"),
    (("serve", "--port", "70000"), "argument --port: 70000 is out of range: give a whole number from 1 to 65535"),
    (("listen", "builtin", "--send-to", "h:1:A", "--retry-after", "-5"), "argument --retry-after: -5 is out of "
                                                                        "range: give a number above 0"),
    (("pacs", "builtin", "--dicomweb", "u", "--interval", "-1"), "argument --interval: -1 is out of range"),
    (("pacs", "builtin", "--dicomweb", "u", "--batch-size", "abc"), "argument --batch-size: 'abc' is not a whole "
                                                                    "number"),
])
def test_out_of_range_values_are_refused_when_parsed(capsys, argv, message):
    status, error = run(capsys, *argv)
    assert status == 2 and message in error.splitlines()[-1]


def test_import_keras_size_must_be_a_size(capsys, tmp_path):
    for size in ("abc", "64x64x3", "0"):
        status, error = run(capsys, "import-keras", KERAS_FIXTURES / "seed_cnn_64x64.h5", "--out",
                            tmp_path / "k.pt", "--size", size)
        assert (status, error) == (2, f"error: --size {size}: give one size (224) or HEIGHTxWIDTH (96x80)")
    for size in ("99999999", "64x8", "8"):  # a size, but not one a model takes
        status, error = run(capsys, "import-keras", KERAS_FIXTURES / "seed_cnn_64x64.h5", "--out",
                            tmp_path / "k.pt", "--size", size)
        assert (status, error) == (2, f"error: --size {size}: each side must be from 16 to 4096 pixels")
    assert not (tmp_path / "k.pt").exists()
    (tmp_path / "blocker").write_text("a file where the output's folder would go")
    status, error = run(capsys, "import-keras", KERAS_FIXTURES / "seed_cnn_64x64.h5", "--out",
                        tmp_path / "blocker" / "x.pt")  # was "cannot create its folder (File exists)"
    assert (status, error) == (2, f"error: {tmp_path / 'blocker' / 'x.pt'}: cannot create its folder "
                                  f"({tmp_path / 'blocker'} is a file)")


def test_a_run_folder_with_a_checkpoint_is_not_trained_over(capsys, tmp_path, small_root):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"an earlier run's model")
    status, error = run(capsys, "train", "--data", small_root, "--out", out)
    assert (status, error) == (2, f"error: {out}: already holds a run (best.pt); continue it with --resume {out}, "
                                  f"or give another --out")
    assert (out / "best.pt").read_bytes() == b"an earlier run's model"


def test_train_takes_data_from_its_config_file(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {tmp_path / 'nowhere'}\n")
    status, error = run(capsys, "train", "--config", config, "--out", tmp_path / "r")
    assert (status, error) == (2, f"error: {tmp_path / 'nowhere'}: folder not found")  # read, not "needs --data"


def test_a_relative_path_in_a_config_file_that_is_not_there_names_the_file_and_where_it_was_read_from(
        capsys, tmp_path, monkeypatch):
    """data: ../../d in cfg/sub/rel.yaml was refused as "../../d: folder not found", naming no config file."""
    config = tmp_path / "cfg" / "sub" / "rel.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("data: ../../d\n")
    monkeypatch.chdir(tmp_path)
    status, error = run(capsys, "train", "--config", "cfg/sub/rel.yaml", "--out", tmp_path / "r")
    assert (status, error) == (2, f"error: cfg/sub/rel.yaml: data: ../../d: not found (a relative path in a config "
                                  f"file is read from the working directory, {tmp_path}, not from the file's folder)")
    status, error = run(capsys, "train", "--config", "cfg/sub/rel.yaml", "--data", tmp_path / "x", "--out",
                        tmp_path / "r")
    assert (status, error) == (2, f"error: {tmp_path / 'x'}: folder not found")  # a flag's value: not the file's


def test_key_file_edits_keep_every_other_line(tmp_path):
    from pneumonia_cnn.serving.auth import KeyRing, add_key, revoke_key
    path = tmp_path / "keys.txt"
    path.write_text("# ward keys\n")
    first = add_key(path, "a")  # a file of comments only takes a first key
    path.write_text(path.read_text().rstrip("\n"))  # an editor that saves without the last newline
    second = add_key(path, "b")
    ring = KeyRing.from_file(path)
    assert ring.check(first).key_id == "a" and ring.check(second).key_id == "b"
    revoke_key(path, "a")
    lines = path.read_text().splitlines()
    assert lines[0] == "# ward keys" and [line.split()[0] for line in lines[1:]] == ["b"]


def test_explain_gives_images_of_the_same_name_their_own_overlays(capsys, tmp_path):
    from pneumonia_cnn.explanation import output_stems
    assert output_stems(["a/x.jpeg", "b/x.jpeg", "c/y.png", "x.png", "a/x.jpeg"]) == [
        "a_x.jpeg", "b_x.jpeg", "y", "_x.png", "a_x.jpeg-2"]
    normal, pneumonia = EXAMPLES / "NORMAL_IM-0128-0001.jpeg", sorted(EXAMPLES.glob("PNEUMONIA*"))[0]
    for folder, source in (("a", normal), ("b", pneumonia)):
        write_image(tmp_path / folder / "x.jpeg", np.asarray(__import__("PIL.Image").Image.open(source)))
    status, _ = run(capsys, "explain", tmp_path / "a" / "x.jpeg", tmp_path / "b" / "x.jpeg", "--out", tmp_path / "m")
    assert status == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "a_x.jpeg_gradcam.npy", "a_x.jpeg_gradcam.png", "b_x.jpeg_gradcam.npy", "b_x.jpeg_gradcam.png"]
    assert not np.array_equal(np.load(tmp_path / "m" / "a_x.jpeg_gradcam.npy"),
                              np.load(tmp_path / "m" / "b_x.jpeg_gradcam.npy"))


def test_written_files_get_the_usual_mode_not_mkstemps_private_one(tmp_path):
    import os

    from pneumonia_cnn.fileio import write_text_atomic
    previous = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "new.json", "{}")
        assert oct((tmp_path / "new.json").stat().st_mode & 0o777) == oct(0o640)  # 0666 less the umask
        existing = tmp_path / "shared.json"
        existing.write_text("old")
        existing.chmod(0o664)
        write_text_atomic(existing, "new")
        assert oct(existing.stat().st_mode & 0o777) == oct(0o664) and existing.read_text() == "new"
    finally:
        os.umask(previous)


def test_binary_files_given_as_text_name_the_file(capsys, tmp_path):
    binary = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 8
    (tmp_path / "labels.csv").write_bytes(binary)
    (tmp_path / "c.yaml").write_bytes(binary)
    status, error = run(capsys, "evaluate", "--data", tmp_path / "labels.csv", "--out", tmp_path / "m.json")
    assert (status, error) == (2, f"error: {tmp_path / 'labels.csv'}: not a text CSV (not UTF-8 at byte 0)")
    status, error = run(capsys, "train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "r")
    assert (status, error) == (2, f"error: {tmp_path / 'c.yaml'}: not a text config file (not UTF-8 at byte 0)")


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "lr: expected a finite number, got nan"),
    ("--lr", "inf", "lr: expected a finite number, got inf"),
    ("--seed", "-1", "seed: -1 is below the minimum 0"),
    ("--size", "100000", "size: 100000 is above the maximum 4096")])  # was accepted, then killed for memory
def test_training_numbers_that_mean_nothing_are_refused_before_reading_data(capsys, tmp_path, flag, value, message):
    status, error = run(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", flag, value)
    assert (status, error) == (2, f"error: {message}") and not (tmp_path / "r").exists()


def test_a_split_that_is_not_there_is_named(capsys, small_root):
    for argv in (("evaluate", "--data", small_root, "--split", "nosuch", "--no-figures"),
                 ("stress", "builtin", "--data", small_root, "--split", "nosuch"),
                 ("show-samples", "--data", small_root, "--split", "nosuch", "--out", small_root.parent / "s.png")):
        status, error = run(capsys, *argv)
        assert (status, error) == (2, f"error: {small_root / 'nosuch'}: folder not found (the splits there: train, "
                                      f"val, test)"), argv


def test_a_split_with_no_readable_image_is_one_line(capsys, tmp_path):
    errors = []
    for name in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "d" / "test" / name).mkdir(parents=True)
        (tmp_path / "d" / "test" / name / "a.jpeg").write_text("not an image")
    for argv in (("stress", "builtin", "--data", tmp_path / "d", "--cache-dir", tmp_path / "c"),
                 ("show-samples", "--data", tmp_path / "d", "--split", "test", "--out", tmp_path / "s.png")):
        status, error = run(capsys, *argv)
        assert status == 2 and "\n" not in error and ": none of its 2 image(s) could be read (first: " in error
        errors.append(error)
    assert errors[0] == errors[1]  # one message, naming the first file and why it could not be read


def test_tls_files_that_are_not_pem_are_named_before_the_model_loads(capsys, tmp_path):
    image = EXAMPLES / "NORMAL_IM-0128-0001.jpeg"
    status, error = run(capsys, "serve", "--ssl-certfile", image, "--ssl-keyfile", image, "--port", "1")
    assert (status, error) == (2, f"error: --ssl-certfile {image} / --ssl-keyfile {image}: not a PEM certificate "
                                  f"and its private key (OpenSSL: unreadable)")
    status, error = run(capsys, "serve", "--ssl-certfile", tmp_path / "no.pem", "--ssl-keyfile", image)
    assert (status, error) == (2, f"error: --ssl-certfile {tmp_path / 'no.pem'} / --ssl-keyfile {image}: No such "
                                  f"file or directory")


@pytest.mark.parametrize("value, reason", [
    ("20261345", "20261345 is not a calendar date"), ("20250230-", "20250230 is not a calendar date"),
    ("20260501-20260401", "the range ends before it starts"),
    ("2026-05-01", "give YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either side may be left open)")])
def test_pacs_study_dates_must_be_dates(capsys, tmp_path, value, reason):
    status, error = run(capsys, "pacs", "builtin", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--study-date", value,
                        "--state", tmp_path / "state.sqlite")
    assert (status, error) == (2, f"error: --study-date {value}: {reason}")


def test_pacs_study_date_ranges_that_are_dates_pass():
    from pneumonia_cnn.interop.dicomweb import check_date_range
    for value in ("20260501", "20260501-", "-20260531", "20260501-20260531", "20240229"):
        assert check_date_range(value) == value


def test_outputs_that_would_replace_an_input_or_join_the_data_are_refused(capsys, tmp_path, small_root):
    """Found by a review: explain wrote x_gradcam.png over an input of that name (now: no overlay among the
    images at all); evaluate --save-as P --out P left
    the report where the refitted model was said to be; train --out inside the data put curves.png among the
    X-rays; adapt --out SITE/new.jpeg wrote a checkpoint among the images it reads."""
    image = sorted((small_root / "test" / "NORMAL").iterdir())[0]
    folder = tmp_path / "b"
    folder.mkdir()
    shutil.copyfile(image, folder / "x.jpeg")
    shutil.copyfile(image, folder / "x_gradcam.png")  # an input that explain's overlay for x.jpeg would replace
    before = digest(folder / "x_gradcam.png")
    status, error = run(capsys, "explain", "builtin", folder, "--out", folder)
    assert (status, error) == (2, f"error: {folder}: --out is among the images explain reads ({folder}); give a "
                                  f"folder outside it")
    assert digest(folder / "x_gradcam.png") == before and not (folder / "x_gradcam.npy").exists()
    same = tmp_path / "same.x"
    status, error = run(capsys, "evaluate", "--data", small_root, "--threshold", "youden", "--save-as", same,
                        "--out", same)
    assert (status, error) == (2, f"error: {same}: --save-as and --out name the same file; give each its own")
    inside = small_root / "train" / "NORMAL" / "run"
    status, error = run(capsys, "train", "--data", small_root, "--out", inside, "--epochs", "1")
    assert (status, error) == (2, f"error: {inside}: --out is inside the data folder {small_root}, which training "
                                  f"reads (its plots would join the images); choose a folder outside it")
    assert not inside.exists()
    from pneumonia_cnn.cli.training import refuse_run_in_data
    refuse_run_in_data(small_root / "runs" / "r", small_root)  # beside the splits (cd DATA; train --data .): allowed
    site = tmp_path / "site"
    site.mkdir()
    shutil.copyfile(image, site / "a.jpeg")
    status, error = run(capsys, "adapt", "builtin", "--data", site, "--out", site / "adapted.jpeg")
    assert (status, error) == (2, f"error: {site / 'adapted.jpeg'}: --out would join the images in {site}, which "
                                  f"this command reads; choose a path outside it")
    assert sorted(p.name for p in site.iterdir()) == ["a.jpeg"]


def test_a_file_where_a_folder_belongs_is_named_with_its_option(capsys, tmp_path, small_root):
    """Raw "[Errno 20] Not a directory" / "[Errno 17] File exists", and "folder not found" for a file that is
    there, before."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    image = sorted((small_root / "test" / "NORMAL").iterdir())[0]
    status, error = run(capsys, "evaluate", "--data", image)
    assert (status, error) == (2, f"error: {image}: a file, not a folder of class folders (predict takes images; "
                                  f"--data takes a folder or a CSV list)")
    status, error = run(capsys, "evaluate", "--data", small_root, "--cache-dir", a_file)
    assert (status, error) == (2, f"error: {a_file}: cannot use it as --cache-dir (Not a directory)")
    status, error = run(capsys, "train", "--data", small_root, "--out", a_file, "--epochs", "1")
    assert (status, error) == (2, f"error: {a_file}: --out is a file; give a folder for the run")
    status, error = run(capsys, "evaluate", "--data", small_root, "--seed", "-1")
    assert status == 2 and error.endswith("argument --seed: -1 is out of range: give a whole number of at least 0")


def test_evaluate_never_replaces_the_metrics_of_another_data_set_by_default(capsys, tmp_path, small_root):
    """evaluate --checkpoint RUN without --out writes RUN/test_metrics.json: training's own test figures were
    replaced by metrics of whatever --data was given. The same data and split again still rewrite it."""
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    shutil.copyfile(builtin.checkpoint_path(), run_folder / "best.pt")
    (run_folder / "config.json").write_text("{}")
    metrics = run_folder / "test_metrics.json"
    metrics.write_text(json.dumps({"data": str(tmp_path / "kaggle"), "split": "test", "metrics": {"accuracy": 0.9}}))
    before = digest(metrics)
    status, error = run(capsys, "evaluate", "--checkpoint", run_folder, "--data", small_root, "--no-figures")
    assert (status, error) == (2, f"error: {metrics}: holds the metrics of {tmp_path / 'kaggle'} (test split); these "
                                  f"of {small_root} (test) would replace them: give --out")
    assert digest(metrics) == before
    status, error = run(capsys, "evaluate", "--checkpoint", run_folder, "--data", tmp_path / "nonexist")
    assert (status, error) == (2, f"error: {tmp_path / 'nonexist'}: folder not found")  # named, not the metrics file
    metrics.write_text(json.dumps({"data": str(small_root), "split": "test"}))
    assert run(capsys, "evaluate", "--checkpoint", run_folder, "--data", small_root, "--no-figures",
               "--bootstrap", "20")[0] == 0
    assert json.loads(metrics.read_text())["n_images"] > 0


def test_a_config_file_of_another_format_says_so(capsys, tmp_path):
    """a.ini was read as JSON: "cannot parse config (Expecting value: line 1 column 1 (char 0))"."""
    config = tmp_path / "a.ini"
    config.write_text("[train]\nepochs = 3\n")
    status, error = run(capsys, "train", "--config", config, "--out", tmp_path / "r")
    assert (status, error) == (2, f"error: {config}: unknown config format '.ini' (a .yaml, .yml, .toml or .json "
                                  f"file)")
