"""Speed and memory of pneumonia-cnn on this machine, against its strongest peers in the same run.

    python benchmarks/run.py --keras-python /tmp/tfenv/bin/python          # everything
    python benchmarks/run.py --checkpoint runs/best/best.pt                 # + int8 agreement on its test split
    python benchmarks/run.py --only training,keras --pairs 3
    python benchmarks/run.py --only time_to_model --time-to-model best,fast  # raw images to a checkpoint
    python benchmarks/run.py --device cuda --batch-size 256 --lr 0.004      # a GPU (see benchmarks/gpu.sh)

Training is the library's own loop (``training.start_run`` + ``train_one_epoch`` -> ``train_step``), repeated;
its model FLOP utilisation (MFU) divides the FLOPs that ``FlopCounterMode`` counts by the bf16 and float32
matrix-product peaks measured in the same run. The Keras peers (``keras_peers.py``, run by ``--keras-python``)
are the tutorial's ``ImageDataGenerator`` pipeline and the ``tf.data`` + ``.cache()`` + ``mixed_bfloat16`` one;
the training ratio against the latter is the median of ``--pairs`` interleaved (ours, Keras) pairs. Inference
compares the engines through ``Predictor`` (torch, ONNX Runtime float32, torch bf16, ONNX Runtime int8,
OpenVINO int8).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))
import pneumonia_cnn  # noqa: E402,F401  # before torch, as the CLI: it sets OpenMP's wait policy (device.py)

sys.path.insert(0, str(PROJECT / "benchmarks"))

import inference_speed  # noqa: E402
import numpy as np  # noqa: E402
import system_speed  # noqa: E402
import torch  # noqa: E402
import training_speed  # noqa: E402
from report import print_table  # noqa: E402

from pneumonia_cnn.data.augment import AugmentConfig, augment_batch  # noqa: E402
from pneumonia_cnn.data.cache import build_or_load  # noqa: E402
from pneumonia_cnn.data.dataset import scan_folder  # noqa: E402
from pneumonia_cnn.data.loader import BatchLoader, to_model_input  # noqa: E402
from pneumonia_cnn.device import keep_freed_memory_for_reuse  # noqa: E402
from pneumonia_cnn.models import create_model  # noqa: E402

TUTORIAL_AUGMENT = AugmentConfig(shear=0.2, zoom=0.2, flip=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_cache_and_pipeline(args, device, results):
    """Decoding into the cache (and its reuse), then the loader + augmentation alone."""
    images = scan_folder(Path(args.data) / args.split)
    cache_dir = Path(tempfile.mkdtemp(prefix="pcnn-bench-"))
    try:
        start = time.perf_counter()
        cached = build_or_load(images, (args.size, args.size), cache_dir=cache_dir)
        build = time.perf_counter() - start
        start = time.perf_counter()
        build_or_load(images, (args.size, args.size), cache_dir=cache_dir)
        results["cache"] = {"images": len(cached), "build_seconds": build, "decode_images_per_s": len(cached) / build,
                            "reuse_seconds": time.perf_counter() - start}
        loader = BatchLoader(cached.images, cached.labels, args.batch_size, shuffle=True, augment=TUTORIAL_AUGMENT)
        generator = torch.Generator().manual_seed(0)
        start, seen = time.perf_counter(), 0
        for pixels, _, _ in loader:
            augment_batch(to_model_input(pixels, device), TUTORIAL_AUGMENT, generator)
            seen += len(pixels)
        _sync(device)
        results["data_pipeline"] = {"images_per_s": seen / (time.perf_counter() - start)}
        return np.array(cached.images[:args.batch_size * 8])
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def bench_peaks(device, results, when: str):
    results.setdefault("peak_gflops", {})[when] = {
        "bfloat16": training_speed.matmul_peak(torch.bfloat16, device),
        "float32": training_speed.matmul_peak(torch.float32, device)}


def training_overrides(args) -> dict:
    overrides = {"model": args.model, "size": args.size, "batch_size": args.batch_size, "amp": args.amp,
                 "compile": args.compile}
    return {**overrides, "lr": args.lr} if args.lr else overrides


def bench_training(args, device, results, loop):
    rates = [loop.rate(args.steps) for _ in range(args.repeats)]
    median = statistics.median(rates)
    results["training"] = {"images_per_s": median, "runs": rates, "steps": args.steps,
                           "spread": (max(rates) - min(rates)) / median, **loop.describe(),
                           "what": "the library's loop: training.start_run + train_one_epoch -> train_step"}
    flops = training_speed.model_flops_per_image(args.model, 3, args.size)
    results["model_flops_per_image"] = flops
    results["epochs"] = {"later_epoch_seconds": results["cache"]["images"] / median,
                         "first_epoch_seconds": results["cache"]["build_seconds"] + results["cache"]["images"] / median}
    results["peak_rss_mb_after_training"] = peak_rss_mb()


def add_utilisation(results):
    """MFU against the mean of the peaks measured before and after training, for each precision."""
    if "training" not in results or "peak_gflops" not in results:
        return
    peaks = results["peak_gflops"].values()
    rate, flops = results["training"]["images_per_s"], results["model_flops_per_image"]["training"]
    for precision in ("bfloat16", "float32"):
        peak = statistics.mean(p[precision] for p in peaks)
        results["training"][f"mfu_of_{precision}_peak"] = training_speed.utilisation(rate, flops, peak)
    results["training"]["achieved_gflops"] = rate * flops / 1e9


def run_keras(args, pipelines) -> dict:
    payload = json.dumps({"size": args.size, "batch_size": args.batch_size, "steps": args.keras_steps,
                          "folder": str(Path(args.data) / args.split), "pipelines": pipelines})
    completed = subprocess.run([args.keras_python, str(PROJECT / "benchmarks" / "keras_peers.py"), payload],
                               capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        return {"skipped": f"the Keras run failed: {completed.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def bench_keras(args, results, loop):
    """The tutorial's pipeline once; then ``--pairs`` interleaved pairs of (our loop, Keras tf.data bf16)."""
    keras = run_keras(args, ["tutorial"])
    results["keras"] = keras
    if "skipped" in keras:
        return
    tutorial = keras["tutorial"]
    tutorial["ratio_training_ours_to_keras"] = results["training"]["images_per_s"] / tutorial["training_images_per_s"]
    for key in inference_speed_keys(results):
        tutorial[f"ratio_inference_{key}_to_keras"] = (results[f"inference_{key}"]["images_per_s"]
                                                       / tutorial["predict_images_per_s"])
    pairs = []
    for _ in range(args.pairs):
        ours = statistics.median(loop.rate(args.steps) for _ in range(2))
        peer = run_keras(args, ["tfdata_bf16"]).get("tfdata_bf16", {})
        if "training_images_per_s" in peer:
            pairs.append({"ours": ours, "keras": peer["training_images_per_s"], "jit_compile": peer["jit_compile"],
                          "ratio": ours / peer["training_images_per_s"]})
    if pairs:
        results["keras"]["tfdata_bf16"] = {"pairs": pairs, "ratio_median": statistics.median(p["ratio"] for p in pairs),
                                           "keras_images_per_s_median": statistics.median(p["keras"] for p in pairs),
                                           "ours_images_per_s_median": statistics.median(p["ours"] for p in pairs)}


