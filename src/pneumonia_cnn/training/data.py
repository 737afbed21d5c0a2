"""The run's data: train and validation splits, decoded once into the cache (rank 0 first)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..data.cache import build_or_load
from ..data.dataset import ImageList, load_split, patient_split, refuse_split_in_other_case
from ..data.fingerprint import file_fingerprint
from ..data.readers import SUPPORTED_SUFFIXES, read_image
from ..data.site_checks import leave_out_flagged
from ..errors import DatasetError, ImageReadError
from ..fileio import display_path
from ..ood.checks import flag_reasons
from .config import TrainConfig
from .distributed import Distributed, barrier

log = logging.getLogger(__name__)


def split_lists(config: TrainConfig) -> tuple[ImageList, ImageList | None]:
    """train/ and val/ of ``config.data``; val carved from train by patient when it is missing or tiny."""
    root = Path(config.data)
    if not root.exists():
        raise DatasetError(f"{display_path(root)}: folder not found")
    train_list = load_split(root, "train", require_both_classes=True)
    if root.is_dir():  # VAL/ or TEST/: refused before training, not found missing after it
        for split in ("val", "test") if config.evaluate_test else ("val",):
            refuse_split_in_other_case(root, split)
    val_list, carved = None, bool(config.val_from_train)
    if config.val_from_train:
        train_list, val_list = patient_split(train_list, config.val_from_train, config.seed)
    elif (root / "val").is_dir() and root.suffix.lower() != ".csv":
        val_list = _val_folder(root, train_list)
        if len(val_list) < config.min_val_images:
            log.warning("%s: only %d validation images; carving 10%% of train's patients instead "
                        "(--val-from-train 0.1)", display_path(root / "val"), len(val_list))
            train_list, val_list = patient_split(train_list, 0.1, config.seed)
            carved = True
    if val_list is not None and not len(val_list):
        val_list = None  # an empty val/ with --min-val-images 0
    if val_list is None:
        log.warning("%s: no validation images: best.pt is chosen by the training loss, with no calibration and "
                    "the threshold %s (%s--val-from-train 0.1)", display_path(root),
                    config.threshold if _fixed_threshold(config.threshold) else "0.5, not " + config.threshold,
                    "" if root.suffix.lower() == ".csv" else "give a val/ folder or ")
    refuse_leakage(config, train_list, None if carved else val_list)
    if config.limit_images:
        rng = np.random.default_rng(config.seed)
        train_list = train_list.subset(np.sort(rng.permutation(len(train_list))[:config.limit_images]))
        if val_list is not None:
            val_list = val_list.subset(np.sort(rng.permutation(len(val_list))[:config.limit_images]))
    return train_list, val_list


def _val_folder(root: Path, train_list: ImageList) -> ImageList:
    """val/ as a list; one holding no image is an empty list (carved from train below, as a small one is)."""
    try:
        return load_split(root, "val", class_names=train_list.class_names)
    except DatasetError:
        if any(path.suffix.lower() in SUPPORTED_SUFFIXES for path in (root / "val").rglob("*") if path.is_file()):
            raise
        return ImageList([], np.zeros(0, dtype=np.int64), [], train_list.class_names, str(root / "val"))


def _fixed_threshold(policy: str) -> bool:
    from ..calibration import parse_threshold_policy
    return parse_threshold_policy(policy)[0] == "fixed"


def refuse_leakage(config: TrainConfig, train_list: ImageList, val_list: ImageList | None):
    """Before any training, by content (the same X-ray under another name is the same X-ray): one under both
    classes of a split, or a validation or test image that is also a training image (or a test image that is a
    validation one). Validation would pick best.pt and fit the decision on images it was trained on; the test
    figures would flatter the model. A val carved from train is split by patient and not checked; files that
    are not readable images (identical empty or junk files) are skipped here as the reading skips them."""
    root = Path(config.data)
    test_list = None
    if config.evaluate_test and root.suffix.lower() != ".csv" and (root / "test").is_dir():
        test_list = load_split(root, "test", class_names=train_list.class_names)
    seen: dict[str, tuple[str, str, int]] = {}  # fingerprint -> (split, path, label)
    for split, images in {"train": train_list, "val": val_list, "test": test_list}.items():
        for path, label in zip(images.paths, images.labels) if images is not None else ():
            fingerprint = _image_fingerprint(path)
            first = seen.setdefault(fingerprint, (split, path, int(label))) if fingerprint else None
            if first is None or first[1] == path or (first[0] == split and first[2] == int(label)):
                continue
            if not (_readable(path) and _readable(first[1])):
                continue
            if first[0] == split:
                raise DatasetError(f"{display_path(path)}: the same image as {display_path(first[1])} under the "
                                   f"other class; an image has one label")
            remedy = "--no-evaluate-test trains without scoring test" if split == "test" else \
                "--val-from-train 0.1 carves val from train instead"
            raise DatasetError(f"{display_path(path)}: the same image as the {first[0]} image "
                               f"{display_path(first[1])}; a {split} image must not be one the model "
                               f"{'trained' if first[0] == 'train' else 'was selected'} on (remove one, or "
                               f"{remedy})")


def _image_fingerprint(path) -> str | None:
    """The content fingerprint of a regular, non-empty file; None for anything else (a FIFO would block)."""
    try:
        return file_fingerprint(path) if Path(path).is_file() and Path(path).stat().st_size else None
    except OSError:
        return None


def _readable(path) -> bool:
    try:
        read_image(path, (8, 8))
        return True
    except ImageReadError:
        return False


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
    train, val = (leave_out_not_xrays(cached, listed, config, dist_info.main, what)
                  for cached, listed, what in ((train, train_list, "training "), (val, val_list, "validation ")))
    if len(train) == 0:
        raise DatasetError(f"{display_path(train_list.source)}: no readable training images the input checks do "
                           "not flag")
    if len(set(train.labels.tolist())) < 2:
        drawn = f" among the {config.limit_images} images --limit-images drew" if config.limit_images else ""
        raise DatasetError(f"{display_path(train_list.source)}: only one class is readable{drawn}; training needs both")
    return train, val


def leave_out_not_xrays(cached, listed, config: TrainConfig, main: bool, what: str):
    """The split less the images the model-free input checks flag, as ``predict`` flags them whatever the score
    (blank, noise, colour; a DICOM of another modality, body part or view): trained on, a grey PNG labelled
    PNEUMONIA had taught the model without a word. Not by age: the training images are the population, and the
    presets' age range (the Kaggle set's 1-5) had left out every adult of a user's own data set. Each rank leaves
    out the same."""
    if cached is None:
        return None
    kept, left_out = leave_out_flagged(cached, listed.source, flag_reasons, None, "train", what,  # None: no age
                                       log.warning if main else None)
    if left_out and what == "validation " and len(kept) < config.min_val_images and main:
        log.warning("%s: %d validation image(s) left, fewer than --min-val-images %d: the decision is fitted on "
                    "them (give more, or --val-from-train)", display_path(listed.source), len(kept),
                    config.min_val_images)
    return kept


def describe_counts(cached) -> str:
    counts = {name: int((cached.labels == i).sum()) for i, name in enumerate(cached.class_names)}
    return "(" + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {len(set(cached.patients))} patients)"
