"""An index-free 2 x 2 max-pool against torch's, on the seed model's first pool (issue 22: the pools' forward,
backward and gradient zeroing were ~44% of the training step on the AMX Xeon).

    python benchmarks/corner_pool.py [--batch 32] [--sittings 2] [--out benchmarks/corner_pool.json]

The candidate takes the maximum of the four strided corners, keeps which corner won as two boolean masks (the
first maximum in row-major order, torch's tie rule) instead of int64 indices, and its backward writes each
corner of the input gradient once (no zero fill). Its output and gradient are checked bit for bit against
``F.max_pool2d`` (with ReLU ties too, and at an odd size) before timing; in each sitting the fastest of 8 runs
after a warm-up counts.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


class CornerMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
        a, b = x[:, :, 0:h:2, 0:w:2], x[:, :, 0:h:2, 1:w:2]
        c, d = x[:, :, 1:h:2, 0:w:2], x[:, :, 1:h:2, 1:w:2]
        top_pair, bottom_pair = torch.maximum(a, b), torch.maximum(c, d)
        top = top_pair >= bottom_pair  # the maximum is in the top row (a tie goes to the first row)
        ctx.save_for_backward(top, torch.where(top, a >= b, c >= d))
        ctx.shape = x.shape
        return torch.maximum(top_pair, bottom_pair)

    @staticmethod
    def backward(ctx, grad):
        top, left = ctx.saved_tensors
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last)
        h, w = grad.shape[2] * 2, grad.shape[3] * 2
        out[:, :, h:], out[:, :, :, w:] = 0, 0  # rows and columns the pool never read (odd sizes)
        zero = grad.new_zeros(())
        top_grad = torch.where(top, grad, zero)
        bottom_grad = grad - top_grad
        out[:, :, 0:h:2, 0:w:2] = torch.where(left, top_grad, zero)
        out[:, :, 0:h:2, 1:w:2] = torch.where(left, zero, top_grad)
        out[:, :, 1:h:2, 0:w:2] = torch.where(left, bottom_grad, zero)
        out[:, :, 1:h:2, 1:w:2] = torch.where(left, zero, bottom_grad)
        return out


def forward_backward(pool, x, grad):
    x = x.detach().requires_grad_()
    y = pool(x)
    y.backward(grad)
    return y, x.grad


def fastest_ms(function, runs=8) -> float:
    function()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sittings", type=int, default=2, help="timings of both pools, one after the other")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "corner_pool.json")
    args = parser.parse_args()
    if args.batch < 1 or args.sittings < 1:
        parser.error("--batch and --sittings must be at least 1")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 32, 222, 222).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    pools = {"torch max_pool2d": lambda t: F.max_pool2d(t, 2), "corner masks": CornerMaxPool.apply}
    grad = torch.randn_like(F.max_pool2d(x, 2))
    odd = x[:2, :, :221, :221].contiguous(memory_format=torch.channels_last)
    for inputs in (x, torch.relu(x), odd):  # after a ReLU many windows tie at 0; an odd size leaves a row out
        pooled_grad = grad if inputs.shape == x.shape else torch.randn_like(F.max_pool2d(inputs, 2))
        expected = forward_backward(pools["torch max_pool2d"], inputs, pooled_grad)
        got = forward_backward(pools["corner masks"], inputs, pooled_grad)
        assert all(torch.equal(e, g) for e, g in zip(expected, got)), "the corner pool differs from torch's"
    result = {"input": list(x.shape), "dtype": "bfloat16", "memory_format": "channels_last",
              "threads": torch.get_num_threads(), "bit_for_bit": True, "sittings": []}
    for _ in range(args.sittings):
        sitting = {}
        for name, pool in pools.items():
            sitting[name] = {"forward_ms": fastest_ms(lambda pool=pool: pool(x)),
                             "forward_backward_ms": fastest_ms(lambda pool=pool: forward_backward(pool, x, grad))}
            print(f"{name}: forward {sitting[name]['forward_ms']:.1f} ms, forward + backward "
                  f"{sitting[name]['forward_backward_ms']:.1f} ms")
        result["sittings"].append(sitting)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
