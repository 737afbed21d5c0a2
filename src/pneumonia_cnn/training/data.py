"""The run's data: train and validation splits, decoded once into the cache (rank 0 first)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..data.cache import build_or_load
from ..data.dataset import ImageList, load_split, patient_split
from ..errors import DatasetError
from ..fileio import display_path
from .config import TrainConfig
from .distributed import Distributed, barrier

log = logging.getLogger(__name__)


def split_lists(config: TrainConfig) -> tuple[ImageList, ImageList | None]:
    """train/ and val/ of ``config.data``; val carved from train by patient when it is missing or tiny."""
    root = Path(config.data)
    if not root.exists():
        raise DatasetError(f"{display_path(root)}: folder not found")
    train_list = load_split(root, "train", require_both_classes=True)
    val_list = None
    if config.val_from_train:
        train_list, val_list = patient_split(train_list, config.val_from_train, config.seed)
    elif (root / "val").is_dir() and root.suffix.lower() != ".csv":
        val_list = load_split(root, "val", class_names=train_list.class_names)
        if len(val_list) < config.min_val_images:
            log.warning("%s: only %d validation images; carving 10%% of train's patients instead "
                        "(--val-from-train 0.1)", display_path(root / "val"), len(val_list))
            train_list, val_list = patient_split(train_list, 0.1, config.seed)
    if config.limit_images:
        rng = np.random.default_rng(config.seed)
        train_list = train_list.subset(np.sort(rng.permutation(len(train_list))[:config.limit_images]))
        if val_list is not None:
            val_list = val_list.subset(np.sort(rng.permutation(len(val_list))[:config.limit_images]))
    return train_list, val_list


def prepare_data(config: TrainConfig, dist_info: Distributed):
    """Cached (decoded, resized, standardised) train and val splits."""
    train_list, val_list = split_lists(config)
    cache_options = dict(size=(config.size, config.size), interpolation=config.interpolation,
                         intensity=config.intensity, cache_dir=config.cache_dir or None,
                         workers=config.workers or None, progress=config.progress and dist_info.main)
    if not dist_info.main:
        barrier(dist_info)  # rank 0 builds the cache first; the others then read it
    train = build_or_load(train_list, **cache_options)
    val = build_or_load(val_list, **cache_options) if val_list is not None else None
    if dist_info.main:
        barrier(dist_info)
    if len(train) == 0:
        raise DatasetError(f"{display_path(train_list.source)}: no readable training images")
    if len(set(train.labels.tolist())) < 2:
        raise DatasetError(f"{display_path(train_list.source)}: only one class is readable; training needs both")
    return train, val


def describe_counts(cached) -> str:
    counts = {name: int((cached.labels == i).sum()) for i, name in enumerate(cached.class_names)}
    return "(" + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {len(set(cached.patients))} patients)"
