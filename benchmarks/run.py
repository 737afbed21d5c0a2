"""Speed and memory of pneumonia-cnn on this machine: prints a table and writes JSON.

    python benchmarks/run.py                      # everything, on ../shared/data/chest_xray_224/train
    python benchmarks/run.py --only inference --steps 20
    python benchmarks/run.py --device cuda --epochs 4   # also whole epochs of the train command

Sections: cache (first vs later epoch), data pipeline alone, training steady state, inference (batch and
single-image latency) with the torch (float32 and bf16) and the ONNX Runtime engines, HTTP server under 16
concurrent clients, cache streaming memory at 5k vs 50k images, 1 vs 2 data-parallel processes, and the
tutorial's own Keras pipeline when TensorFlow is importable (ratios measured in the same run).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn.data.augment import AugmentConfig, augment_batch  # noqa: E402
from pneumonia_cnn.data.cache import build_or_load  # noqa: E402
from pneumonia_cnn.data.dataset import scan_folder  # noqa: E402
from pneumonia_cnn.data.loader import BatchLoader, to_model_input  # noqa: E402
from pneumonia_cnn.device import autocast, autocast_dtype, keep_freed_memory_for_reuse  # noqa: E402
from pneumonia_cnn.models import create_model  # noqa: E402
from pneumonia_cnn.training import make_config, make_optimizer  # noqa: E402

TUTORIAL_AUGMENT = AugmentConfig(shear=0.2, zoom=0.2, flip=True)
INFERENCE_VARIANTS = (("torch", "off"), ("onnx", "off"), ("torch", "bf16"))  # predict's --engine, --amp
INFERENCE_KEYS = tuple(engine if amp == "off" else f"{engine}_{amp}" for engine, amp in INFERENCE_VARIANTS)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_breakdown_mb() -> dict:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon", "RssFile", "VmRSS")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) / 1024
    return values


def train_steps(model, loader, optimizer, device, steps, amp_dtype, warmup=3, channels_last=True):
    """Images/s over ``steps`` batches after ``warmup``: loader -> augmentation -> forward/backward/step,
    with the optimizer and precision that ``train`` chooses."""
    generator = torch.Generator().manual_seed(0)
    model.train()
    seen, start = 0, None
    iterator = iter(loader)
    for index in range(warmup + steps):
        try:
            pixels, labels, _ = next(iterator)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            iterator = iter(loader)
            pixels, labels, _ = next(iterator)
        if index == warmup:
            start = time.perf_counter()
        x = augment_batch(to_model_input(pixels, device), TUTORIAL_AUGMENT, generator).expand(-1, 3, -1, -1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(x).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index >= warmup:
            seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bench_cache_and_training(args, device, results):
    images = scan_folder(Path(args.data) / args.split)
    if args.limit:
        images = images.subset(range(min(args.limit, len(images))))
    size = (args.size, args.size)
    cache_dir = Path(tempfile.mkdtemp(prefix="pcnn-bench-"))
    try:
        start = time.perf_counter()
        cached = build_or_load(images, size, cache_dir=cache_dir)
        cache_seconds = time.perf_counter() - start
        start = time.perf_counter()
        build_or_load(images, size, cache_dir=cache_dir)
        reuse_seconds = time.perf_counter() - start
        results["cache"] = {"images": len(cached), "build_seconds": cache_seconds,
                            "decode_images_per_s": len(cached) / cache_seconds, "reuse_seconds": reuse_seconds}

        loader = BatchLoader(cached.images, cached.labels, args.batch_size, shuffle=True, augment=TUTORIAL_AUGMENT)
        generator = torch.Generator().manual_seed(0)
        start, seen = time.perf_counter(), 0
        for pixels, _, _ in loader:
            augment_batch(to_model_input(pixels, device), TUTORIAL_AUGMENT, generator)
            seen += len(pixels)
        results["data_pipeline"] = {"images_per_s": seen / (time.perf_counter() - start)}

        model = create_model(args.model, 3, size).to(device).to(memory_format=torch.channels_last)
        optimizer = make_optimizer(make_config("tutorial"), model)
        amp_dtype = autocast_dtype(device, args.amp)
        rate = train_steps(model, loader, optimizer, device, args.steps, amp_dtype)
        results["training"] = {"model": args.model, "size": args.size, "batch_size": args.batch_size,
                               "images_per_s": rate, "steps": args.steps,
                               "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"}
        epoch_seconds = len(cached) / rate
        results["epochs"] = {"first_epoch_seconds": cache_seconds + epoch_seconds, "later_epoch_seconds": epoch_seconds,
                             "ratio_first_to_later": (cache_seconds + epoch_seconds) / epoch_seconds,
                             "note": "first = decode into the cache + one training epoch; later = one epoch from "
                                     "the cache (training steady state x images)"}
        results["data_pipeline"]["ratio_to_training"] = results["data_pipeline"]["images_per_s"] / rate
        results["peak_rss_mb_after_training"] = peak_rss_mb()
        return cached
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def bench_training_run(args, device, results):
    """Whole epochs through the library's ``train`` (what ``pneumonia-cnn train`` runs): the tutorial preset
    on ``--data``'s train split, a fresh cache, validation after each epoch. First epoch = cache build (decode
    of train and val) + epoch 1; later = mean of the other epochs (training only; validation timed apart)."""
    from pneumonia_cnn.training import prepare_data, setup_distributed, train
    cache_dir = tempfile.mkdtemp(prefix="pcnn-bench-run-")
    out = tempfile.mkdtemp(prefix="pcnn-bench-out-")
    try:
        config = make_config("tutorial", data=args.data, out=out, model=args.model, size=args.size,
                             batch_size=args.batch_size, epochs=args.epochs, device=str(device), amp=args.amp,
                             compile=args.compile, cache_dir=cache_dir, limit_images=args.limit, progress=False,
                             ood=False, evaluate_test=False, min_val_images=0)
        start = time.perf_counter()
        train_set, _ = prepare_data(config, setup_distributed(config.device))
        cache_seconds = time.perf_counter() - start
        start = time.perf_counter()
        history = train(config)["history"]
        wall = time.perf_counter() - start
        epochs = [row["seconds"] for row in history]
        later = float(np.mean(epochs[1:])) if len(epochs) > 1 else epochs[0]
        results["training_run"] = {
            "images": len(train_set), "epochs": len(epochs), "epoch_seconds": epochs,
            "cache_build_seconds": cache_seconds, "first_epoch_seconds": cache_seconds + epochs[0],
            "later_epoch_seconds": later, "images_per_s_later": len(train_set) / later,
            "ratio_first_to_later": (cache_seconds + epochs[0]) / later, "compile": args.compile,
            "validation_and_checkpoints_seconds": wall - sum(epochs), "val_auc_last": history[-1].get("val_auc")}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def bench_inference(args, device, cached, results, checkpoint):
    """Batch throughput and single-image latency through ``Predictor``: torch and ONNX engines, torch in bf16."""
    from pneumonia_cnn.inference import Predictor
    batch = np.array(cached.images[: args.batch_size * 8])
    one = batch[:1]
    for (engine, amp), name in zip(INFERENCE_VARIANTS, INFERENCE_KEYS):
        key = f"inference_{name}"
        try:
            predictor = Predictor(checkpoint, str(device), amp=amp, engine=engine)
        except Exception as error:  # onnxruntime missing
            results[key] = {"skipped": str(error)}
            continue
        predictor.predict_arrays(batch[: args.batch_size], args.batch_size)
        start = time.perf_counter()
        predictor.predict_arrays(batch, args.batch_size)
        throughput = len(batch) / (time.perf_counter() - start)
        for _ in range(5):
            predictor.probabilities_from_pixels(one)
        latencies = []
        for _ in range(args.latency_runs):
            start = time.perf_counter()
            predictor.probabilities_from_pixels(one)
            latencies.append((time.perf_counter() - start) * 1000)
        results[key] = {"images_per_s": throughput, "batch_size": args.batch_size,
                                          "single_image_ms_p50": float(np.percentile(latencies, 50)),
                                          "single_image_ms_p95": float(np.percentile(latencies, 95))}
    results["inference"] = results["inference_torch"]


def make_checkpoint(args, folder) -> Path:
    """An untrained seed checkpoint with the benchmark's input size (speed does not depend on the weights)."""
    from pneumonia_cnn.checkpoint import save_checkpoint
    model = create_model(args.model, 3, (args.size, args.size))
    path = Path(folder) / "bench.pt"
    save_checkpoint({"model": {"name": args.model, "kwargs": model.model_kwargs},
                     "state_dict": model.state_dict(),
                     "preprocessing": {"size": [args.size, args.size], "channels": 3, "interpolation": "bilinear",
                                       "intensity": "none"},
                     "class_names": ["NORMAL", "PNEUMONIA"], "threshold": 0.5, "temperature": 1.0,
                     "run_id": "benchmark"}, path)
    return path


