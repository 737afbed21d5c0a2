"""Time to a validated model: what ``pneumonia-cnn train`` runs (``experiment.train_and_evaluate``: decode into
a fresh cache, train, validate every epoch, fit calibration, threshold and the OOD detector, score the test
split), with the validation ROC AUC recorded against wall-clock seconds as each epoch's row is written, and
``checkpoint_seconds`` when best.pt is calibrated and OOD-fitted (before the test split is scored).

    python benchmarks/time_to_accuracy.py --preset best --out benchmarks/tta_best.json [--set epochs=12 ...]
    python benchmarks/time_to_accuracy.py --plot benchmarks/tta_best.json benchmarks/tta_tutorial.json \
        --png docs/time_to_accuracy.png
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))


def watch_history(folder: Path, start: float, rows: list, stop: threading.Event):
    """Append (wall seconds, epoch row) each time the run writes a new history row."""
    path, seen = folder / "history.json", 0
    while not stop.is_set():
        try:
            history = json.loads(path.read_text())
        except (OSError, ValueError):
            history = []
        for row in history[seen:]:
            rows.append({"wall_seconds": time.perf_counter() - start, **row})
        seen = max(seen, len(history))
        stop.wait(0.2)


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(args) -> dict:
    from pneumonia_cnn.experiment import score_test_split
    from pneumonia_cnn.training import make_config, train
    out = Path(args.run_dir or tempfile.mkdtemp(prefix="pcnn-tta-"))
    cache = tempfile.mkdtemp(prefix="pcnn-tta-cache-")  # raw images to a model: decoding is part of the time
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    config = make_config(args.preset, data=args.data, out=str(out), cache_dir=cache, progress=False, **overrides)
    rows, stop = [], threading.Event()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    watcher = threading.Thread(target=watch_history, args=(out, start, rows, stop), daemon=True)
    watcher.start()
    marks = {}

    def after_training(run_dir, run_config, device):  # best.pt is calibrated and OOD-fitted by now
        marks["checkpoint_seconds"] = time.perf_counter() - start
        return score_test_split(run_dir, run_config, device)

    try:
        summary = train(config, after_training=after_training)
    finally:
        stop.set()
        watcher.join()
        shutil.rmtree(cache, ignore_errors=True)
    wall = time.perf_counter() - start
    best = max((r for r in rows if r.get("val_auc") is not None), key=lambda r: r["val_auc"], default={})
    return {"preset": args.preset, "overrides": overrides, "wall_seconds": wall, **marks,
            "cpu_seconds": cpu_seconds() - cpu_start, "load_average_start_end": [args.load_start, os.getloadavg()[0]],
            "epochs": rows, "best_val_auc": best.get("val_auc"), "best_epoch": best.get("epoch"),
            "test_metrics": summary.get("test_metrics", {}), "threshold": summary.get("threshold"),
            "run_dir": str(out)}


def plot(paths, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4))
    for path in paths:
        result = json.loads(Path(path).read_text())
        points = [(r["wall_seconds"], r["val_auc"]) for r in result["epochs"] if r.get("val_auc") is not None]
        seconds = result.get("checkpoint_seconds", result["wall_seconds"])
        overrides = ", ".join(f"{k}={v}" for k, v in result.get("overrides", {}).items())
        name = f"{result['preset']} ({overrides})" if overrides else result["preset"]
        label = f"{name}: {seconds:.0f} s to a calibrated, OOD-fitted checkpoint"
        axis.plot(*zip(*points), marker="o", markersize=3, label=label)
        axis.axvline(seconds, color=axis.lines[-1].get_color(), linestyle=":", linewidth=1)
    axis.set_xlabel("wall seconds from raw images (2 CPU cores)"), axis.set_ylabel("validation ROC AUC")
    axis.set_ylim(0.9, 1.0), axis.grid(alpha=0.3), axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="best")
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides")
    parser.add_argument("--run-dir", help="keep the run here (default: a temporary folder)")
    parser.add_argument("--out", help="JSON to write")
    parser.add_argument("--plot", nargs="*", help="draw these result JSONs instead of training")
    parser.add_argument("--png", default=str(PROJECT / "docs" / "time_to_accuracy.png"))
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.png)
        print(f"written: {args.png}")
        return
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.load_start = os.getloadavg()[0]
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    keys = ("preset", "wall_seconds", "checkpoint_seconds", "cpu_seconds", "best_val_auc", "best_epoch",
            "test_metrics", "load_average_start_end")
    print(json.dumps({k: result.get(k) for k in keys}, default=str))


if __name__ == "__main__":
    main()
