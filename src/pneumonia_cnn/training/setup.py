"""Everything the loop needs, built once: device and precision, data, model, optimiser, loader, state."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, weights_problem
from ..data.augment import AugmentConfig
from ..data.loader import BatchLoader, DeviceBatchLoader, fits_on_device
from ..device import autocast_dtype, keep_freed_memory_for_reuse, resolve_device
from ..errors import CheckpointError, ConfigError
from ..fileio import display_path, write_json_atomic
from ..models import count_parameters, create_model
from ..models.registry import state_dict_misfit
from .config import KAGGLE_POPULATION, TrainConfig
from .data import describe_counts, prepare_data
from .distributed import Distributed, setup_distributed
from .optim import make_optimizer
from .state import TrainingState

log = logging.getLogger(__name__)

# what a run writes into its folder (``train``, its end-of-run steps and its test scoring)
RUN_FILES = ("config.json", "best.pt", "last.pt", "history.csv", "history.json", "curves.png", "calibration.png",
             "test_metrics.json")


@dataclass
class Run:
    config: TrainConfig
    out: Path
    dist: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None
    augment: AugmentConfig
    train_set: object
    val_set: object
    state: TrainingState
    forward: torch.nn.Module  # what the step calls: the model, wrapped for data parallelism or compiled
    loader: BatchLoader
    pos_weight: torch.Tensor | None
    run_id: str
    parameters: int
    tracker: object = None
    epoch_started: float = field(default_factory=time.perf_counter)
    graphed: object = None  # the step as one CUDA graph (graphed.py), with --cuda-graph

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def global_step(self) -> int:
        return self.state.epoch * self.steps_per_epoch + self.state.step_in_epoch


def start_run(config: TrainConfig, resume_from_last: bool = False) -> Run:
    if not resume_from_last:
        config = with_absolute_paths(config)
    out, dist_info = Path(config.out), setup_distributed(config.device)
    device = resolve_device(config.device)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    seed_everything(config.seed, config.deterministic)  # same initial weights on every rank
    if device.type == "cuda" and not config.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed input size: cuDNN's fastest kernels, picked once
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    _check_model_takes_input(config)
    if config.weights and not (resume_from_last and (out / "last.pt").exists()):  # a resume's are in last.pt
        _check_weights_fit(config)
    if dist_info.main:
        _say_warmup_outlasts_run(config)
    train_set, val_set = prepare_data(config, dist_info)
    if dist_info.main:
        _prepare_run_folder(out, config, train_set, val_set)
    resuming = resume_from_last and (out / "last.pt").exists()  # then last.pt has the weights: neither --weights
    # nor --init is read again (a --weights file moved since had stopped the resume)
    model = create_model(config.model, in_channels=config.channels, image_size=(config.size, config.size),
                         weights=None if resuming else config.weights or None, **config.model_kwargs).to(device)
    if config.init and not resuming:
        start_from(model, config)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = TrainingState(model, make_optimizer(config, model),
                          torch.Generator().manual_seed(config.seed * 1000 + dist_info.rank),
                          copy.deepcopy(model).eval() if config.ema_decay else None)
    run_id = f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    state.train_digest = train_images_digest(train_set, config.data)
    if resume_from_last and (out / "last.pt").exists():
        saved = load_checkpoint(out / "last.pt")
        refuse_other_training_images(saved, state.train_digest, out)
        state.restore(saved, rank=dist_info.rank)
        run_id = saved.get("run_id", run_id)
        if dist_info.main:
            log.info("resuming %s at epoch %d step %d", display_path(out), state.epoch + 1, state.step_in_epoch)
    run = Run(config, out, dist_info, device, training_autocast(device, config.amp),
              AugmentConfig.from_dict(config.augment), train_set, val_set, state,
              _forward_module(config, model, dist_info, device),
              _make_loader(config, train_set, dist_info, device), _pos_weight(config, train_set, device), run_id,
              count_parameters(model)[0], _make_tracker(config, out, run_id, dist_info))
    run.graphed = _graphed_step(run)
    return run


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """The files a run reads, as absolute paths in its config.json and checkpoints (a resume from another
    working directory found no data: "mid: folder not found"); ``--init`` as the checkpoint file it started from,
    not a run folder whose best.pt a later run may change."""
    from .. import builtin
    paths = {name: str(Path(getattr(config, name)).absolute()) for name in ("data", "weights", "init", "cache_dir")
             if getattr(config, name) and not (name == "init" and builtin.is_builtin(config.init))
             and (Path(getattr(config, name)).exists() or name == "cache_dir")}
    if paths.get("init") and Path(paths["init"]).is_dir():  # the file, not the folder a later run may change
        from ..checkpoint import finished_run_checkpoint
        paths["init"] = str(finished_run_checkpoint(Path(paths["init"])))
    return dataclasses.replace(config, **paths) if paths else config


def _forward_once(config: TrainConfig, size: int, device: torch.device):
    with device, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op"
        model = create_model(config.model, in_channels=config.channels, image_size=(config.size, config.size),
                             **config.model_kwargs).eval()
        model(torch.zeros(2, config.channels, size, size))


def train_images_digest(train_set, data) -> str:
    """The training images (their paths under the data folder, or beside the CSV) and labels, as 16 hex digits."""
    root = Path(data) if Path(data).is_dir() else Path(data).parent
    digest = hashlib.sha256()
    for path, label in zip(train_set.paths, train_set.labels):
        digest.update(f"{os.path.relpath(path, root)}\t{int(label)}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def refuse_other_training_images(last: dict, digest: str, out: Path):
    """A resume whose training images or labels differ from those the run started on (files added, moved to
    the other class, removed) would continue a run nobody started, and replay another order mid-epoch."""
    saved = (last.get("training_state") or {}).get("train_digest") if isinstance(last.get("training_state"), dict) \
        else None
    if saved and saved != digest:  # runs saved by earlier versions have none
        raise ConfigError(f"{display_path(out)}: the training images or their labels changed since this run started "
                          f"(files added, moved or removed); resuming would continue on other images: start a new run")


def _check_model_takes_input(config: TrainConfig):
    """Before the data are read and the run folder is written: the model built with its keywords takes the
    input size (and each of ``size_schedule``'s: progressive resizing needs a head that does not depend on it),
    tried on the meta device (shapes only: no memory, no arithmetic, no random numbers drawn)."""
    model_of = f"model {config.model}" + (f" with {json.dumps(config.model_kwargs)}" if config.model_kwargs else "")
    for size in sorted({config.size, *(int(k) for k in config.size_schedule)}):
        field_name = "size" if size == config.size else "size_schedule"
        try:
            try:
                _forward_once(config, size, torch.device("meta"))
            except (RuntimeError, ValueError, IndexError, TypeError, ZeroDivisionError):
                # a model that makes tensors on the CPU itself (a buffer from numpy) fails on the meta device
                # only: tried on the CPU before it is refused, its random draws put back
                with torch.random.fork_rng(devices=[]):
                    _forward_once(config, size, torch.device("cpu"))
        except ConfigError as error:
            raise ConfigError(f"{field_name}: {error}") from None
        except (RuntimeError, ValueError, IndexError, TypeError, ZeroDivisionError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if size != config.size:
                reason = "its head depends on the input size"
            raise ConfigError(f"{field_name}: {model_of} cannot take {size}x{size} input ({reason})") from None


def _check_weights_fit(config: TrainConfig):
    """--weights of another model or input: refused with the other settings, before the data are read (it came
    after the scan of the data, and named neither --weights nor the option to change)."""
    from ..models.registry import read_weights_file
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into a meta parameter is a no-op: the shapes are what is checked
        model = create_model(config.model, in_channels=config.channels, image_size=(config.size, config.size),
                             **config.model_kwargs)
        try:
            model.load_state_dict(read_weights_file(config.weights), strict=True)
        except RuntimeError as error:
            raise ConfigError(f"weights: {display_path(config.weights)}: weights do not fit model {config.model} "
                              f"({state_dict_misfit(error)}); give the --model they were trained as") from None


def _say_warmup_outlasts_run(config: TrainConfig):
    """A warm-up as long as the run (``--warmup-epochs 5 --epochs 1``) trains it all at a rising learning rate
    that reaches --lr at best on the last step, and the schedule after the warm-up never starts. Said before the
    data are read, not refused as a ``size_schedule`` with no epoch left at --size is: that one would save a model
    never trained at its own size, this one a model trained more gently than asked, and a one-epoch trial of the
    finetune preset (a warm-up of 1) is such a run."""
    if config.warmup_epochs and config.warmup_epochs >= config.epochs:
        after = "" if config.schedule == "constant" else f" and the {config.schedule} schedule never starts"
        log.warning("--warmup-epochs %g is not shorter than --epochs %d: the whole run is warm-up (the learning "
                    "rate climbs toward --lr %g%s); give fewer warm-up epochs or more epochs",
                    config.warmup_epochs, config.epochs, config.lr, after)


def _graphed_step(run: Run):
    config = run.config
    if not config.cuda_graph:
        return None
    if run.device.type != "cuda" or run.dist.enabled:
        log.warning("--cuda-graph needs one process on CUDA; stepping eagerly on %s", run.device)
        return None
    from .graphed import GraphedStep
    return GraphedStep(run.state.model, run.forward, run.state.optimizer, run.amp_dtype, run.pos_weight,
                       (config.batch_size, config.channels, config.size, config.size), run.device)


def start_from(model: torch.nn.Module, config: TrainConfig):
    """Load the ``--init`` checkpoint's weights; with ``freeze_stem`` keep the first block fixed. Weights of
    another shape (another input size, model or keyword) are one line naming the file, as ``--weights``'s are."""
    checkpoint = load_checkpoint(config.init)
    problem = weights_problem(checkpoint["state_dict"], model.state_dict())
    if not problem:
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            problem = state_dict_misfit(error)
    if problem:
        trained = (checkpoint.get("preprocessing") or {}).get("size")
        trained = f"; it was trained at {trained[0]}x{trained[1]} input" if isinstance(trained, (list, tuple)) \
            and len(trained) == 2 and list(trained) != [config.size, config.size] else ""
        raise CheckpointError(f"--init {display_path(config.init)}: weights do not fit model {config.model} at "
                              f"--size {config.size} ({problem}){trained}")
    if config.freeze_stem:
        stem = getattr(model, "stem", None) or next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        for parameter in stem.parameters():
            parameter.requires_grad_(False)
    log.info("starting from the weights of %s%s", config.init, " (stem frozen)" if config.freeze_stem else "")


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.json that a run wrote (this version's or an earlier one's): a user's own
    config file names a few fields, a run's all of them."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and set(values) >= {"data", "out", "model", "size", "epochs", "lr", "seed",
                                                         "optimizer", "augment"}