def bench_server(args, checkpoint, results):
    import httpx
    sys.path.insert(0, str(PROJECT))
    from tests.serving.conftest import start_server
    files = sorted((Path(args.data) / args.split / "PNEUMONIA").iterdir())[:32]
    payloads = [(f.name, f.read_bytes()) for f in files]
    process, url = start_server(checkpoint)
    try:
        async def run():
            latencies = []
            async with httpx.AsyncClient(timeout=60) as client:
                queue = list(range(args.requests))

                async def worker():
                    while queue:
                        i = queue.pop()
                        name, data = payloads[i % len(payloads)]
                        start = time.perf_counter()
                        response = await client.post(f"{url}/predict", files={"file": (name, data)})
                        latencies.append((time.perf_counter() - start) * 1000)
                        assert response.status_code == 200, response.text
                for _ in range(3):  # warm-up
                    await client.post(f"{url}/predict", files={"file": payloads[0]})
                start = time.perf_counter()
                await asyncio.gather(*[worker() for _ in range(16)])
                return args.requests / (time.perf_counter() - start), latencies
        rate, latencies = asyncio.run(run())
        results["server"] = {"requests_per_s": rate, "concurrency": 16, "requests": args.requests,
                             "p50_ms": float(np.percentile(latencies, 50)), "p95_ms": float(np.percentile(latencies, 95))}
    finally:
        process.terminate()
        process.wait(timeout=10)


