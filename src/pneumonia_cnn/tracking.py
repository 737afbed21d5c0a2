"""Experiment tracking: parameters, per-epoch metrics and the run's files to MLflow or TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import PneumoniaCNNError


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def local_mlflow_uri(folder) -> str:
    """The tracking URI of a local MLflow store: ``mlflow ui --backend-store-uri <this>`` browses it."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


class MLflowTracker:
    def __init__(self, uri: str, run_name: str, experiment: str = "pneumonia-cnn"):
        import mlflow
        self.mlflow = mlflow
        artifacts = None
        if ":" not in uri:  # a local folder: an SQLite store (MLflow 3 retired the file store) + artifacts beside
            folder = Path(uri).resolve()
            folder.mkdir(parents=True, exist_ok=True)
            uri, artifacts = local_mlflow_uri(folder), (folder / "artifacts").as_uri()
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=artifacts)
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name)
        self.uri = uri

    def log_params(self, params: dict):
        flat = {k: (json.dumps(v) if isinstance(v, (list, tuple)) else v) for k, v in _flatten(params).items()}
        self.mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log_metrics(self, metrics: dict, step: int):
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, folder):
        for name in ("curves.png", "history.csv", "history.json", "config.json", "test_metrics.json", "report.html"):
            path = Path(folder) / name
            if path.exists():
                self.mlflow.log_artifact(str(path))

    def close(self):
        self.mlflow.end_run()


class TensorBoardTracker:
    def __init__(self, log_dir: str, run_name: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(log_dir) / run_name))

    def log_params(self, params: dict):
        text = "\n".join(f"    {k}: {v}" for k, v in _flatten(params).items())
        self.writer.add_text("config", text, 0)

    def log_metrics(self, metrics: dict, step: int):
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)

    def log_artifacts(self, folder):
        curves = Path(folder) / "curves.png"
        if curves.exists():
            import numpy as np
            from PIL import Image
            self.writer.add_image("curves", np.asarray(Image.open(curves).convert("RGB")), 0, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


def make_tracker(kind: str, uri: str, run_name: str):
    try:
        if kind == "mlflow":
            return MLflowTracker(uri, run_name)
        if kind == "tensorboard":
            return TensorBoardTracker(uri, run_name)
    except ImportError as error:
        raise PneumoniaCNNError(f"--tracker {kind} needs {error.name} (pip install 'pneumonia-cnn[track]')") from None
    except Exception as error:  # noqa: BLE001 - a store that cannot be opened (MLflow's and the OS's many types)
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise PneumoniaCNNError(f"--tracking-uri {uri}: cannot start the {kind} run ({type(error).__name__}"
                                f"{': ' + text if text else ''})") from None
    raise PneumoniaCNNError(f"unknown tracker {kind!r}: none, mlflow or tensorboard")
