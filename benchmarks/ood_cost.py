"""What the out-of-distribution detector adds to predict's time per image (target: at most 10%).

    python benchmarks/ood_cost.py runs/best/best.pt [--data ../shared/data/chest_xray_224]

predict's time: ``Predictor.predict_files`` on the ``test`` folder without the detector (decoding, resizing,
intensity, the forward pass(es) of its engine), per image. The detector's share: the taps' extra work in the
engine predict uses (ONNX Runtime by default: the graph exported with the taps against the one without, on the
same preprocessed images) plus ``OODDetector.score``, per image. Also reported: the taps' extra work in an eager
torch forward (``--engine torch``, Grad-CAM). Runs with and without the taps alternate and the fastest of each
counts. The checkpoint must hold a detector fitted by this version (``version`` 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))
sys.path.insert(0, str(PROJECT / "benchmarks"))

from ood_study import forward_ms  # noqa: E402

from pneumonia_cnn.checkpoint import build_model, load_checkpoint  # noqa: E402
from pneumonia_cnn.errors import PneumoniaCNNError  # noqa: E402
from pneumonia_cnn.inference import Predictor  # noqa: E402
from pneumonia_cnn.inference.bundle import load_bundle  # noqa: E402
from pneumonia_cnn.ood import OODDetector, extract  # noqa: E402


def predict_ms(checkpoint_path, files, repeats=3) -> float:
    # the same checkpoint without its detector: no taps in the served graph, no scoring
    predictor = Predictor(dataclasses.replace(load_bundle(checkpoint_path), ood=None), "cpu")
    predictor.predict_files(files[:64])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict_files(files)
        times.append(time.perf_counter() - started)
    return 1000 * min(times) / len(files)


def engine_ms(checkpoint_path, pixels, batch=64, repeats=15) -> tuple[float, float]:
    """(ms per image of predict's engine without the taps, extra ms per image with them)."""
    engines = {"taps": Predictor(checkpoint_path, "cpu").scorer.engine,
               "bare": Predictor(dataclasses.replace(load_bundle(checkpoint_path), ood=None), "cpu").scorer.engine}
    times = {name: [] for name in engines}
    for engine in engines.values():
        engine.run(pixels[:batch])
    for _ in range(repeats):
        for name, engine in engines.items():
            started = time.perf_counter()
            for start in range(0, len(pixels), batch):
                engine.run(pixels[start:start + batch])
            times[name].append(time.perf_counter() - started)
    bare, taps = (1000 * min(times[name]) / len(pixels) for name in ("bare", "taps"))
    return bare, max(taps - bare, 0.0)


def score_ms(detector, model, files_pixels, repeats=5) -> float:
    features, logits = extract(model, files_pixels, detector.taps)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        detector.score(features, logits, files_pixels)
        times.append(time.perf_counter() - started)
    return 1000 * min(times) / len(files_pixels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "data" / "chest_xray_224")
    parser.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "ood_cost.json")
    args = parser.parse_args()
    try:
        result = measure(args)
    except (PneumoniaCNNError, OSError) as error:
        sys.exit(f"error: {error}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def measure(args) -> dict:
    checkpoint = load_checkpoint(args.checkpoint)
    if not checkpoint.get("ood"):
        raise PneumoniaCNNError(f"{args.checkpoint}: holds no out-of-distribution detector to time")
    detector = OODDetector.from_state(checkpoint["ood"])
    model = build_model(checkpoint).eval()
    files = sorted((args.data / "test").glob("*/*.jpeg"))
    if not files:
        raise PneumoniaCNNError(f"{args.data / 'test'}: no CLASS/*.jpeg images to time predict on")
    predictor = Predictor(args.checkpoint, "cpu")
    pixels = np.stack([predictor.preprocess_path(f)[0] for f in files])
    size = tuple(checkpoint["preprocessing"]["size"])
    forward, torch_taps_extra = forward_ms(model, detector.taps, size, repeats=25)
    engine_forward, taps_extra = engine_ms(args.checkpoint, pixels[:256])
    scoring = score_ms(detector, model, pixels)
    predict = predict_ms(args.checkpoint, files)
    engine = predictor.scorer.engine.name
    result = {"checkpoint": str(args.checkpoint), "engine": engine, "torch_threads": torch.get_num_threads(),
              "predict_ms_per_image": predict, "engine_forward_ms_per_image": engine_forward,
              "taps_extra_ms": taps_extra, "scoring_ms": scoring, "detector_ms": taps_extra + scoring,
              "detector_share_of_predict": (taps_extra + scoring) / predict,
              "torch_forward_ms_per_image": forward, "torch_taps_extra_ms": torch_taps_extra,
              "torch_detector_share_of_predict": (torch_taps_extra + scoring) / predict}
    print(f"predict {predict:.2f} ms/image ({engine} engine, {torch.get_num_threads()} threads); its forward "
          f"{engine_forward:.2f}; detector {taps_extra + scoring:.2f} (taps {taps_extra:.2f} + scoring "
          f"{scoring:.2f}) = {result['detector_share_of_predict']:.1%} of predict; in an eager torch forward the "
          f"taps add {torch_taps_extra:.2f} ({result['torch_detector_share_of_predict']:.1%} with the scoring)")
    return result


if __name__ == "__main__":
    main()
