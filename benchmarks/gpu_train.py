"""GPU training speed of the seed model (issue 22 item 5), run by benchmarks/gpu.sh on a lent GPU.

1. Checks, on the GPU: the graphed step (``--cuda-graph``) takes the eager step's steps; the device-resident
   loader yields the host loader's batches.
2. The library's loop (``LibraryLoop``: ``start_run`` + ``train_one_epoch``), tutorial preset, seed 224x224,
   bf16, for several variants (batch size, CUDA graph, compile), each timed ``--repeats`` times; the GPU's
   utilisation sampled by ``nvidia-smi`` while each runs; model FLOP utilisation against a bf16 matrix product
   measured in the same run.
3. Whole epochs of ``train`` (what ``pneumonia-cnn train`` runs) with the fastest variant.

Every part is guarded: a failure is recorded and the rest still runs. Writes one JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))
sys.path.insert(0, str(PROJECT / "benchmarks"))

import torch  # noqa: E402
import training_speed  # noqa: E402

VARIANTS = [  # name, overrides; learning rates scaled with the square root of the batch (Adam)
    ("b32 eager", {"batch_size": 32}),
    ("b256 eager", {"batch_size": 256, "lr": 1e-3 * 8 ** 0.5}),
    ("b256 graph", {"batch_size": 256, "lr": 1e-3 * 8 ** 0.5, "cuda_graph": True}),
    ("b512 graph", {"batch_size": 512, "lr": 1e-3 * 16 ** 0.5, "cuda_graph": True}),
    ("b1024 graph", {"batch_size": 1024, "lr": 1e-3 * 32 ** 0.5, "cuda_graph": True}),
    ("b512 graph compiled", {"batch_size": 512, "lr": 1e-3 * 16 ** 0.5, "cuda_graph": True, "compile": True}),
]


class Utilisation:
    """nvidia-smi's GPU utilisation (percent of time a kernel ran) and memory, sampled every 100 ms."""

    def __init__(self):
        self.samples, self.process = [], None

    def __enter__(self):
        try:
            self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                             "--format=csv,noheader,nounits", "-lms", "100"],
                                            stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        except OSError:
            self.process = None
        return self

    def _read(self):
        for line in self.process.stdout:
            try:
                self.samples.append([float(v) for v in line.split(",")])
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=5)

    def summary(self) -> dict:
        busy = [s[0] for s in self.samples]
        return {"gpu_utilisation_percent_median": statistics.median(busy) if busy else None,
                "memory_used_mib_max": max((s[1] for s in self.samples), default=None), "samples": len(busy)}


def graphed_equals_eager(optimizer_name: str, device: str) -> float:
    """5 steps of the graphed step and of the eager step from the same weights (tests/test_speed_paths.py's
    check, without pytest): the largest weight difference relative to the tensor's largest value."""
    import copy

    import torch.nn.functional as F

    from pneumonia_cnn.models import create_model
    from pneumonia_cnn.training import make_config, make_optimizer
    from pneumonia_cnn.training.graphed import GraphedStep
    torch.backends.cudnn.deterministic, benchmark = True, torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    model = create_model("seed", 3, (48, 48)).to(device).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    config = make_config("tutorial", optimizer=optimizer_name, weight_decay=0.01 if optimizer_name == "adamw" else 0)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(6, 3, 48, 48, generator=generator).to(device).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 2, (6,), generator=generator).float().to(device)) for _ in range(5)]
    rates = [2.0 ** -10, 2.0 ** -11, 2.0 ** -12, 2.0 ** -11, 2.0 ** -13]
    eager, graphed = make_optimizer(config, model), make_optimizer(config, twin)
    step = GraphedStep(twin, twin, graphed, None, None, batches[0][0].shape, torch.device(device))
    for (x, target), lr in zip(batches, rates):
        for group in eager.param_groups + graphed.param_groups:
            group["lr"] = lr
        loss = F.binary_cross_entropy_with_logits(model(x).float(), target)
        eager.zero_grad(set_to_none=True)
        loss.backward()
        eager.step()
        step.step(x, target)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, benchmark
    return max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))
               for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def device_loader_equals_host_loader(device: str) -> bool:
    import numpy as np

    from pneumonia_cnn.data.loader import BatchLoader, DeviceBatchLoader
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (37, 8, 8), dtype=np.uint8), rng.integers(0, 2, 37)
    host = BatchLoader(images, labels, 8, shuffle=True, seed=3)
    on_device = DeviceBatchLoader(images, labels, 8, device, shuffle=True, seed=3)
    pairs = list(zip(host, on_device))
    return len(pairs) == 5 and all(torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu()) for a, b in pairs)


