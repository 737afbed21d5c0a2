"""The training loop, read top to bottom (in the manner of nanoGPT's train.py).

``train(config)``: build the run (``setup.start_run``), then for each epoch take augmented batches from the
cache to the device, step, validate, keep the best weights and the resumable state, and stop early when
validation stops improving. At the end, ``finish.finish_run`` fits the decision (calibration, threshold) and
the out-of-distribution detector on the served scores of best.pt. SIGINT/SIGTERM finish the current step,
save last.pt (with the position inside the epoch) and return; ``resume`` continues from there.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..calibration import sigmoid
from ..checkpoint import load_checkpoint, save_checkpoint, training_finished
from ..data.augment import augment_batch
from ..data.loader import to_model_input
from ..device import autocast
from ..errors import ConfigError, PneumoniaCNNError
from ..fileio import display_path, write_json_atomic, write_text_atomic
from ..inference.engines import TorchEngine
from ..metrics import point_metrics
from ..signals import StopSignals
from .config import TrainConfig, config_from_dict
from .distributed import (
    any_rank,
    finish_distributed,
    gather_by_index,
    gather_objects,
    launched_world_size,
    sum_across_ranks,
)
from .finish import finish_run
from .optim import ema_decay_at, learning_rate_factor, update_ema
from .setup import Run, intended_use, start_run
from .state import RunningSums, check_own_best, check_resumable, check_world_size, cpu_state

log = logging.getLogger(__name__)
AfterTraining = Callable[[Path, TrainConfig, torch.device], dict]


def train(config: TrainConfig, resume_from_last: bool = False, after_training: AfterTraining | None = None) -> dict:
    """Train as ``config`` says; returns the run folder, history and final figures. ``after_training``
    (run folder, config, device) -> dict runs on the main process once best.pt is final
    (``experiment.train_and_evaluate`` scores the test split with it)."""
    run = start_run(config, resume_from_last)
    restore_best_of_last_epoch(run)
    interrupted = False
    with StopSignals(announce="received %s: finishing the current step, saving, then exiting") as stop:
        while run.state.epoch < config.epochs:
            if not train_one_epoch(run, stop):
                save_last(run)
                interrupted = True
                break
            end_of_epoch(run)
            stopping = bool(config.early_stopping and run.state.epochs_without_improvement >= config.early_stopping)
            last = stopping or run.state.epoch >= config.epochs
            # asked during validation or saving: the epoch is kept, the end-of-run steps wait. With several ranks,
            # only after the last epoch (no collective follows); otherwise the next step's agreement stops them
            # all (a rank leaving alone left the others in an all-reduce; agreeing here with one more all-reduce
            # made a rank that went on to its exit at once abort, "terminate called without an active exception")
            if stop.requested and (last or not run.dist.enabled):
                interrupted = True
                break
            if stopping:
                if run.dist.main:
                    log.info("early stopping: no improvement in %s for %d epochs",
                             monitored(config.monitor, run.state.history[-1]), config.early_stopping)
                break
    return finish(run, interrupted, after_training)


def train_one_epoch(run: Run, stop: StopSignals) -> bool:
    """Steps from the saved position to the end of the epoch; False when a stop was requested."""
    state = run.state
    run.epoch_started = time.perf_counter()
    run.loader.set_epoch(state.epoch)
    state.model.train()
    skip = state.step_in_epoch  # a resumed epoch replays the loader's order up to where it stopped
    loss_sum, correct = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    bar, agreed = _progress_bar(run, skip), False
    for index, (pixels, labels, _) in enumerate(run.loader):
        if index < skip:
            continue
        loss, hits = train_step(run, pixels, labels)
        loss_sum += loss * len(labels)  # summed on the device: no host sync per step
        correct += hits
        state.sums.count += len(labels)
        state.step_in_epoch += 1
        if bar is not None:
            bar.update(1)
            if state.step_in_epoch % 10 == 0:
                bar.set_postfix(loss=f"{(state.sums.loss + float(loss_sum)) / state.sums.count:.4f}")
        if any_rank(run.dist, stop.requested, run.device):
            stop.request("another rank's stop signal")
            agreed = True
            break
    state.sums.loss += float(loss_sum)
    state.sums.correct += float(correct)
    if bar is not None:
        bar.close()
    # with several ranks, only a stop they all agreed on: one asked after the last step's agreement would save
    # last.pt (a collective) alone while the others end the epoch; the next step's agreement stops them all
    return not (agreed or (stop.requested and not run.dist.enabled))


def train_step(run: Run, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch of cached uint8 images; returns (mean loss, correct count)."""
    config, state = run.config, run.state
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr * learning_rate_factor(config, run.global_step, run.total_steps, run.steps_per_epoch)
    size, phase_start = config.size_at(state.epoch)
    x = augment_batch(to_model_input(pixels, run.device), run.augment, state.generator, (size, size))
    if config.channels == 3 and run.device.type != "cpu":
        # the cache stays gray. On the CPU the first convolution takes it through its summed one-channel kernel
        # (InputConv2d), a third of that layer's arithmetic; on a GPU the 3-channel input runs faster
        x = x.expand(-1, 3, -1, -1)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = labels.to(run.device, non_blocking=True)
    target = y * (1 - config.label_smoothing) + 0.5 * config.label_smoothing
    if run.graphed is not None and x.shape == run.graphed.x.shape:  # one CUDA graph replay (graphed.py)
        logits, loss = run.graphed.step(x, target)
    else:
        with autocast(run.device, run.amp_dtype):
            logits = run.forward(x).float()
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=run.pos_weight)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
    if state.ema_model is not None:
        # the average restarts when the input size changes: weights fitted to another scale would blur it
        update_ema(state.ema_model, state.model,
                   ema_decay_at(config, run.global_step - phase_start * run.steps_per_epoch))
    return loss.detach(), ((logits.detach() > 0).float() == y).sum()


