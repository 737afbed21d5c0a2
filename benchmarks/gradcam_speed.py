"""Grad-CAM of the built-in model on the shared ``test`` images, ours against the textbook method (the layer's
output kept with ``retain_grad`` and a full backward pass to every parameter, as pytorch-grad-cam and the
paper's code do), interleaved in one process; and the PNG overlay at zlib levels 6 (files) and 1 (served).

    python benchmarks/gradcam_speed.py [--images 16] [--rounds 5] [--out benchmarks/gradcam_speed.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))


def textbook_cam(model, pixels, layer_name: str):
    """Grad-CAM as usually written: the cell map (1, 1, h, w) before upsampling."""
    from pneumonia_cnn.data.loader import to_model_input
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["out"] = output
    handle = dict(model.named_modules())[layer_name].register_forward_hook(keep)
    try:
        model(to_model_input(torch.from_numpy(pixels)[None], torch.device("cpu"))).sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    out = captured["out"]
    return torch.relu((out.grad.mean(dim=(2, 3), keepdim=True) * out).sum(dim=1, keepdim=True)).detach()


def ms_per_image(function, images) -> float:
    start = time.perf_counter()
    for image in images:
        function(image)
    return 1000 * (time.perf_counter() - start) / len(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "gradcam_speed.json"))
    args = parser.parse_args()
    if not (Path(args.data) / "test" / "PNEUMONIA").is_dir():
        parser.error(f"--data {args.data}: no test/PNEUMONIA folder there")
    from PIL import Image

    from pneumonia_cnn.explanation import grad_cam, overlay
    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.models import last_conv_layer_name
    predictor = Predictor("builtin", "cpu")
    model = predictor.bundle.explain_model().eval()
    layer = last_conv_layer_name(model)
    paths = sorted((Path(args.data) / "test" / "PNEUMONIA").iterdir())[:args.images]
    images = [predictor.preprocess_path(path)[0] for path in paths]
    cams = [grad_cam(model, image, "cpu") for image in images]  # warm-up, and the receptive-field centres
    overlays = [overlay(image, cam) for image, cam in zip(images, cams)]

    def png(level):
        return lambda picture: Image.fromarray(picture).save(io.BytesIO(), format="PNG", compress_level=level)
    rounds = {"ours": [], "textbook": [], "png_level6": [], "png_level1": []}
    for _ in range(args.rounds):
        rounds["ours"].append(ms_per_image(lambda image: grad_cam(model, image, "cpu"), images))
        rounds["textbook"].append(ms_per_image(lambda image: textbook_cam(model, image, layer), images))
        rounds["png_level6"].append(ms_per_image(png(6), overlays))
        rounds["png_level1"].append(ms_per_image(png(1), overlays))
    sizes = {level: statistics.mean(len(_encoded(picture, level)) for picture in overlays) for level in (6, 1)}
    result = {"model": "builtin", "layer": layer, "images": len(images), "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0],
              "median_ms": {name: statistics.median(values) for name, values in rounds.items()},
              "rounds_ms": rounds, "png_mean_bytes": {"level6": sizes[6], "level1": sizes[1]}}
    print(json.dumps(result["median_ms"], indent=2), json.dumps(result["png_mean_bytes"]))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _encoded(picture, level) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
