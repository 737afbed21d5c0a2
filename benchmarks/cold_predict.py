"""Wall time of ``pneumonia-cnn predict IMAGE`` in a fresh process with the built-in model (issue 21's "one
image from a fresh install <= 2 s"): the installed console script, ``--runs`` times, median and spread; first
with an empty cache each time (as right after an install: the ONNX graph is exported), then with the cache."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
IMAGE = PROJECT / "src" / "pneumonia_cnn" / "builtin" / "examples" / "NORMAL_IM-0128-0001.jpeg"


def wall(command: list[str], fresh_cache: bool = False) -> float:
    with tempfile.TemporaryDirectory() as empty:
        env = dict(os.environ, PNEUMONIA_CNN_CACHE=empty) if fresh_cache else None
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--image", default=str(IMAGE))
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "cold_predict.json"))
    args = parser.parse_args()
    script = shutil.which("pneumonia-cnn", path=str(Path(sys.executable).parent)) or shutil.which("pneumonia-cnn")
    results = {}
    predict = [script, "predict", args.image]
    for label, command, fresh in (("predict, empty cache (first run)", predict, True),
                                  ("predict, later runs", predict, False),
                                  ("python -c 'import torch' (floor)", [sys.executable, "-c", "import torch"], False)):
        wall(command)  # the files in the page cache, as after an install
        times = [wall(command, fresh) for _ in range(args.runs)]
        results[label] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        print(f"{label:<36} median {statistics.median(times):.2f} s  (min {min(times):.2f}, max {max(times):.2f})")
    results["load_average_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