def _prepare_run_folder(out: Path, config: TrainConfig, train_set, val_set):
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a process killed mid-write; the real files are intact
        stale.unlink(missing_ok=True)
    write_json_atomic(out / "config.json", config.to_dict())
    log.info("train: %d images %s; val: %s", len(train_set), describe_counts(train_set),
             f"{len(val_set)} images {describe_counts(val_set)}" if val_set is not None else "none")
    if config.population == KAGGLE_POPULATION["population"]:  # the presets' card: said, since it may not hold
        log.info("model card: the training population is stated as the Kaggle set's (children 1-5 years, one "
                 "hospital), the preset's: give --population and --age-range when these images are of another")


def _forward_module(config: TrainConfig, model, dist_info: Distributed, device):
    forward = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if config.compile else forward


def _make_loader(config: TrainConfig, train_set, dist_info: Distributed, device) -> BatchLoader:
    sample_weights = None
    if config.class_balance == "sampler":
        positives = float(train_set.labels.mean())
        sample_weights = np.where(train_set.labels == 1, 0.5 / positives, 0.5 / (1 - positives))
    augment = AugmentConfig.from_dict(config.augment)
    options = dict(shuffle=True, seed=config.seed, sample_weights=sample_weights, rank=dist_info.rank,
                   world_size=dist_info.world_size, augment=augment, max_batches=config.max_steps_per_epoch or None)
    if not (augment.jpeg_quality and augment.jpeg_p) and fits_on_device(train_set.images, device):
        return DeviceBatchLoader(train_set.images, train_set.labels, config.batch_size, device, **options)
    return BatchLoader(train_set.images, train_set.labels, config.batch_size, pin_memory=device.type == "cuda",
                       **options)


