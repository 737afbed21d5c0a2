"""Model registry in the manner of timm: ``create_model(name, in_channels, image_size, **kwargs)``."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError
from ..fileio import display_path, load_torch_file

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str = ""):
    def decorate(builder):
        _REGISTRY[name] = builder
        _DESCRIPTIONS[name] = description or (builder.__doc__ or "").strip().splitlines()[0]
        return builder
    return decorate


def list_models() -> dict[str, str]:
    return dict(sorted(_DESCRIPTIONS.items()))


def create_model(name: str, in_channels: int = 3, image_size=(224, 224), weights: str | None = None,
                 **kwargs) -> nn.Module:
    """Build a registered model; ``weights`` is an optional local state-dict file (nothing is downloaded)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(_REGISTRY))}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    model = _REGISTRY[name](in_channels=in_channels, image_size=tuple(image_size), **kwargs)
    model.model_name = name
    model.model_kwargs = dict(in_channels=in_channels, image_size=list(image_size), **kwargs)
    if weights:
        model.load_state_dict(read_weights_file(weights), strict=True)
    return model


class InputConv2d(nn.Conv2d):
    """First convolution of every model: takes gray (B, 1, H, W) input for an RGB-trained layer by summing
    the kernel over its input channels, which equals repeating the gray channel three times, at a third
    of the cost and without tripling the stored data."""

    def forward(self, x):
        if x.shape[1] == 1 and self.in_channels > 1:
            return F.conv2d(x, gray_kernel(self.weight), self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        return super().forward(x)


def gray_kernel(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` summed over its input channels. On the CPU the one-channel kernel gets channels-last strides
    (the same memory: a size-1 dimension's stride addresses nothing), so that oneDNN writes a channels-last
    output like every later layer's; with the default strides it writes a channels-first one, and the
    max-pool and layout copy that follow made the seed model's CPU forward 1.8x slower (README, "Speed")."""
    summed = weight.sum(dim=1, keepdim=True)
    # exporters (TorchScript tracing, which the ONNX export uses, and torch.export) get the plain kernel
    if summed.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return summed
    summed = summed.contiguous()
    return summed.as_strided(summed.shape, (summed.stride(0), 1, summed.stride(2), 1))


def read_weights_file(path) -> dict:
    """Weights for ``create_model(..., weights=path)``: a pneumonia-cnn checkpoint or a bare state dict."""
    payload = load_torch_file(path)
    if isinstance(payload, dict) and "state_dict" in payload:
        payload = payload["state_dict"]
    if not isinstance(payload, dict):
        raise CheckpointError(f"{display_path(path)}: not a state dict")
    return payload


def last_conv_layer_name(model: nn.Module) -> str:
    """The Grad-CAM layer: the model's declared one, else its last convolution."""
    declared = getattr(model, "gradcam_layer", None)
    if declared:
        return declared
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ValueError("model has no convolution layer")
    return names[-1]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
