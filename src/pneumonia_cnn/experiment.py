"""A whole experiment: train (or resume) a run, then score its ``test`` split with ``evaluate``.

This is where training meets evaluation, so that ``training`` (floor 2) never imports ``evaluation`` (floor 3):
``train`` accepts an ``after_training`` callback and this module passes the test-split scoring as one. The
CLI, ``demo``, the Python API and the test fixtures all run experiments through here.
"""
from __future__ import annotations

import logging
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
    """``resume(run_dir)``, then the test split scored as in ``train_and_evaluate``."""
    return resume(run_dir, after_training=score_test_split, **overrides)