def _pos_weight(config: TrainConfig, train_set, device):
    """Class weighting: each positive counts (negatives / positives) times, so the classes weigh the same."""
    if config.class_balance != "weights":
        return None
    positives = float(train_set.labels.mean())
    return torch.tensor((1 - positives) / positives, device=device)


def training_autocast(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast type of a training step: ``auto`` on a GPU without bfloat16 (``autocast_dtype`` gives float16,
    right for inference) trains in float32, since float16 gradients need loss scaling, which this trainer does
    not do (``--amp fp16`` is not offered to train)."""
    dtype = autocast_dtype(device, amp)
    if dtype is torch.float16:
        log.info("--amp auto: this GPU has no bfloat16; training in float32 (float16 needs loss scaling)")
        return None
    return dtype


def _make_tracker(config: TrainConfig, out: Path, run_id: str, dist_info: Distributed):
    if not dist_info.main or config.tracker == "none":
        return None
    from ..tracking import make_tracker
    tracker = make_tracker(config.tracker, config.tracking_uri or str(out / config.tracker), run_id)
    tracker.log_params(config.to_dict())
    return tracker


def seed_everything(seed: int, deterministic: bool):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def intended_use(train_set, config: TrainConfig) -> dict:
    return {"population": config.population or "not stated (set --population and --age-range for the model card)",
            "age_range_years": config.age_range_years,
            "task": "binary: NORMAL vs PNEUMONIA on a frontal chest radiograph",
            "trained_on": {"images": int(len(train_set)), "source": str(train_set.source),
                           "input_size": [config.size, config.size]},
            "not_a_medical_device": True}
