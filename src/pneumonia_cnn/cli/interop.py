"""Interoperability: ``export`` (ONNX, TorchScript) and ``import-keras``."""
from __future__ import annotations

from .common import Command


def export_arguments(p):
    p.add_argument("checkpoint", help="best.pt or run folder")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format")
    p.add_argument("--out", required=True, help="file to write")


def run_export(args) -> int:
    from ..interop.export import export_model
    print(f"written: {export_model(args.checkpoint, args.format, args.out)}")
    return 0


def import_keras_arguments(p):
    p.add_argument("model", help=".h5, .keras or .weights.h5 file of the tutorial's model")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--size", help="input size for weights-only files: 224 or HxW (e.g. 96x80)")


def run_import_keras(args) -> int:
    from ..interop.keras_import import import_keras
    size = None
    if args.size:
        parts = [int(p) for p in args.size.lower().split("x")]
        size = (parts[0], parts[-1])
    _, payload = import_keras(args.model, args.out, size)
    height, width = payload["preprocessing"]["size"]
    print(f"imported {args.model}: seed model, input {height}x{width}x{payload['preprocessing']['channels']}, "
          f"{payload['parameters']:,} parameters -> {args.out}")
    return 0


COMMANDS = [
    Command("export", "export to ONNX or TorchScript with metadata", export_arguments, run_export,
            ("pneumonia-cnn export runs/best/best.pt --format onnx --out model.onnx",)),
    Command("import-keras", "import the tutorial's trained Keras model (.h5, .keras, .weights.h5)",
            import_keras_arguments, run_import_keras,
            ("pneumonia-cnn import-keras model.h5 --out keras.pt",)),
]
