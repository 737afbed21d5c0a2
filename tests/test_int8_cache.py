"""Found by a hostile probe (2026-11-27): the shared int8 cache that every ``--engine onnx-int8`` and
``openvino-int8`` run reads was replaced by a graph calibrated on two "validation" images (the check only asked
that the images be among the stored ones), and a damaged cached graph ended predict in a traceback (ONNX
Runtime's InvalidProtobuf, OpenVINO's RuntimeError). The built-in model and the shared validation split."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from pneumonia_cnn import builtin
from tests.conftest import SHARED_DATA, require_shared
from tests.test_cli_guards import run

pytest.importorskip("onnxruntime")
EXAMPLE = Path(builtin.checkpoint_path()).parent / "examples" / "NORMAL_IM-0128-0001.jpeg"


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The built-in model's int8 graph, calibrated on its whole validation split, in a cache of this module."""
    require_shared()
    from pneumonia_cnn.cli import main
    folder = tmp_path_factory.mktemp("int8")
    previous = os.environ.get("PNEUMONIA_CNN_CACHE")
    os.environ["PNEUMONIA_CNN_CACHE"] = str(folder / "cache")
    try:
        assert main(["export", "--format", "onnx-int8", "--data", str(SHARED_DATA), "--out",
                     str(folder / "model.int8.onnx")]) == 0
        yield next((folder / "cache" / "int8").glob("*.onnx"))
    finally:
        os.environ.pop("PNEUMONIA_CNN_CACHE") if previous is None else os.environ.update(PNEUMONIA_CNN_CACHE=previous)


def part_of_validation(root: Path) -> Path:
    for name in ("NORMAL", "PNEUMONIA"):  # one real validation image per class
        (root / "val" / name).mkdir(parents=True)
        source = sorted((SHARED_DATA / "val" / name).iterdir())[0]
        shutil.copyfile(source, root / "val" / name / source.name)
    return root


def test_int8_calibration_takes_the_whole_validation_split(capsys, tmp_path, built):
    before = digest(built)
    status, error = run(capsys, "export", "--format", "onnx-int8", "--data", part_of_validation(tmp_path / "sub"),
                        "--out", tmp_path / "x.int8.onnx")
    assert (status, error) == (2, f"error: {tmp_path / 'sub' / 'val'}: holds 2 of the 553 validation images this "
                                  f"checkpoint's decision was fitted on; calibrate on the run's own validation "
                                  f"split (at least 100 of its images, all when it has fewer)")
    assert digest(built) == before and not (tmp_path / "x.int8.onnx").exists()


def test_the_cache_keeps_a_graph_calibrated_on_more_images(capsys, caplog, tmp_path, built):
    """A checkpoint that stores no fingerprints cannot have its split checked: its graph is written to --out,
    but the shared cache keeps the one calibrated on more images."""
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=True)
    del checkpoint["reference"]["val"]["fingerprints"]
    torch.save(checkpoint, tmp_path / "unchecked.pt")
    before = digest(built)
    out = tmp_path / "x.int8.onnx"
    status, _ = run(capsys, "export", tmp_path / "unchecked.pt", "--format", "onnx-int8", "--data",
                    part_of_validation(tmp_path / "sub"), "--out", out)
    assert status == 0 and digest(built) == before
    from pneumonia_cnn.inference.quantize import calibration_count
    assert calibration_count(built) == 553 and calibration_count(out) == 2  # distinct images: 559 files
    assert f"{built}: the cached int8 model, calibrated on 553 images, is kept (these are 2, unchecked)" in caplog.text


def test_an_adapted_checkpoint_calibrates_on_its_source_split_and_checked_beats_unchecked(capsys, tmp_path, built):
    """adapt --labelled records the site images it was tuned on beside the source's validation fingerprints:
    the source's split was refused as "553 of the 573". And a graph calibrated on an unchecked split, however
    large, must not keep a checked one out of the cache."""
    from pneumonia_cnn.inference.quantize import calibration_record, keeps_cached
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=True)
    # what adaptation.adapted_reference keeps: the fingerprints (source's, then 20 site images'), no scores
    checkpoint["reference"] = {"val": {"fingerprints": checkpoint["reference"]["val"]["fingerprints"]
                                       + [f"{i:016x}" for i in range(20)]}}
    torch.save(checkpoint, tmp_path / "adapted_like.pt")
    status, _ = run(capsys, "export", tmp_path / "adapted_like.pt", "--format", "onnx-int8", "--data", SHARED_DATA,
                    "--out", tmp_path / "a.int8.onnx")
    assert status == 0 and calibration_record(tmp_path / "a.int8.onnx") == (553, True)
    assert not keeps_cached((4000, False), 553, True) and keeps_cached((553, True), 4000, False)
    assert keeps_cached((553, True), 2, True) and not keeps_cached((100, True), 553, True)


@pytest.mark.parametrize("engine", ["onnx-int8", "openvino-int8"])
def test_a_damaged_cached_int8_graph_is_one_line(capsys, built, engine):
    if engine == "openvino-int8":
        pytest.importorskip("openvino")
    whole = built.read_bytes()
    try:
        built.write_bytes(whole[:1000])  # cut short (a full disk, an interrupted copy)
        status, error = run(capsys, "predict", EXAMPLE, "--engine", engine)
    finally:
        built.write_bytes(whole)
    assert (status, error) == (2, f"error: --engine {engine}: the cached int8 model {built} is damaged (it cannot "
                                  f"be read); build it again: pneumonia-cnn export CHECKPOINT --format onnx-int8 "
                                  f"--data ROOT --out model.int8.onnx (ROOT/val: the checkpoint's validation images)")
