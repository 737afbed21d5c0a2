"""Floor 3: bridges to other tools (Keras import, ONNX/TorchScript export)."""
