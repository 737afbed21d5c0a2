"""Model registry in the manner of timm: ``create_model(name, in_channels, image_size, **kwargs)``."""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import OTHER_MODEL_FILES, CheckpointError, ConfigError, one_line
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
    """Build a registered model; ``weights`` is an optional local state-dict file (nothing is downloaded).
    An unknown name, keyword or value is a ``ConfigError`` naming the model and the reason."""
    check_model_kwargs(name, kwargs)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    try:
        model = _REGISTRY[name](in_channels=in_channels, image_size=tuple(image_size), **kwargs)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as error:
        arguments = dict(in_channels=in_channels, image_size=image_size, **kwargs)
        raise ConfigError(f"model {name} cannot be built with {arguments} ({one_line(error)})") from None
    model.model_name = name
    model.model_kwargs = dict(in_channels=in_channels, image_size=list(image_size), **kwargs)
    if weights:
        try:
            model.load_state_dict(read_weights_file(weights), strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"{display_path(weights)}: weights do not fit model {name} "
                                  f"({state_dict_misfit(error)})") from None
    return model


def check_model_kwargs(name: str, kwargs: dict, reserved=()) -> None:
    """A ``ConfigError`` naming the model and the keyword(s) it does not take, and those it does (less the
    ``reserved`` ones, which the caller sets itself)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(sorted(_REGISTRY))}")
    parameters = inspect.signature(_REGISTRY[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [n for n, p in parameters.items() if n not in reserved
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [str(key) for key in kwargs if key not in accepted]
    if unknown:
        raise ConfigError(f"model {name}: unknown keyword argument(s) {', '.join(sorted(unknown))}; "
                          f"it accepts {', '.join(accepted) or 'none'}")
    for key, value in kwargs.items():
        _check_like_default(name, key, value, parameters[key].default)


def _check_like_default(name: str, key: str, value, default) -> None:
    """A number where the model's default is one (a quoted "32" failed deep inside the model's construction,
    blamed on the input size; ``true`` was taken for 1)."""
    kinds = {bool: ("true or false", (bool,)), int: ("an integer", (int,)), float: ("a number", (int, float))}
    if type(default) not in kinds:
        return
    wanted, types = kinds[type(default)]
    if not isinstance(value, types) or (isinstance(value, bool) and type(default) is not bool):
        raise ConfigError(f"model {name}: {key} must be {wanted} (its default is {default!r}), got {value!r}")


def state_dict_misfit(error: BaseException) -> str:
    """``load_state_dict``'s error on one line: how many keys are missing or unexpected (the first few
    named) and the first size mismatch, instead of thousands of characters or only its header line."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [one_line(error)]
    parts, mismatches = [], []
    for line in lines:
        found = re.match(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)", line)
        shapes = re.match(r"size mismatch for (\S+): copying a param with shape torch\.Size\((.*?)\) from "
                          r"checkpoint, the shape in current model is torch\.Size\((.*?)\)", line)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(2))
            more = f", … ({len(keys)} in all)" if len(keys) > 3 else ""
            parts.append(f"{found.group(1).lower()} key(s) {', '.join(keys[:3])}{more}")
        elif shapes:
            mismatches.append(f"{shapes.group(1)} is {shapes.group(2)} in the file, {shapes.group(3)} in the model")
        else:
            parts.append(line)
    if mismatches:
        more = f" ({len(mismatches)} size mismatches in all)" if len(mismatches) > 1 else ""
        parts.append(f"size mismatch: {mismatches[0]}{more}")
    return one_line(RuntimeError("; ".join(parts)), limit=400)


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
    kind = OTHER_MODEL_FILES.get(Path(str(path)).suffix.lower())
    if kind:  # train --weights: torch's words on a Keras zip's layout had been the reason
        raise CheckpointError(f"{display_path(path)}: {kind}")
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
