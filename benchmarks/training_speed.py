"""Training speed of the library's own loop, with the machine's peak measured in the same run.

``library_training_rates`` builds the run exactly as ``pneumonia-cnn train`` does (``training.start_run``) and
times ``training.loop.train_one_epoch``, which calls ``training.train_step`` on the loader's batches: the step,
the loader thread, augmentation and the optimiser of the library, not a copy. ``model_flops_per_image`` counts
the model's forward and backward FLOPs with ``torch.utils.flop_counter.FlopCounterMode``; ``matmul_peak``
measures the GFLOP/s a large matrix product reaches on this machine in the same run, the denominator of the
model FLOP utilisation (MFU).
"""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from pneumonia_cnn.models import create_model
from pneumonia_cnn.signals import StopSignals
from pneumonia_cnn.training import make_config, start_run
from pneumonia_cnn.training.loop import train_one_epoch


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 4096, seconds: float = 2.0) -> float:
    """GFLOP/s of a size x size matrix product in ``dtype`` (the median of repeats, random operands)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    for _ in range(2):
        a @ b
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def model_flops_per_image(model_name: str, channels: int, size: int) -> dict:
    """Forward and forward+backward FLOPs of one training image (what the step computes; the first
    convolution's input gradient is not computed, so it is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = create_model(model_name, channels, (size, size))
    x = torch.rand(2, channels, size, size)
    with FlopCounterMode(display=False) as forward_counter:
        with torch.no_grad():
            model(x)
    with FlopCounterMode(display=False) as train_counter:
        model(x).sum().backward()
    return {"forward": forward_counter.get_total_flops() / 2, "training": train_counter.get_total_flops() / 2}


class LibraryLoop:
    """The run that ``pneumonia-cnn train`` builds (``training.start_run``; the tutorial preset unless
    ``overrides`` say otherwise), timed through the library's own epoch loop (``train_one_epoch``, which calls
    ``train_step`` on the loader's batches)."""

    def __init__(self, data: str, device: torch.device, cache_dir: str | None = None, **overrides):
        out = tempfile.mkdtemp(prefix="pcnn-bench-out-")
        cache = cache_dir or tempfile.mkdtemp(prefix="pcnn-bench-cache-")
        self.config = make_config("tutorial", data=data, out=out, cache_dir=cache, device=str(device),
                                  progress=False, ood=False, evaluate_test=False, tracker="none", **overrides)
        self.run, self.device, self.chunks = start_run(self.config), device, 0
        self.stop = StopSignals()  # never entered: nothing stops a timed run
        self.rate(3)  # warm-up: oneDNN/cuDNN kernel choice, allocator, the loader thread

    def rate(self, steps: int) -> float:
        """Images/s of ``steps`` steps, from a fresh shuffle; ends with a host read of the summed loss."""
        self.run.loader.max_batches = steps
        self.chunks += 1
        self.run.state.epoch, self.run.state.step_in_epoch = self.chunks, 0  # nothing skipped
        _sync(self.device)
        start, before = time.perf_counter(), self.run.state.sums.count
        train_one_epoch(self.run, self.stop)
        # the images the steps took: an epoch may hold fewer than ``steps`` batches (large batches, small folder)
        return (self.run.state.sums.count - before) / (time.perf_counter() - start)

    def describe(self) -> dict:
        run = self.run
        return {"model": self.config.model, "size": self.config.size, "batch_size": self.config.batch_size,
                "lr": self.config.lr, "amp": self.config.amp,
                "precision": str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "float32"}


def library_training_rates(data: str, device: torch.device, steps: int, repeats: int, **overrides) -> dict:
    """``repeats`` timings of ``steps`` steps of the library loop: median, every run and the spread."""
    loop = LibraryLoop(data, device, **overrides)
    rates = [loop.rate(steps) for _ in range(repeats)]
    return {"images_per_s": statistics.median(rates), "runs": rates, "steps": steps,
            "spread": (max(rates) - min(rates)) / statistics.median(rates), **loop.describe()}


def utilisation(rate: float, flops_per_image: float, peak_gflops: float) -> float:
    return rate * flops_per_image / 1e9 / peak_gflops


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
