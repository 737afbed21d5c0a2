"""Floor 1: architectures, built by name. Knows nothing of files or data."""
from . import densenet, mobilenet, resnet, seed  # noqa: F401  (registers the models)
from .registry import InputConv2d, count_parameters, create_model, last_conv_layer_name, list_models, register_model
from .summary import format_summary, summarize

__all__ = ["create_model", "list_models", "register_model", "count_parameters", "last_conv_layer_name",
           "format_summary", "summarize", "InputConv2d"]