def end_of_epoch(run: Run) -> dict:
    """Validate, keep the best weights, save the resumable state, write history and curves."""
    state, config = run.state, run.config
    loss_sum, correct, count = sum_across_ranks(run.dist, [state.sums.loss, state.sums.correct, state.sums.count],
                                                run.device)
    row = {"epoch": state.epoch + 1, "train_loss": loss_sum / max(count, 1), "train_accuracy": correct / max(count, 1),
           "lr": state.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - run.epoch_started,
           "size": config.size_at(state.epoch)[0]}  # the training input size (progressive resizing)
    logits = validation_logits(run) if run.val_set is not None and len(run.val_set) else None
    refuse_diverged(run, row, logits)
    if logits is not None:
        row.update(validation_metrics(run.val_set.labels, logits))
    state.history.append(row)
    score = monitor_score(config.monitor, row)
    if row["epoch"] == 1 and config.monitor == "val_auc" and monitored(config.monitor, row) == "val_loss" and \
            run.dist.main:  # early stopping had then cited a val_auc never computed
        log.warning("val_auc is undefined (the validation images are of one class): best.pt and early stopping use "
                    "val_loss")
    improved = state.best_score is None or (score is not None and score < state.best_score)
    state.best_score = score if improved else state.best_score
    state.epochs_without_improvement = 0 if improved else state.epochs_without_improvement + 1
    state.epoch, state.step_in_epoch, state.sums = state.epoch + 1, 0, RunningSums()
    # first: a run killed before best.pt is written has it written again when resumed
    save_last(run, final=state.epoch >= run.config.epochs or bool(
        run.config.early_stopping and state.epochs_without_improvement >= run.config.early_stopping))
    if run.dist.main:
        if improved:
            save_checkpoint(checkpoint_payload(run, state.eval_model), run.out / "best.pt")
        write_history(state.history, run.out)
        from ..plots import training_curves
        training_curves(state.history, run.out / "curves.png")
        if run.tracker:
            run.tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, (int, float))}, state.epoch)
        log.info("epoch %d/%d  %s", state.epoch, config.epochs, format_row(row))
    return row


