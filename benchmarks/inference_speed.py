"""Inference speed through ``Predictor`` (the library's scoring path) for each engine, and the int8 engine
against the float32 ONNX engine: throughput, single-image latency and, for a trained checkpoint, its
agreement on the shared ``test`` split (ROC AUC, labels at the checkpoint's threshold, OOD flags)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINES = (("torch", "off"), ("onnx", "off"), ("torch", "bf16"), ("onnx-int8", "off"), ("openvino-int8", "off"))


def engine_key(engine: str, amp: str) -> str:
    return (engine if amp == "off" else f"{engine}_{amp}").replace("-", "_")


def speed(predictor, batch: np.ndarray, batch_size: int, latency_runs: int) -> dict:
    """Images/s over the batch (after one warm-up batch) and single-image p50/p95 latency in ms."""
    predictor.predict_arrays(batch[:batch_size], batch_size)
    start = time.perf_counter()
    predictor.predict_arrays(batch, batch_size)
    throughput = len(batch) / (time.perf_counter() - start)
    one = batch[:1]
    for _ in range(5):
        predictor.probabilities_from_pixels(one)
    latencies = []
    for _ in range(latency_runs):
        start = time.perf_counter()
        predictor.probabilities_from_pixels(one)
        latencies.append((time.perf_counter() - start) * 1000)
    return {"images_per_s": throughput, "batch_size": batch_size,
            "single_image_ms_p50": float(np.percentile(latencies, 50)),
            "single_image_ms_p95": float(np.percentile(latencies, 95))}


def prepare_int8(checkpoint, data: str, calibration: np.ndarray | None = None) -> dict:
    """Build the checkpoint's int8 graph into a private cache (``PNEUMONIA_CNN_CACHE``): from its own
    validation split (``export --format onnx-int8``) or, for the untrained benchmark checkpoint, from
    ``calibration`` images."""
    os.environ["PNEUMONIA_CNN_CACHE"] = tempfile.mkdtemp(prefix="pcnn-bench-int8-")
    start = time.perf_counter()
    if calibration is None:
        from pneumonia_cnn.inference.quantize import export_int8
        export_int8(checkpoint, data, Path(os.environ["PNEUMONIA_CNN_CACHE"]) / "model.int8.onnx")
    else:
        from pneumonia_cnn.inference import graph_cache
        from pneumonia_cnn.inference.bundle import load_bundle
        from pneumonia_cnn.inference.quantize import quantize_served
        from pneumonia_cnn.inference.quantized import store_path
        from pneumonia_cnn.inference.sessions import served_key
        bundle = load_bundle(checkpoint)
        model, size = bundle.models[0], bundle.preprocessing.size
        path = store_path(served_key(model, size, bundle.tta, bundle.taps))
        path.parent.mkdir(parents=True, exist_ok=True)
        # with its checksum, as export writes it: the int8 engines refuse a cached graph without one
        graph_cache.store(path, quantize_served(model, size, bundle.tta, bundle.taps, calibration))
    return {"build_seconds": time.perf_counter() - start}


def bench_engines(checkpoint, pixels: np.ndarray, batch_size: int, latency_runs: int, repeats: int = 3,
                  openvino: bool = False) -> dict:
    """The engines' speed (OpenVINO's, or all the others), each group interleaved and repeated (medians).
    OpenVINO's group is measured after the others, not interleaved with them: once it has started its threads,
    ONNX Runtime's single-image latency in the same process triples (2.1 -> 6.4 ms measured); a ratio across
    the groups compares runs a minute apart in one process."""
    engines = [e for e in ENGINES if e[0].startswith("openvino") == openvino]
    return _bench_group(checkpoint, engines, pixels, batch_size, latency_runs, repeats)


def _bench_group(checkpoint, engines, pixels, batch_size, latency_runs, repeats) -> dict:
    from pneumonia_cnn.inference import Predictor
    predictors, results = {}, {}
    for engine, amp in engines:
        try:
            predictors[engine_key(engine, amp)] = Predictor(checkpoint, "cpu", amp=amp, engine=engine)
        except Exception as error:  # onnxruntime or openvino missing, or no int8 graph built
            results[engine_key(engine, amp)] = {"skipped": str(error)}
    runs = {key: [] for key in predictors}
    for _ in range(repeats):
        for key, predictor in predictors.items():
            runs[key].append(speed(predictor, pixels, batch_size, latency_runs))
    for key, measured in runs.items():
        results[key] = {name: statistics.median(run[name] for run in measured) for name in measured[0]}
        results[key]["images_per_s_runs"] = [run["images_per_s"] for run in measured]
    return results


def int8_agreement(checkpoint, data: str, engine: str = "onnx-int8") -> tuple[dict, np.ndarray]:
    """An int8 engine against float32 ONNX on ``data``/test: ROC AUC of each, share of identical labels at
    the checkpoint's threshold, share of identical OOD flags; and the test images (for timing)."""
    from sklearn.metrics import roc_auc_score

    from pneumonia_cnn.data.cache import build_or_load
    from pneumonia_cnn.data.dataset import load_split
    from pneumonia_cnn.inference import Predictor
    float32 = Predictor(checkpoint, "cpu", engine="onnx")
    int8 = Predictor(checkpoint, "cpu", engine=engine)
    pre = float32.bundle.preprocessing
    test = build_or_load(load_split(data, "test"), pre.size, pre.interpolation, pre.intensity)
    pixels = np.asarray(test.images)
    reference, quantised = float32.score(pixels), int8.score(pixels)
    labels = [s.probabilities >= float32.threshold for s in (reference, quantised)]
    result = {"engine": engine, "images": len(pixels),
              "roc_auc_float32": float(roc_auc_score(test.labels, reference.raw)),
              "roc_auc_int8": float(roc_auc_score(test.labels, quantised.raw)),
              "same_label": float(np.mean(labels[0] == labels[1])),
              "max_abs_logit_difference": float(np.abs(reference.raw - quantised.raw).max())}
    if float32.ood is not None:
        flags = [float32.ood.flagged(float32.ood.score(s.features, s.raw, pixels)) for s in (reference, quantised)]
        result["same_ood_flag"] = float(np.mean(flags[0] == flags[1]))
    return result, pixels