def bench_streaming_memory(args, results):
    """Anonymous memory while streaming one epoch of batches from caches of 5k and 50k images (64x64)."""
    code = r"""
import sys, json, numpy as np, tempfile, os
sys.path.insert(0, sys.argv[2])
from pneumonia_cnn.data.loader import BatchLoader
n = int(sys.argv[1]); side = 64
path = os.path.join(tempfile.mkdtemp(), "images.u8")
array = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, side, side))
for i in range(0, n, 5000):
    array[i:i + 5000] = np.random.default_rng(i).integers(0, 256, (min(5000, n - i), side, side), dtype=np.uint8)
array.flush(); del array
images = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, side, side))
labels = np.zeros(n, dtype=np.int64)
def status():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile", "VmHWM")):
            k, v = line.split(":"); out[k] = int(v.split()[0]) / 1024
    return out
before = status()
for pixels, _, _ in BatchLoader(images, labels, 64, shuffle=True):
    pass
after = status()
print(json.dumps({"images": n, "anon_mb_before": before["RssAnon"], "anon_mb_after": after["RssAnon"],
                  "file_backed_mb_after": after["RssFile"], "peak_rss_mb": after["VmHWM"]}))
os.unlink(path)
"""
    rows = []
    for count in (5000, 50000):
        output = subprocess.run([sys.executable, "-c", code, str(count), str(PROJECT / "src")], capture_output=True,
                                text=True, check=True).stdout
        rows.append(json.loads(output))
    results["streaming_memory"] = rows


def bench_distributed(args, results):
    """Same global batch: 1 process x batch B vs 2 Gloo processes x batch B/2 (steady-state images/s)."""
    code = r"""
import os, sys, time, json, torch, numpy as np
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from pneumonia_cnn.models import create_model
world = int(os.environ.get("WORLD_SIZE", "1")); rank = int(os.environ.get("RANK", "0"))
torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
if world > 1:
    dist.init_process_group("gloo")
model = create_model(sys.argv[2], 3, (int(sys.argv[3]),) * 2)
if world > 1:
    model = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.Adam(model.parameters())
batch = int(sys.argv[4]) // world
x = torch.rand(batch, 1, int(sys.argv[3]), int(sys.argv[3])); y = torch.ones(batch)
for i in range(13):
    if i == 3: start = time.perf_counter()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
rate = 10 * batch * world / (time.perf_counter() - start)
if rank == 0: print(json.dumps({"processes": world, "images_per_s": rate}))
if world > 1: dist.destroy_process_group()
"""
    script = Path(tempfile.mkdtemp()) / "ddp_bench.py"
    script.write_text(code)
    rows = []
    for processes in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-port", str(29500 + processes), str(script), str(PROJECT / "src"), args.model,
                   str(args.ddp_size), str(args.batch_size)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    rows[1]["scaling_efficiency"] = rows[1]["images_per_s"] / (2 * rows[0]["images_per_s"])
    results["distributed"] = {"model": args.model, "size": args.ddp_size, "global_batch": args.batch_size,
                              "runs": rows}