def refuse_diverged(run: Run, row: dict, logits: np.ndarray | None):
    """A non-finite training loss, weight or validation score: its weights would be saved, then calibrated,
    fitted and served (a finite loss can hide NaN weights, as bf16 at a tiny input size gave)."""
    weights = [value for value in run.state.eval_model.state_dict().values() if value.dtype.is_floating_point]
    if not math.isfinite(row["train_loss"]):
        what = f"the training loss is {row['train_loss']}"
    elif not all(bool(torch.isfinite(value).all()) for value in weights):
        what = "its weights hold NaN or infinite values"
    elif logits is not None and not np.isfinite(logits).all():
        what = "its validation scores hold NaN or infinite values"
    else:
        return
    raise PneumoniaCNNError(f"training diverged in epoch {row['epoch']}: {what}; nothing of this epoch was saved in "
                            f"{display_path(run.out)} (try a lower --lr, or --amp off)")


def restore_best_of_last_epoch(run: Run):
    """last.pt is written before best.pt, the history and the curves: when a run was killed between them, the
    epoch it saved improved the monitored score and best.pt is older or missing, they are written again from
    last.pt (the weights and rows the killed run would have written)."""
    state = run.state
    if not run.dist.main or state.epoch == 0 or state.step_in_epoch or state.epochs_without_improvement:
        return
    best = run.out / "best.pt"
    if best.is_file() and load_checkpoint(best).get("epoch") == state.epoch:
        return
    log.info("%s: writing best.pt, history and curves of epoch %d again (the run stopped before they were "
             "written)", display_path(run.out), state.epoch)
    save_checkpoint(checkpoint_payload(run, state.eval_model), best)
    write_history(state.history, run.out)
    from ..plots import training_curves
    training_curves(state.history, run.out / "curves.png")


def validation_logits(run: Run) -> np.ndarray:
    """The served forward (``ServedModel``: flips, channels) of the weights being validated; with several
    processes each scores its shard and all are gathered, so the numbers equal one process's."""
    engine = TorchEngine([run.state.eval_model], run.device, run.config.tta, amp=run.config.amp)
    images = run.val_set.images
    indices = np.arange(len(images))[run.dist.rank::run.dist.world_size]
    values = np.empty(len(indices))
    for start in range(0, len(indices), 64):
        chosen = indices[start:start + 64]
        values[start:start + len(chosen)] = engine.run(np.asarray(images[chosen]))[0][0]
    return gather_by_index(run.dist, indices, values, len(images))


def validation_metrics(labels, logits) -> dict:
    metrics = point_metrics(labels, sigmoid(logits), 0.5)
    row = {"val_loss": metrics["log_loss"], "val_accuracy": metrics["accuracy"]}
    if np.isfinite(metrics["roc_auc"]):
        row["val_auc"] = metrics["roc_auc"]
    return row


def monitor_score(monitor: str, row: dict):
    """Lower is better; AUC is negated. Without validation, the training loss."""
    used = monitored(monitor, row)
    return -row["val_auc"] if used == "val_auc" else row[used]


def monitored(monitor: str, row: dict) -> str:
    """The score that decides for ``row``: val_auc, else val_loss (a validation split of one class has no ROC AUC),
    else the training loss (no validation split)."""
    if monitor == "val_auc" and row.get("val_auc") is not None:
        return "val_auc"
    return "val_loss" if row.get("val_loss") is not None else "train_loss"


def checkpoint_payload(run: Run, weights_model: torch.nn.Module) -> dict:
    config = run.config
    return {"model": {"name": config.model, "kwargs": weights_model.model_kwargs},
            "state_dict": cpu_state(weights_model),
            "preprocessing": {"size": [config.size, config.size], "channels": config.channels, "rescale": 1 / 255,
                              "interpolation": config.interpolation, "intensity": config.intensity,
                              "color": "grayscale read, repeated to RGB" if config.channels == 3 else "grayscale"},
            "class_names": list(run.train_set.class_names), "threshold": 0.5, "threshold_policy": "0.5",
            "tta": config.tta, "config": config.to_dict(), "history": run.state.history, "run_id": run.run_id,
            "epoch": run.state.epoch, "parameters": run.parameters,
            "intended_use": intended_use(run.train_set, config)}


def save_last(run: Run, final: bool = False):
    """last.pt, written by rank 0 with every rank's own random states and partial sums: a collective, every
    rank calls it at the same point. After the last epoch (``final``) nothing more is trained, so rank 0's
    alone, and no collective: the other ranks go on to their exit, which a collective just before it can abort
    ("terminate called without an active exception")."""
    ranks = None if final else gather_objects(run.dist, run.state.rank_state())
    if run.dist.main:
        payload = checkpoint_payload(run, run.state.model)
        payload["training_state"] = run.state.saved(ranks, run.dist.world_size)
        save_checkpoint(payload, run.out / "last.pt")


