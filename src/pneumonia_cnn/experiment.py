"""A whole experiment: train (or resume) a run, then score its ``test`` split with ``evaluate``.

This is where training meets evaluation, so that ``training`` (floor 2) never imports ``evaluation`` (floor 3):
``train`` accepts an ``after_training`` callback and this module passes the test-split scoring as one. The
CLI, ``demo``, the Python API and the test fixtures all run experiments through here.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .evaluation.evaluate import evaluate
from .training import TrainConfig, resume, train

log = logging.getLogger(__name__)


def score_test_split(run_dir: Path, config: TrainConfig, device) -> dict:
    """Metrics with 95% intervals of the run's best.pt on DATA/test (written to test_metrics.json), or {}."""
    if not config.evaluate_test or not (Path(config.data) / "test").is_dir():
        return {}
    report = evaluate(Path(run_dir) / "best.pt", config.data, split="test", device=str(device), bootstrap=200,
                      cache_dir=config.cache_dir or None, out=Path(run_dir) / "test_metrics.json", figures=False)
    metrics = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in report["metrics"].items()}
    # debug: the CLI prints the same line on stdout; a library caller has it in the returned summary
    log.debug("test: accuracy %.4f  sensitivity %.4f  specificity %.4f  ROC AUC %.4f", metrics["accuracy"],
             metrics["sensitivity"], metrics["specificity"], metrics.get("roc_auc", float("nan")))
    return {"test_metrics": metrics}


def train_and_evaluate(config: TrainConfig) -> dict:
    """``train(config)``, then the test split scored (when DATA/test exists and ``config.evaluate_test``)."""
    return train(config, after_training=score_test_split)


def resume_and_evaluate(run_dir, **overrides) -> dict:
    """``resume(run_dir)``, then the test split scored as in ``train_and_evaluate``. A run that finished training
    but was stopped while scoring its test split (no test_metrics.json) gets that scoring alone."""
    if int(os.environ.get("RANK", "0")) == 0:
        say_edited_config(Path(run_dir), overrides)
    config = _unscored_finished_run(Path(run_dir)) if overrides.get("epochs") is None else None
    if config is not None:
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, as after training: the first process scores
            return {"main_process": False}
        log.info("%s: finished training; scoring its test split, which was not written", run_dir)
        return {"run_dir": str(run_dir), **score_test_split(Path(run_dir), config, overrides.get("device") or "auto")}
    return resume(run_dir, after_training=score_test_split, **overrides)


def _unscored_finished_run(run_dir: Path) -> TrainConfig | None:
    """The run's config when all its epochs are trained, its decision fitted, and its test split (which it has)
    not yet scored; otherwise None."""
    from .checkpoint import load_checkpoint, training_finished
    from .training import config_from_dict
    if (run_dir / "test_metrics.json").exists() or not (run_dir / "last.pt").is_file() \
            or not (run_dir / "best.pt").is_file():
        return None
    last = load_checkpoint(run_dir / "last.pt")
    state = last.get("training_state")
    if not isinstance(state, dict) or not isinstance(state.get("epoch"), int):
        return None  # resume() names what is wrong with it
    if not training_finished(state, last["config"]) or "decision_fit" not in load_checkpoint(run_dir / "best.pt"):
        return None
    config = config_from_dict(dict(last["config"]))
    return config if config.evaluate_test and (Path(config.data) / "test").is_dir() else None


RESUME_FLAGS = {"epochs": "--epochs", "device": "--device", "progress": "--no-progress"}


def say_edited_config(run_dir: Path, overrides: dict) -> None:
    """A resume continues with the config saved in last.pt, whatever RUN/config.json says: an edited
    config.json was ignored and rewritten without a word. Said in one line. The file is still rewritten to the
    saved config, as the run's record of what it trained with (``info``, a reader of the folder, a later
    ``--config RUN/config.json`` for a new run), rather than left to describe a run that never happened."""
    from .checkpoint import load_checkpoint
    from .fileio import display_path, write_json_atomic
    from .training.config import upgrade_legacy_fields
    path = run_dir / "config.json"
    if not path.is_file() or not (run_dir / "last.pt").is_file():
        return  # no edit to speak of; resume() says what is missing
    try:
        saved = upgrade_legacy_fields(load_checkpoint(run_dir / "last.pt")["config"])
    except Exception:  # noqa: BLE001 (resume() names what is wrong with last.pt)
        return
    changed: list[str] = []
    try:
        edited = upgrade_legacy_fields(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        what = f"cannot be read ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    else:
        given = {name for name, value in overrides.items() if value is not None} | {"out"}
        changed = sorted(name for name in set(saved) | set(edited)
                         if name not in given and saved.get(name) != edited.get(name))
        if not changed:
            return
        shown = ", ".join(f"{name} {edited.get(name, '(missing)')} vs {saved.get(name, '(missing)')}"
                          for name in changed[:3]) + (", ..." if len(changed) > 3 else "")
        what = f"differs from the run's saved config ({shown})"
    flags = [RESUME_FLAGS[name] for name in changed if name in RESUME_FLAGS]
    hint = f"give {', '.join(flags)} to change that" if changed and len(flags) == len(changed) else \
        "start a new run to change it"
    log.warning("%s: %s: resuming with the saved one, which config.json is rewritten to; %s", display_path(path),
                what, hint)
    write_json_atomic(path, {**saved, "out": str(run_dir)})  # now: a resume that only scores its test split
    # writes no config.json, and one that fails to start must not leave the file saying what the run never used