KERAS_SCRIPT = r"""
import json, sys, time
args = json.loads(sys.argv[1])
try:
    import tensorflow as tf
    from tensorflow import keras
    try:
        from keras.preprocessing.image import ImageDataGenerator
    except ImportError:  # Keras 3 keeps the tutorial's generator in its legacy module
        from keras.src.legacy.preprocessing.image import ImageDataGenerator
except ImportError as error:
    print(json.dumps({"skipped": f"TensorFlow is not importable ({error})"})); sys.exit(0)
size, batch, steps, folder = args["size"], args["batch_size"], args["steps"], args["folder"]
generator = ImageDataGenerator(rescale=1 / 255, shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
flow = generator.flow_from_directory(folder, target_size=(size, size), batch_size=batch, class_mode="binary")
layers = keras.layers
model = keras.Sequential([keras.Input((size, size, 3)), layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(2),
                          layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(2),
                          layers.Conv2D(128, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
                          layers.Dense(128, activation="relu"), layers.Dense(1, activation="sigmoid")])
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
model.fit(flow, steps_per_epoch=2, epochs=1, verbose=0)
start = time.perf_counter()
model.fit(flow, steps_per_epoch=steps, epochs=1, verbose=0)
train_rate = steps * batch / (time.perf_counter() - start)
plain = ImageDataGenerator(rescale=1 / 255).flow_from_directory(folder, target_size=(size, size), batch_size=batch,
                                                                class_mode="binary", shuffle=False)
model.predict(plain, steps=2, verbose=0)
start = time.perf_counter()
model.predict(plain, steps=steps, verbose=0)
predict_rate = steps * batch / (time.perf_counter() - start)
print(json.dumps({"training_images_per_s": train_rate, "predict_images_per_s": predict_rate,
                  "tensorflow": tf.__version__, "keras": keras.__version__}))
"""


