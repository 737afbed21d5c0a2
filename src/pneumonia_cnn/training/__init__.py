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
from .config import KAGGLE_POPULATION, PRESETS, TUTORIAL_AUGMENT, TrainConfig, config_from_dict, make_config
from .data import prepare_data
from .distributed import Distributed, setup_distributed
from .loop import AfterTraining, resume, train, train_step
from .optim import learning_rate_factor, make_optimizer, update_ema
from .setup import start_run

__all__ = ["KAGGLE_POPULATION", "PRESETS", "TUTORIAL_AUGMENT", "TrainConfig", "config_from_dict", "make_config",
           "prepare_data", "Distributed", "setup_distributed", "AfterTraining", "resume", "train", "train_step",
           "learning_rate_factor", "make_optimizer", "update_ema", "start_run"]
