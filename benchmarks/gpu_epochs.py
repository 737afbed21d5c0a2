"""Whole epochs of ``train`` on the GPU over a training folder of ``--copies`` x the shared train images
(symbolic links under new names), so that each epoch's fixed cost (shuffle, loader start, validation) is
amortised as on a real-size dataset. Run by benchmarks/gpu.sh after gpu_train.py; writes one JSON."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))
sys.path.insert(0, str(PROJECT / "benchmarks"))

import gpu_train  # noqa: E402


def replicated(data: Path, copies: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="pcnn-gpu-copies-"))
    for split in ("train", "val", "test"):
        for folder in (data / split).iterdir():
            target = root / split / folder.name
            target.mkdir(parents=True)
            for path in folder.iterdir():
                for copy in range(copies if split == "train" else 1):
                    (target / f"c{copy}_{path.name}").symlink_to(path.resolve())
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True), parser.add_argument("--out", required=True)
    parser.add_argument("--copies", type=int, default=8), parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=[], help="train overrides as JSON, one per variant")
    args = parser.parse_args()
    root = replicated(Path(args.data), args.copies)
    cache = tempfile.mkdtemp(prefix="pcnn-gpu-cache-")
    rows = []
    variants = [json.loads(v) for v in args.variants] or [{"batch_size": 1024, "cuda_graph": True},
                                                          {"batch_size": 256, "cuda_graph": True}]
    for overrides in variants:
        row = gpu_train.whole_epochs(str(root), cache, overrides, args.epochs, "cuda")
        print(row, flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"copies": args.copies, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
