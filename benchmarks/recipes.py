"""The README's recipe table from finished run folders: python benchmarks/recipes.py runs/tutorial runs/best"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn.checkpoint import load_checkpoint  # noqa: E402
from pneumonia_cnn.training import make_config  # noqa: E402

FLAGS = ("model", "size", "channels", "epochs", "intensity", "lr", "batch_size")


def preset_and_flags(config: dict) -> str:
    """The preset and the flags that changed it, e.g. `best --model resnet18 --size 128`."""
    preset = make_config(config["preset"]).to_dict()
    flags = [f"--{name.replace('_', '-')} {config[name]}" for name in FLAGS if config.get(name) != preset.get(name)]
    return " ".join([f"`{config['preset']}`"] + ([f"`{' '.join(flags)}`"] if flags else []))


def row(run: Path) -> str:
    checkpoint = load_checkpoint(run / "best.pt")
    metrics = json.loads((run / "test_metrics.json").read_text())["metrics"]
    history = json.loads((run / "history.json").read_text())
    config = checkpoint["config"]
    minutes = sum(r["seconds"] for r in history) / 60

    def cell(name):
        m = metrics[name]
        return f"{m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
    shape = f"{config['size']}×{config['size']}×{config['channels']}"
    return (f"| {preset_and_flags(config)} | {config['model']} {shape} | "
            f"{cell('accuracy')} | {cell('sensitivity')} | {cell('specificity')} | {cell('roc_auc')} | "
            f"{checkpoint.get('parameters', 0):,} | {len(history)} ({checkpoint.get('epoch')}) | {minutes:.0f} | "
            f"{checkpoint.get('threshold', 0.5):.3f} |")


def main():
    print("| preset | model, input | accuracy | sensitivity | specificity | ROC AUC | parameters | epochs (best) "
          "| training minutes | threshold |")
    print("|---|---|---|---|---|---|---:|---|---:|---:|")
    for run in sys.argv[1:]:
        print(row(Path(run)))


if __name__ == "__main__":
    main()
