"""A checkpoint damaged on disk loaded silently: torch.load never checks the zip entries' CRC-32, and
load_state_dict casts integer values into float weights. One flipped bit scored an X-ray 0.0000 (the built-in
model: 0.9981), with exit 0; evaluate reported an AUC of 0.5. Now each is a one-line refusal."""
import shutil
import zipfile

import pytest
import torch

from pneumonia_cnn import builtin
from pneumonia_cnn.cli import main
from tests.conftest import SHARED_DATA, require_shared


def image() -> str:
    require_shared()
    return str(sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0])


def refusal(capsys, checkpoint) -> str:
    assert main(["predict", str(checkpoint), "--", image()]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err.strip()


def test_one_flipped_bit_in_a_weight_is_refused_by_its_checksum(tmp_path, capsys):
    damaged = tmp_path / "damaged.pt"
    shutil.copyfile(builtin.checkpoint_path(), damaged)
    with zipfile.ZipFile(damaged) as archive:
        largest = max(archive.infolist(), key=lambda entry: entry.file_size)
    data = bytearray(damaged.read_bytes())
    name_and_extra = int.from_bytes(data[largest.header_offset + 26:largest.header_offset + 30], "little")
    start = largest.header_offset + 30 + (name_and_extra & 0xFFFF) + (name_and_extra >> 16)
    data[start + 403] ^= 0x40  # one bit of one float32 weight
    damaged.write_bytes(bytes(data))
    entry = largest.filename.split("/", 1)[1]
    assert refusal(capsys, damaged) == (f"error: {damaged}: not a readable checkpoint (damaged: the checksum of "
                                        f"{entry} does not match its bytes)")
    assert main(["predict", builtin.NAME, "--", image()]) == 0  # the original still scores


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_integer_values_in_a_float_weight_are_refused(tmp_path, capsys, dtype):
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=False)
    checkpoint["state_dict"]["stem.0.weight"] = checkpoint["state_dict"]["stem.0.weight"].to(dtype)
    torch.save(checkpoint, tmp_path / "changed.pt")
    kind = str(dtype).removeprefix("torch.")
    assert refusal(capsys, tmp_path / "changed.pt") == (
        f"error: {tmp_path / 'changed.pt'}: weights do not fit model resnet18_narrow (stem.0.weight holds {kind} "
        f"values, the model float32)")


def test_preprocessing_that_promises_another_input_than_the_model_takes_is_refused(tmp_path, capsys):
    """``preprocessing.channels: 3`` on the gray built-in model made info describe a 3-channel input."""
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=False)
    checkpoint["preprocessing"]["channels"] = 3
    torch.save(checkpoint, tmp_path / "changed.pt")
    assert refusal(capsys, tmp_path / "changed.pt") == (
        f"error: {tmp_path / 'changed.pt'}: not a usable checkpoint: preprocessing.channels 3 differs from the "
        f"model's in_channels 1")


def test_a_checkpoint_saved_without_checksums_still_loads(tmp_path, capsys):
    """torch can save with its CRC-32s off (``torch.utils.serialization.config.save.compute_crc32``): every entry
    then reads 0, which is no mismatch."""
    from torch.utils.serialization import config
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=False)
    saved = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(checkpoint, tmp_path / "no_crc.pt")
    finally:
        config.save.compute_crc32 = saved
    with zipfile.ZipFile(tmp_path / "no_crc.pt") as archive:
        assert {entry.CRC for entry in archive.infolist() if entry.file_size} == {0}
    assert main(["predict", str(tmp_path / "no_crc.pt"), "--", image()]) == 0
    assert "0.99" in capsys.readouterr().out