def inference_speed_keys(results) -> list[str]:
    return [key for key in (inference_speed.engine_key(e, a) for e, a in inference_speed.ENGINES)
            if "images_per_s" in results.get(f"inference_{key}", {})]


def bench_inference(args, results, pixels, checkpoint):
    """Engines on the benchmark's (untrained) checkpoint, int8 calibrated on the first cached images; with
    ``--checkpoint``, the trained one too, its int8 graph built from its own validation split. Every ONNX
    Runtime and torch measurement comes before the first OpenVINO one (``inference_speed.bench_engines``)."""
    cache = os.environ.get("PNEUMONIA_CNN_CACHE")
    results["int8_build"] = inference_speed.prepare_int8(checkpoint, args.data, calibration=pixels[:128])
    seed_cache = os.environ["PNEUMONIA_CNN_CACHE"]
    for key, value in inference_speed.bench_engines(checkpoint, pixels, args.batch_size, args.latency_runs).items():
        results[f"inference_{key}"] = value
    if args.checkpoint:
        inference_speed.prepare_int8(args.checkpoint, args.data)
        agreement, test_pixels = inference_speed.int8_agreement(args.checkpoint, args.data)
        trained_pixels = test_pixels[:args.batch_size * 8]
        results["int8_trained"] = {"checkpoint": args.checkpoint, **agreement, "engines": inference_speed.bench_engines(
            args.checkpoint, trained_pixels, args.batch_size, args.latency_runs)}
        try:
            results["int8_trained"]["openvino_int8"] = inference_speed.int8_agreement(
                args.checkpoint, args.data, "openvino-int8")[0]
            results["int8_trained"]["engines"].update(inference_speed.bench_engines(
                args.checkpoint, trained_pixels, args.batch_size, args.latency_runs, openvino=True))
        except Exception as error:  # openvino not installed
            results["int8_trained"]["openvino_int8"] = {"skipped": str(error)}
        results["int8_trained"]["alternating"] = {engine: inference_speed.alternating_processes(
            args.checkpoint, trained_pixels, args.batch_size, engines=("onnx", engine))
            for engine in ("onnx-int8", "openvino-int8")}
    os.environ["PNEUMONIA_CNN_CACHE"] = seed_cache
    for key, value in inference_speed.bench_engines(checkpoint, pixels, args.batch_size, args.latency_runs,
                                                    openvino=True).items():
        results[f"inference_{key}"] = value
    results["inference_alternating"] = {engine: inference_speed.alternating_processes(
        checkpoint, pixels, args.batch_size, engines=("onnx", engine)) for engine in ("onnx-int8", "openvino-int8")}
    if cache is None:  # as it was
        os.environ.pop("PNEUMONIA_CNN_CACHE", None)
    else:
        os.environ["PNEUMONIA_CNN_CACHE"] = cache


