"""A Keras-style ``model.summary()`` table: layer, output shape (channels last), parameters."""
from __future__ import annotations

import torch
import torch.nn as nn


def summarize(model: nn.Module, in_channels: int, image_size) -> tuple[list[tuple[str, str, int]], int, int]:
    rows = []
    hooks = []

    def hook(module, _inputs, output, name):
        shape = tuple(output.shape[1:])
        if len(shape) == 3:  # NCHW -> Keras' (H, W, C)
            shape = (shape[1], shape[2], shape[0])
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((f"{name} ({type(module).__name__})", "(None, " + ", ".join(map(str, shape)) + ")", params))

    for name, module in model.named_modules():
        if name and not list(module.children()) and not isinstance(module, (nn.ReLU, nn.ReLU6, nn.Dropout,
                                                                           nn.Identity)):
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: hook(m, i, o, n)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, in_channels, *image_size))
    model.train(was_training)
    for handle in hooks:
        handle.remove()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for n, b in model.named_buffers() if "num_batches" not in n)
    return rows, trainable, frozen + buffers


def format_summary(model: nn.Module, in_channels: int, image_size, name: str = "") -> str:
    rows, trainable, non_trainable = summarize(model, in_channels, image_size)
    width = max([len(r[0]) for r in rows] + [20]) + 2
    line = "─" * (width + 52)
    out = [f'Model: "{name}"', line, f"{'Layer (type)':<{width}}{'Output Shape':<32}{'Param #':>20}", line]
    out += [f"{layer:<{width}}{shape:<32}{params:>20,}" for layer, shape, params in rows]
    out += [line, f" Total params: {trainable + non_trainable:,}", f" Trainable params: {trainable:,}",
            f" Non-trainable params: {non_trainable:,}", line]
    return "\n".join(out)
