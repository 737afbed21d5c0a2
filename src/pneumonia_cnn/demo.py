"""``demo``: the whole pipeline (train, evaluate, curves) on synthetic X-rays, in a couple of minutes, then
the built-in model on the real example X-rays that ship with the package."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from .data.synthetic import make_synthetic_dataset
from .errors import PneumoniaCNNError
from .experiment import train_and_evaluate
from .fileio import display_path
from .training import make_config

MARK = ".pneumonia-cnn-demo"  # a folder demo made: a rerun may replace what it holds


def run_demo(out="runs/demo", data=None, epochs=None, size=None, device="auto") -> dict:
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not made_by_demo(out):
        raise PneumoniaCNNError(f"{display_path(out)}: --out holds files demo did not write (it would write its "
                                f"images, run and cache among them); give a new or empty folder")
    if out.exists() and not out.is_dir():
        raise PneumoniaCNNError(f"{display_path(out)}: --out is a file; give a folder")
    start = time.perf_counter()
    with _removed_unless_trained(out):
        out.mkdir(parents=True, exist_ok=True)
        (out / MARK).touch()
        if data is None:
            data = make_synthetic_dataset(out / "data", {"train": 300, "val": 60, "test": 60}, size=128)
            defaults = {"epochs": 10, "size": 96}
        else:
            defaults = {"epochs": 10, "size": 224}
        config = make_config("tutorial", data=str(data), out=str(out / "run"), epochs=epochs or defaults["epochs"],
                             size=size or defaults["size"], device=device, cache_dir=str(out / "cache"))
        summary = train_and_evaluate(config)
    summary["examples"] = score_examples(device)
    summary["seconds"] = time.perf_counter() - start
    return summary


@contextlib.contextmanager
def _removed_unless_trained(out: Path):
    """A demo that fails before its run holds a checkpoint (``--data`` a file, or no readable image) removes what
    it made (its mark, cache, images, run and folders), so that a failed run leaves nothing behind; what was there
    before stays, and so does everything once a checkpoint exists (an interrupted demo keeps its epochs)."""
    made = [out / name for name in ("run", "cache", "data", MARK) if not (out / name).exists()]
    folders = [folder for folder in [out, *out.parents] if not folder.exists()]  # innermost first
    try:
        yield
    except BaseException:
        if not any((out / "run" / name).exists() for name in ("best.pt", "last.pt")):
            for path in made:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            for folder in folders:
                with contextlib.suppress(OSError):  # one something else has written into meanwhile stays
                    folder.rmdir()
        raise


def made_by_demo(out: Path) -> bool:
    """Marked by demo, or (written before the mark) a run trained on the synthetic images beside it."""
    if (out / MARK).exists():
        return True
    try:
        return Path(json.loads((out / "run" / "config.json").read_text())["data"]).resolve() == (out / "data").resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def score_examples(device="auto") -> list:
    """The built-in model's predictions for the packaged example X-rays ([] when it is not installed)."""
    from . import builtin
    if not builtin.available() or not builtin.example_paths():
        return []
    from .inference import Predictor
    return Predictor("builtin", device).predict_files(builtin.example_paths())
