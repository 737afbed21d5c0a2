"""pneumonia-cnn: train, evaluate, explain and serve CNNs that detect pneumonia on chest X-rays.

Notebook API::

    from pneumonia_cnn import create_model, load_model, train, evaluate
"""
from .signals import quiet_interrupt_while_importing

with quiet_interrupt_while_importing():  # the command line's Ctrl-C or SIGTERM during torch's loading: one line
    from . import device  # noqa: F401  # first: its OpenMP wait setting must precede torch's loading
    from .checkpoint import load_model
    from .models import create_model, list_models

__version__ = "0.1.0"


def train(data: str, out: str, preset: str | None = None, config_file: str | None = None, **overrides) -> dict:
    """Train on a Kaggle-layout folder, then score its ``test`` split (when present); ``overrides`` are any
    ``TrainConfig`` field (epochs=2, size=128...)."""
    from .experiment import train_and_evaluate
    from .training import make_config
    config = make_config(preset, config_file, data=str(data), out=str(out), **overrides)
    return train_and_evaluate(config)


def evaluate(checkpoint, data: str, split: str = "test", **kwargs) -> dict:
    """Metrics with 95% intervals for a checkpoint (or list of checkpoints) on ``data``/``split``."""
    from .evaluation.evaluate import evaluate as run_evaluation
    return run_evaluation(checkpoint, data, split, **kwargs)


def predict(checkpoint, paths, **kwargs):
    from .inference import predict as run_prediction
    return run_prediction(checkpoint, paths, **kwargs)


__all__ = ["create_model", "list_models", "load_model", "train", "evaluate", "predict", "__version__"]
