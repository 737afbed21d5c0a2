"""Re-run the built-in model's end-of-run fits with today's code, its weights unchanged.

    python benchmarks/refit_builtin.py --out runs/builtin_refit
    python benchmarks/builtin_model.py runs/builtin_refit

Training's last step (``training.finish.finish_run``: the decision and calibration on val, the OOD detector on
1,000 training images with its threshold on val, the ``--adapt-batch`` decision, the val reference) depends
only on the weights and the data, so when that step changes (a new detector recipe) the built-in model gets it
without a retraining whose weights would differ (it was trained on another machine). The stored configuration
is used as it is, its ``data`` pointed at ``--data``; the run's history and epoch are kept. The main decision
(threshold, calibration, and the val scores they were fitted on) is kept as stored: scored again on another
CPU it moves in the 8th digit, and the image whose score set the threshold could change label.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn import builtin  # noqa: E402
from pneumonia_cnn.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pneumonia_cnn.errors import PneumoniaCNNError  # noqa: E402
from pneumonia_cnn.training.config import config_from_dict  # noqa: E402
from pneumonia_cnn.training.data import prepare_data  # noqa: E402
from pneumonia_cnn.training.distributed import Distributed  # noqa: E402
from pneumonia_cnn.training.finish import finish_run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder to write best.pt into (created)")
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    args = parser.parse_args()
    out = Path(args.out)
    try:
        if (out / "best.pt").exists():  # a run's own checkpoint would be replaced by the built-in model's
            raise PneumoniaCNNError(f"{out / 'best.pt'}: already exists; give a new --out folder")
        stored = load_checkpoint(builtin.checkpoint_path())
        config = dataclasses.replace(config_from_dict(stored["config"]), data=args.data, out=str(out), cache_dir="",
                                     workers=0)
        train_set, val_set = prepare_data(config, Distributed())  # the data checked before anything is written
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(builtin.checkpoint_path(), out / "best.pt")
        finish_run(out, config, train_set, val_set, torch.device("cpu"))
        keep_stored_decision(out / "best.pt", stored)
    except (PneumoniaCNNError, OSError) as error:
        sys.exit(f"error: {error}")


def keep_stored_decision(path: Path, stored: dict):
    refitted = load_checkpoint(path)
    refitted.update({key: stored[key] for key in ("threshold", "threshold_policy", "calibration")})
    refitted["decision_fit"].update(stored["decision_fit"])
    refitted["reference"]["val"]["raw_scores"] = stored["reference"]["val"]["raw_scores"]
    refitted.pop("path", None)
    save_checkpoint(refitted, path)
    ood = refitted["ood"]
    print(f"{path}: detector {ood['taps']}, threshold {ood['threshold']:.3f}; decision kept "
          f"(threshold {stored['threshold']})")


if __name__ == "__main__":
    main()