def check_paths(log, device: str) -> dict:
    results = {}
    checks = (("graphed_vs_eager_adam_max_relative_difference", lambda: graphed_equals_eager("adam", device)),
              ("graphed_vs_eager_adamw_max_relative_difference", lambda: graphed_equals_eager("adamw", device)),
              ("device_loader_equals_host_loader", lambda: device_loader_equals_host_loader(device)))
    for name, call in checks:
        try:
            results[name] = call()
        except Exception:
            results[name] = "FAILED: " + traceback.format_exc(limit=4)
        log(f"check {name}: {str(results[name])[:300]}")
    return results


def time_variant(data, cache, name, overrides, steps, repeats, flops, peak, device) -> dict:
    with Utilisation() as utilisation:
        loop = training_speed.LibraryLoop(data, torch.device(device), cache_dir=cache, **overrides)
        rates = [loop.rate(steps) for _ in range(repeats)]
    rate = statistics.median(rates)
    return {"variant": name, "overrides": overrides, "images_per_s": rate, "runs": rates,
            "mfu_of_bf16_peak": training_speed.utilisation(rate, flops, peak),
            "step_ms": 1000 * loop.config.batch_size / rate, **utilisation.summary(), **loop.describe()}


def whole_epochs(data, cache, overrides, epochs, device) -> dict:
    """``train`` itself: epoch seconds from its history (validation and checkpoints apart)."""
    from pneumonia_cnn.training import make_config, train
    config = make_config("tutorial", data=data, out=tempfile.mkdtemp(), cache_dir=cache, device=device,
                         epochs=epochs, progress=False, ood=False, evaluate_test=False, **overrides)
    start = time.perf_counter()
    history = train(config)["history"]
    seconds = [row["seconds"] for row in history]
    images = len(list((Path(data) / "train").rglob("*.*")))
    return {"overrides": overrides, "epoch_seconds": seconds, "wall_seconds": time.perf_counter() - start,
            "images_per_s_later_epochs": images / statistics.mean(seconds[1:]) if len(seconds) > 1 else None,
            "val_auc": [row.get("val_auc") for row in history]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True), parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=40), parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--budget", type=float, default=330, help="seconds after which no new variant starts")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--variants", nargs="*", help="only these variants (names)")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
    start, results = time.perf_counter(), {"gpu": gpu, "torch": torch.__version__}

    def log(text):
        print(f"[{time.perf_counter() - start:6.1f}s] {text}", flush=True)

    def save():
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")

    results["checks"] = check_paths(log, args.device)
    flops = training_speed.model_flops_per_image("seed", 3, 224)["training"]
    size = 8192 if args.device == "cuda" else 1024
    results["peak_gflops"] = {"bfloat16": training_speed.matmul_peak(torch.bfloat16, torch.device(args.device), size),
                              "float32": training_speed.matmul_peak(torch.float32, torch.device(args.device), size)}
    results["model_flops_per_image"], results["variants"] = flops, []
    log(f"peaks {results['peak_gflops']}, {flops / 1e9:.2f} GFLOP per training image")
    cache = tempfile.mkdtemp(prefix="pcnn-gpu-cache-")
    for name, overrides in VARIANTS:
        if args.variants and name not in args.variants:
            continue
        if time.perf_counter() - start > args.budget:
            results["variants"].append({"variant": name, "skipped": "time budget"})
            continue
        try:
            row = time_variant(args.data, cache, name, overrides, args.steps, args.repeats, flops,
                               results["peak_gflops"]["bfloat16"], args.device)
            log(f"{name}: {row['images_per_s']:.0f} img/s, MFU {row['mfu_of_bf16_peak']:.1%}, "
                f"GPU busy {row['gpu_utilisation_percent_median']}%")
        except Exception:
            row = {"variant": name, "error": traceback.format_exc(limit=5)}
            log(f"{name}: FAILED {row['error'][-300:]}")
        results["variants"].append(row)
        save()
    timed = [v for v in results["variants"] if "images_per_s" in v and not v["overrides"].get("compile")]
    if timed:
        best = max(timed, key=lambda v: v["images_per_s"])
        try:
            results["train_command"] = whole_epochs(args.data, cache, best["overrides"], args.epochs, args.device)
            log(f"train command with {best['variant']}: {results['train_command']['epoch_seconds']}")
        except Exception:
            results["train_command"] = {"error": traceback.format_exc(limit=5)}
    save()
    log(f"written {args.out}")


if __name__ == "__main__":
    main()