def finish(run: Run, interrupted: bool, after_training: AfterTraining | None) -> dict:
    summary = {"run_dir": str(run.out), "run_id": run.run_id, "history": run.state.history,
               "interrupted": interrupted, "parameters": run.parameters, "main_process": run.dist.main}
    try:  # a stop during the end-of-run steps still closes the tracker and leaves the process group
        if interrupted:
            if run.dist.main:
                log.warning("stopped early; resume with: pneumonia-cnn train --resume %s", display_path(run.out))
        elif run.dist.main:
            summary.update(finish_run(run.out, run.config, run.train_set, run.val_set, run.device))
            if after_training is not None:
                summary.update(after_training(run.out, run.config, run.device))
            if run.tracker:
                run.tracker.log_metrics({f"final_{k}": v for k, v in summary.get("test_metrics", {}).items()
                                         if isinstance(v, (int, float))}, len(run.state.history))
                run.tracker.log_artifacts(run.out)
    finally:
        if run.tracker:
            run.tracker.close()
        finish_distributed(run.dist)
    return summary


def resume(run_dir, after_training: AfterTraining | None = None, **overrides) -> dict:
    """Continue ``run_dir`` from its last.pt with the config it was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / "last.pt").exists():
        raise PneumoniaCNNError(f"{display_path(run_dir)}: nothing to resume (no last.pt)")
    last = load_checkpoint(run_dir / "last.pt")
    check_resumable(last, display_path(run_dir / "last.pt"))
    check_own_best(run_dir, last)
    check_world_size(last, launched_world_size(), display_path(run_dir))
    values = dict(last["config"])
    _refuse_nothing_to_resume(run_dir, last, values, overrides.get("epochs"))
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["out"] = str(run_dir)
    try:
        config = config_from_dict(values)
    except ConfigError as error:  # a value stored by an earlier version that no longer passes: name the run
        raise ConfigError(f"--resume {display_path(run_dir)}: {error} (its last.pt's configuration with the options "
                          f"given)") from None
    return train(config, resume_from_last=True, after_training=after_training)


def _refuse_nothing_to_resume(run_dir: Path, last: dict, values: dict, epochs: int | None) -> None:
    """Resuming a run with no epoch left to train would only fit its end-of-run steps again and rewrite its
    checkpoints: refused, unless the run stopped before those steps were done (best.pt has no fitted decision)."""
    state = last.get("training_state") or {}
    done = int(state.get("epoch", 0))
    if epochs is not None and epochs <= done:
        raise PneumoniaCNNError(f"{display_path(run_dir)}: has trained {done} epochs already; --epochs {epochs} "
                                f"would train none (and rewrite its checkpoints): give more than {done}")
    stopped = training_finished(state, values)
    best = run_dir / "best.pt"
    if epochs is None and stopped and best.is_file() and "decision_fit" in load_checkpoint(best):
        raise PneumoniaCNNError(f"{display_path(run_dir)}: finished after {done} epoch{'s' * (done != 1)}; nothing to "
                                f"resume (give --epochs more than {done} to train further)")


def write_history(history: list[dict], out: Path):
    write_json_atomic(out / "history.json", history)
    columns = list(dict.fromkeys(key for row in history for key in row))
    lines = [",".join(columns)] + [",".join("" if row.get(c) is None else f"{row[c]:.6g}" if isinstance(row[c], float)
                                            else str(row[c]) for c in columns) for row in history]
    write_text_atomic(out / "history.csv", "\n".join(lines) + "\n")


def format_row(row: dict) -> str:
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc")
    return "  ".join(f"{k} {row[k]:.4f}" for k in keys if row.get(k) is not None) + f"  ({row['seconds']:.0f}s)"


def _progress_bar(run: Run, skip: int):
    if not (run.config.progress and run.dist.main):
        return None
    from tqdm import tqdm
    return tqdm(total=run.steps_per_epoch, initial=skip, desc=f"epoch {run.state.epoch + 1}/{run.config.epochs}",
                unit="batch", leave=False, file=sys.stderr, disable=None)