def make_checkpoint(args, folder) -> Path:
    """An untrained seed checkpoint with the benchmark's input size (speed does not depend on the weights)."""
    from pneumonia_cnn.checkpoint import save_checkpoint
    model = create_model(args.model, 3, (args.size, args.size))
    path = Path(folder) / "bench.pt"
    save_checkpoint({"model": {"name": args.model, "kwargs": model.model_kwargs}, "state_dict": model.state_dict(),
                     "preprocessing": {"size": [args.size, args.size], "channels": 3, "interpolation": "bilinear",
                                       "intensity": "none"},
                     "class_names": ["NORMAL", "PNEUMONIA"], "threshold": 0.5, "temperature": 1.0,
                     "run_id": "benchmark"}, path)
    return path


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    parser.add_argument("--split", default="train"), parser.add_argument("--model", default="seed")
    parser.add_argument("--size", type=int, default=224), parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, help="training learning rate (default: the tutorial's)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed training run")
    parser.add_argument("--repeats", type=int, default=5, help="timed training runs (median and spread)")
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (ours, Keras tf.data bf16) pairs")
    parser.add_argument("--latency-runs", type=int, default=50), parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--keras-steps", type=int, default=20), parser.add_argument("--ddp-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", help="training precision, as train's --amp (auto|off|bf16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train's --compile)")
    parser.add_argument("--checkpoint", help="a trained checkpoint: int8 agreement on --data's test split")
    parser.add_argument("--keras-python", default=sys.executable,
                        help="a Python that can import TensorFlow, for the Keras comparison")
    parser.add_argument("--only", default="training,inference,server,memory,distributed,keras,time_to_model")
    parser.add_argument("--time-to-model", default="fast", metavar="PRESETS",
                        help="presets timed from raw images to a checkpoint (comma-separated; e.g. best,fast)")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "results.json"))
    args = parser.parse_args()
    from pneumonia_cnn.training.config import PRESETS
    unknown = sorted(set(args.time_to_model.split(",")) - set(PRESETS))
    if unknown:  # refused before any benchmark runs, not after a quarter of an hour of them
        parser.error(f"--time-to-model: unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    return args


def main():
    args = parse_args()
    if not (Path(args.data) / args.split).is_dir():
        sys.exit(f"benchmark data not found: {Path(args.data) / args.split} (../shared is provided beside the project)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    only = set(args.only.split(","))
    results = {"device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or
               platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%F %T"),
               "load_average_start": os.getloadavg()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    else:
        results["malloc_keeps_freed_memory"] = keep_freed_memory_for_reuse()  # as train does on CPU
    folder = tempfile.mkdtemp()
    checkpoint = make_checkpoint(args, folder)
    pixels = bench_cache_and_pipeline(args, device, results)
    loop = None
    if only & {"training", "keras"}:
        bench_peaks(device, results, "before")
        loop = training_speed.LibraryLoop(args.data, device, **training_overrides(args))
        bench_training(args, device, results, loop)
        bench_peaks(device, results, "after")
        add_utilisation(results)
    if "inference" in only and device.type == "cpu":
        bench_inference(args, results, pixels, checkpoint)
    if "server" in only:
        system_speed.bench_server(args, checkpoint, results)
    if "memory" in only:
        system_speed.bench_streaming_memory(args, results)
    if "distributed" in only:
        system_speed.bench_distributed(args, results)
    if "keras" in only and loop is not None:
        bench_keras(args, results, loop)
    if "time_to_model" in only:
        system_speed.bench_time_to_model(args, results)
    results["load_average_end"] = os.getloadavg()[0]
    print_table(results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    from pneumonia_cnn.errors import PneumoniaCNNError
    try:
        main()
    except PneumoniaCNNError as error:  # unusable data or options: one line, as the CLI prints it
        sys.exit(f"error: {error}")