def bench_keras(args, results):
    """The tutorial's own pipeline: ImageDataGenerator.flow_from_directory + the same Sequential model, run
    by ``--keras-python`` (a Python with TensorFlow, e.g. a separate venv) in the same benchmark run."""
    payload = json.dumps({"size": args.size, "batch_size": args.batch_size, "steps": args.keras_steps,
                          "folder": str(Path(args.data) / args.split)})
    completed = subprocess.run([args.keras_python, "-c", KERAS_SCRIPT, payload], capture_output=True, text=True,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        results["keras"] = {"skipped": f"the Keras run failed: {completed.stderr.strip().splitlines()[-1:]}"}
        return
    keras = json.loads(lines[-1])
    if "skipped" not in keras:
        keras["ratio_training_ours_to_keras"] = results["training"]["images_per_s"] / keras["training_images_per_s"]
        for engine in INFERENCE_KEYS:
            if "images_per_s" in results.get(f"inference_{engine}", {}):
                keras[f"ratio_inference_{engine}_to_keras"] = (results[f"inference_{engine}"]["images_per_s"]
                                                               / keras["predict_images_per_s"])
    results["keras"] = keras


def print_table(results):
    rows = [("device", f"{results['device']} ({results['threads']} threads, {results['cpu']})")]
    if "cache" in results:
        c = results["cache"]
        rows += [("cache build (decode, all cores)", f"{c['build_seconds']:.1f} s for {c['images']} images "
                                                     f"({c['decode_images_per_s']:.0f} img/s); reuse {c['reuse_seconds']:.2f} s")]
    if "data_pipeline" in results:
        d = results["data_pipeline"]
        rows.append(("data pipeline alone (cache + augmentation)", f"{d['images_per_s']:.0f} img/s "
                                                                  f"({d.get('ratio_to_training', 0):.0f}x training)"))
    if "training" in results:
        t = results["training"]
        rows.append((f"training {t['model']} {t['size']}x{t['size']} batch {t['batch_size']} {t.get('precision', '')}",
                     f"{t['images_per_s']:.1f} img/s"))
    if "epochs" in results:
        e = results["epochs"]
        rows.append(("first epoch / later epoch", f"{e['first_epoch_seconds']:.0f} s / {e['later_epoch_seconds']:.0f} s "
                                                  f"(x{e['ratio_first_to_later']:.2f})"))
    if "training_run" in results:
        r = results["training_run"]
        rows.append((f"train command, {r['images']} images x {r['epochs']} epochs",
                     f"first {r['first_epoch_seconds']:.1f} s (cache {r['cache_build_seconds']:.1f} s), later "
                     f"{r['later_epoch_seconds']:.1f} s/epoch ({r['images_per_s_later']:.0f} img/s)"))
    if "peak_rss_mb_after_training" in results:
        rows.append(("peak resident memory (training)", f"{results['peak_rss_mb_after_training']:.0f} MB"))
    for engine in INFERENCE_KEYS:
        i = results.get(f"inference_{engine}")
        if i and "images_per_s" in i:
            rows += [(f"inference batch {i['batch_size']} ({engine} engine)", f"{i['images_per_s']:.1f} img/s"),
                     (f"single image latency p50 / p95 ({engine})",
                      f"{i['single_image_ms_p50']:.1f} / {i['single_image_ms_p95']:.1f} ms")]
    if "server" in results:
        s = results["server"]
        rows.append(("server /predict, 16 concurrent", f"{s['requests_per_s']:.1f} req/s, p50 {s['p50_ms']:.0f} ms, "
                                                       f"p95 {s['p95_ms']:.0f} ms"))
    for row in results.get("streaming_memory", []):
        rows.append((f"streaming {row['images']:,} cached images", f"anonymous {row['anon_mb_after']:.0f} MB "
                                                                   f"(file-backed, reclaimable {row['file_backed_mb_after']:.0f} MB)"))
    if "distributed" in results:
        runs = results["distributed"]["runs"]
        rows.append(("data parallel 1 vs 2 processes (Gloo)", f"{runs[0]['images_per_s']:.1f} vs {runs[1]['images_per_s']:.1f} "
                                                               f"img/s (efficiency {runs[1]['scaling_efficiency']:.0%})"))
    if "keras" in results:
        k = results["keras"]
        rows.append(("Keras tutorial pipeline", k.get("skipped") or
                     f"train {k['training_images_per_s']:.1f} img/s, predict {k['predict_images_per_s']:.1f} img/s; "
                     f"ours/Keras x{k['ratio_training_ours_to_keras']:.2f} train, inference x{k.get('ratio_inference_torch_to_keras', 0):.2f} "
                     f"(torch), x{k.get('ratio_inference_onnx_to_keras', 0):.2f} (onnx), "
                     f"x{k.get('ratio_inference_torch_bf16_to_keras', 0):.2f} (torch bf16)"))
    width = max(len(r[0]) for r in rows) + 2
    print("\n".join(f"{name:<{width}}{value}" for name, value in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    parser.add_argument("--split", default="train"), parser.add_argument("--model", default="seed")
    parser.add_argument("--size", type=int, default=224), parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images")
    parser.add_argument("--latency-runs", type=int, default=50), parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--keras-steps", type=int, default=10), parser.add_argument("--ddp-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", help="training precision, as train's --amp (auto|off|bf16|fp16)")
    parser.add_argument("--keras-python", default=sys.executable,
                        help="a Python that can import TensorFlow, for the Keras comparison")
    parser.add_argument("--epochs", type=int, default=0,
                        help="also time this many whole epochs of the train command (0: skip)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in the --epochs run")
    parser.add_argument("--only", default="cache,inference,server,memory,distributed,keras")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "results.json"))
    args = parser.parse_args()
    if not (Path(args.data) / args.split).is_dir():
        sys.exit(f"benchmark data not found: {Path(args.data) / args.split} (../shared is provided beside the project)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    only = set(args.only.split(","))
    results = {"device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True  # as train does on CUDA
    else:
        results["malloc_keeps_freed_memory"] = keep_freed_memory_for_reuse()  # as train does on CPU
    folder = tempfile.mkdtemp()
    checkpoint = make_checkpoint(args, folder)
    cached = bench_cache_and_training(args, device, results)
    if args.epochs:
        bench_training_run(args, device, results)
    if "inference" in only:
        bench_inference(args, device, cached, results, checkpoint)
    if "server" in only:
        bench_server(args, checkpoint, results)
    if "memory" in only:
        bench_streaming_memory(args, results)
    if "distributed" in only:
        bench_distributed(args, results)
    if "keras" in only:
        bench_keras(args, results)
    print_table(results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