def alternating_processes(checkpoint, pixels: np.ndarray, batch_size: int, pairs: int = 3,
                          engines=("onnx", "openvino-int8")) -> dict:
    """Throughput of two engines, each in a process of its own, alternating (A B A B ...): a slow minute on a
    shared machine then lowers one pair, not one engine's every run; and OpenVINO's threads never share a
    process with ONNX Runtime. The ratio is the median of the pairs' ratios."""
    folder = Path(tempfile.mkdtemp(prefix="pcnn-bench-pairs-"))
    np.save(folder / "pixels.npy", np.asarray(pixels))
    runs = {engine: [] for engine in engines}
    for _ in range(pairs):
        for engine in engines:
            command = [sys.executable, __file__, str(checkpoint), str(folder / "pixels.npy"), engine, str(batch_size)]
            answer = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if answer.returncode != 0:  # openvino not installed, or no int8 graph: said, not raised
                return {"skipped": (answer.stderr.strip().splitlines() or ["?"])[-1]}
            runs[engine].append(json.loads(answer.stdout.strip().splitlines()[-1])["images_per_s"])
    first, second = engines
    ratios = [b / a for a, b in zip(runs[first], runs[second])]
    return {"engines": list(engines), "images_per_s": runs, "pair_ratios": ratios,
            "median_ratio": statistics.median(ratios)}


def _one_engine(argv=None):
    """``python inference_speed.py CHECKPOINT PIXELS.npy ENGINE BATCH``: the best of three timed passes over the
    pixels (after a warm-up batch), printed as JSON."""
    parser = argparse.ArgumentParser()
    for name in ("checkpoint", "pixels", "engine"):
        parser.add_argument(name)
    parser.add_argument("batch_size", type=int)
    args = parser.parse_args(argv)
    from pneumonia_cnn.inference import Predictor
    pixels = np.load(args.pixels)
    predictor = Predictor(args.checkpoint, "cpu", engine=args.engine)
    predictor.predict_arrays(pixels[:args.batch_size], args.batch_size)
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        predictor.predict_arrays(pixels, args.batch_size)
        passes.append(len(pixels) / (time.perf_counter() - start))
    print(json.dumps({"engine": args.engine, "images_per_s": max(passes), "passes": passes}))


if __name__ == "__main__":
    _one_engine()
