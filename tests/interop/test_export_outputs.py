"""Found by a hostile probe (2026-11-27): ``export --format onnx --data DIR`` ignored --data silently, ``export
--out victim.jpeg`` replaced an X-ray with ONNX bytes, and ``--format torchscript --out victim.onnx`` wrote a
TorchScript zip under .onnx. Each is refused in one line before any work (the built-in model, a real X-ray)."""
import shutil
from pathlib import Path

from pneumonia_cnn import builtin
from tests.conftest import SHARED_DATA, require_shared
from tests.test_cli_guards import digest, run


def test_export_refuses_an_out_of_another_kind_and_data_it_would_not_use(capsys, tmp_path):
    require_shared()
    victim = Path(shutil.copyfile(sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0], tmp_path / "victim.jpeg"))
    kept = digest(victim)
    status, error = run(capsys, "export", "--data", SHARED_DATA, "--out", tmp_path / "m.onnx")
    assert (status, error) == (2, f"error: --data {SHARED_DATA}: used only by --format onnx-int8 (its calibration "
                                  f"images); --format onnx takes none")
    status, error = run(capsys, "export", "--out", victim)
    assert (status, error) == (2, f"error: {victim}: --format onnx writes a file ending in .onnx; give --out such a "
                                  f"name")
    status, error = run(capsys, "export", "--format", "torchscript", "--out", tmp_path / "m.onnx")
    assert (status, error) == (2, f"error: {tmp_path / 'm.onnx'}: --format torchscript writes a file ending in .pt or "
                                  f".pth or .ts or .torchscript; give --out such a name")
    assert digest(victim) == kept and not (tmp_path / "m.onnx").exists()
    disguised = Path(shutil.copyfile(victim, tmp_path / "disguised.onnx"))  # an X-ray under an ONNX name
    other_run = Path(shutil.copyfile(builtin.checkpoint_path(), tmp_path / "best.pt"))  # another run's checkpoint
    for fmt, out, kind in (("onnx", disguised, "an ONNX model"), ("torchscript", other_run, "a TorchScript model")):
        before = digest(out)
        status, error = run(capsys, "export", "--format", fmt, "--out", out)
        assert (status, error) == (2, f"error: {out}: exists and is not {kind} (the export would replace it); choose "
                                      f"another --out, or remove it")
        assert digest(out) == before
    (tmp_path / "empty.onnx").write_bytes(b"")  # mktemp's empty file: nothing to lose
    for fmt, out in (("onnx", tmp_path / "m.onnx"), ("torchscript", tmp_path / "m.pt"),
                     ("onnx", tmp_path / "empty.onnx"), ("torchscript", tmp_path / "m.ts")):
        for _ in range(2):  # its own format is written again
            assert run(capsys, "export", "--format", fmt, "--out", out)[0] == 0
