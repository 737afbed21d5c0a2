"""Training, in parts that name themselves:

- ``config``: the configuration, declared once (type, allowed values, default, help) and validated when built;
  the presets; the CLI flags are generated from it.
- ``loop``: the loop, flat, read top to bottom; ``train`` and ``resume``.
- ``setup``: what the loop needs, built once (device, data, model, optimiser, loader, state).
- ``state``: what is saved and resumed.
- ``optim``: optimiser, schedule, weight averaging.  ``distributed``: rank, world size, gathering, stop flag.
- ``data``: the cached train and validation splits.
- ``finish``: the end of a run: calibration, threshold and OOD detector fitted on the served scores.
"""
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the lazy names below resolve to (for type checkers and tests/test_architecture.py)
    from .config import KAGGLE_POPULATION, PRESETS, TUTORIAL_AUGMENT, TrainConfig, config_from_dict, make_config
    from .data import prepare_data
    from .distributed import Distributed, setup_distributed
    from .loop import AfterTraining, resume, train, train_step
    from .optim import learning_rate_factor, make_optimizer, update_ema
    from .setup import start_run

# where each public name lives; imported on first use, so that reading the presets (the CLI's help) does not load
# the loop and its metrics (scikit-learn, SciPy: over a second of a one-image predict)
_HOMES = {"KAGGLE_POPULATION": "config", "PRESETS": "config", "TUTORIAL_AUGMENT": "config", "TrainConfig": "config",
          "config_from_dict": "config", "make_config": "config", "prepare_data": "data",
          "Distributed": "distributed", "setup_distributed": "distributed", "AfterTraining": "loop",
          "resume": "loop", "train": "loop", "train_step": "loop", "learning_rate_factor": "optim",
          "make_optimizer": "optim", "update_ema": "optim", "start_run": "setup"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["KAGGLE_POPULATION", "PRESETS", "TUTORIAL_AUGMENT", "TrainConfig", "config_from_dict", "make_config",
           "prepare_data", "Distributed", "setup_distributed", "AfterTraining", "resume", "train", "train_step",
           "learning_rate_factor", "make_optimizer", "update_ema", "start_run"]


def __dir__():
    return sorted(set(globals()) | set(__all__))
