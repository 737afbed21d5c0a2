"""Learning curves under a site shift: from scratch vs fine-tuned from the built-in model.

    python benchmarks/finetune_curves.py [--init builtin] [--sizes 25 50 100 250 1000] [--seeds 0 1 2]

The site is the shared X-rays under a strong, fixed acquisition shift (tighter collimation, blur, a different
exposure curve, noise; as benchmarks/site_adaptation.py). For each number n of labelled site images (a
class-stratified draw from the shifted `train` folder; a new draw per seed) both arms train on the same n
images for the same number of epochs: `--preset best` from scratch, and `--preset finetune --init builtin`.
Each is scored on the whole shifted `test` folder (520 images, never trained on). ROC AUC is averaged over the
seeds; intervals are 95% patient-bootstrap intervals of that average and of the paired difference (the same
resampled images score both arms). Prints a markdown table, writes JSON and a picture.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn.data.dataset import load_split, patient_id  # noqa: E402
from pneumonia_cnn.evaluation import stress  # noqa: E402
from pneumonia_cnn.inference import Predictor  # noqa: E402
from pneumonia_cnn.training import make_config, train  # noqa: E402


def site_shift(gray, index):
    return stress.noise(stress.gamma(stress.blur(stress.border_crop(gray, 0.12), 1.5), 1.5), 0.03, index)


def write_shifted(paths, labels, folder: Path, class_names=("NORMAL", "PNEUMONIA")):
    for index, (path, label) in enumerate(zip(paths, labels)):
        target = folder / class_names[label] / (Path(path).stem + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(site_shift(np.asarray(Image.open(path).convert("L")), index)).save(target)


def draw(listing, n, seed):
    """n images of the train folder, both classes in their proportion (at least 2 of each)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in (0, 1):
        members = np.where(listing.labels == label)[0]
        count = max(2, int(round(n * len(members) / len(listing))))
        chosen += list(rng.choice(members, size=count, replace=False))
    return sorted(chosen)


def epochs_for(n: int) -> int:
    """About 6,000 images seen, between 12 and 60 epochs: the same budget for both arms."""
    return int(np.clip(round(6000 / n), 12, 60))


def train_arm(arm, site: Path, out: Path, seed: int, init: str) -> Path:
    common = dict(data=str(site), out=str(out), seed=seed, epochs=epochs_for(len(load_split(site, "train"))),
                  early_stopping=0, evaluate_test=False, ood=False, progress=False, cache_dir=str(site / "cache"))
    config = make_config("finetune", init=init, **common) if arm == "fine-tuned" else make_config("best", **common)
    train(config)
    return out / "best.pt"


def paired_intervals(labels, patients, scores: dict, resamples=1000, seed=0) -> dict:
    """Seed-averaged AUC per arm and the paired difference, with patient-bootstrap 95% intervals."""
    from sklearn.metrics import roc_auc_score
    groups = np.unique(patients, return_inverse=True)[1]
    members = [np.where(groups == g)[0] for g in range(groups.max() + 1)]
    rng = np.random.default_rng(seed)

    def mean_auc(arm, index):
        return float(np.mean([roc_auc_score(labels[index], s[index]) for s in scores[arm]]))
    point = {arm: mean_auc(arm, np.arange(len(labels))) for arm in scores}
    draws = {arm: [] for arm in scores}
    for _ in range(resamples):
        index = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if len(set(labels[index])) == 2:
            for arm in scores:
                draws[arm].append(mean_auc(arm, index))
    ci = {arm: np.percentile(draws[arm], [2.5, 97.5]).tolist() for arm in scores}
    difference = np.array(draws["fine-tuned"]) - np.array(draws["scratch"])
    return {"auc": point, "ci95": ci, "difference": point["fine-tuned"] - point["scratch"],
            "difference_ci95": np.percentile(difference, [2.5, 97.5]).tolist()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(PROJECT.parent / "shared" / "data" / "chest_xray_224"))
    parser.add_argument("--init", default="builtin")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 250, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "finetune_curves.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="finetune-"))
    train_list, test_list = load_split(args.data, "train"), load_split(args.data, "test")
    write_shifted(test_list.paths, test_list.labels, work / "test")
    shifted_test = sorted((work / "test").glob("*/*.png"))
    labels = np.array([int(p.parent.name == "PNEUMONIA") for p in shifted_test])
    patients = np.array([patient_id(p.with_suffix(".jpeg")) for p in shifted_test])
    untouched = np.array([p.raw_score for p in Predictor(args.init, "cpu").predict_files(shifted_test)])
    rows = []
    for n in args.sizes:
        scores = {"scratch": [], "fine-tuned": []}
        for seed in args.seeds:
            site = work / f"n{n}_s{seed}"
            chosen = draw(train_list, n, seed)
            write_shifted([train_list.paths[i] for i in chosen], train_list.labels[chosen], site / "train")
            for arm in scores:
                checkpoint = train_arm(arm, site, site / arm, seed, args.init)
                scores[arm].append(np.array([p.raw_score for p in Predictor(checkpoint, "cpu").predict_files(
                    shifted_test)]))
        rows.append({"labelled_images": n, "epochs": epochs_for(n), **paired_intervals(labels, patients, scores)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"init": args.init, "seeds": args.seeds, "untouched_init": paired_intervals(
        labels, patients, {"scratch": [untouched], "fine-tuned": [untouched]})["auc"]["scratch"], "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    plot(result, PROJECT / "docs" / "finetune_curves.png")


def print_table(result):
    print(f"\nthe initial model itself, not fine-tuned: ROC AUC {result['untouched_init']:.3f}")
    print("| labelled site images | epochs | from scratch | fine-tuned from the built-in model | difference |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        s, f = row["ci95"]["scratch"], row["ci95"]["fine-tuned"]
        d = row["difference_ci95"]
        print(f"| {row['labelled_images']} | {row['epochs']} | {row['auc']['scratch']:.3f} [{s[0]:.3f}, {s[1]:.3f}] | "
              f"{row['auc']['fine-tuned']:.3f} [{f[0]:.3f}, {f[1]:.3f}] | {row['difference']:+.3f} "
              f"[{d[0]:+.3f}, {d[1]:+.3f}] |")


def plot(result, path: Path):
    from pneumonia_cnn.plots import plt, save_figure
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(5.5, 4))
    sizes = [row["labelled_images"] for row in result["rows"]]
    for arm in ("scratch", "fine-tuned"):
        values = [row["auc"][arm] for row in result["rows"]]
        low = [row["ci95"][arm][0] for row in result["rows"]]
        high = [row["ci95"][arm][1] for row in result["rows"]]
        axis.plot(sizes, values, "o-", label=arm)
        axis.fill_between(sizes, low, high, alpha=0.2)
    axis.axhline(result["untouched_init"], color="gray", ls="--", label="built-in, not fine-tuned")
    axis.set_xscale("log"), axis.set_xlabel("labelled images of the new site"), axis.set_ylabel("ROC AUC")
    axis.set_title("Shifted test folder (520 images)"), axis.grid(alpha=0.3), axis.legend()
    save_figure(figure, path)


if __name__ == "__main__":
    main()
