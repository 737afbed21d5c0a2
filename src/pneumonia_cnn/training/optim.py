"""Optimiser, learning-rate schedule and weight averaging."""
from __future__ import annotations

import math

import torch

from ..device import fused_optimizer_supported
from .config import TrainConfig


def learning_rate_factor(config: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(1, total_steps - warmup), 1.0)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "onecycle":
        return max(0.0, 1.0 - progress)
    return 1.0


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # a fused kernel per step instead of a dozen passes over the parameters, where the build has one
    fused = fused_optimizer_supported(next(model.parameters()).device)
    if config.optimizer == "adam":  # Keras' Adam defaults: betas (0.9, 0.999), eps 1e-7
        return _with_fused(torch.optim.Adam, fused, model.parameters(), lr=config.lr, eps=1e-7,
                           weight_decay=config.weight_decay)
    if config.optimizer == "adamw":  # no decay on biases and normalisation weights
        decay = [p for p in model.parameters() if p.dim() > 1]
        no_decay = [p for p in model.parameters() if p.dim() <= 1]
        return _with_fused(torch.optim.AdamW, fused, [{"params": decay, "weight_decay": config.weight_decay},
                                                      {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    return _with_fused(torch.optim.SGD, fused, model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                       weight_decay=config.weight_decay)


def _with_fused(optimizer_class, fused: bool, params, **options):
    """The fused kernel where this torch build has it for the parameters' device, else the default one."""
    params = list(params)
    if fused:
        try:
            return optimizer_class(params, fused=True, **options)
        except (RuntimeError, ValueError):  # older torch: no fused kernel for this optimizer on this device
            pass
    return optimizer_class(params, **options)


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float):
    """ema <- decay * ema + (1 - decay) * weights, as one fused kernel per dtype group (on a GPU a loop over
    tensors costs more in launches than the arithmetic)."""
    ema_floats, floats = [], []
    for ema_value, value in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if ema_value.dtype.is_floating_point:
            ema_floats.append(ema_value)
            floats.append(value.detach())
        else:
            ema_value.copy_(value)
    if ema_floats:
        torch._foreach_lerp_(ema_floats, floats, 1 - decay)


def ema_decay_at(config: TrainConfig, step: int) -> float:
    """A short memory early on (the first weights are noise), growing to ``ema_decay``."""
    return min(config.ema_decay, (1 + step) / (10 + step))
