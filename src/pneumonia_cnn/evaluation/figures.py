"""Evaluation pictures: ROC and PR with the operating point, confusion matrix, reliability diagram,
score histograms by class, and the most confident mistakes (false negatives first)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from ..plots import figure_text, plt, save_figure
from .metrics import decided_positive
from .staging import FIGURE_TITLE


def evaluation_figures(report: dict, cached, folder) -> dict:
    """Write every picture into ``folder``; returns {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.array([p["label"] for p in report["predictions"]])
    scores = np.array([p["probability"] for p in report["predictions"]])
    drawings = {"roc": _roc, "pr": _precision_recall, "confusion": _confusion, "reliability": _reliability,
                "histogram": _histogram, "mistakes": _mistakes}
    paths = {}
    for name, draw in drawings.items():
        figure = draw(report, labels, scores, cached)
        save_figure(figure, folder / f"{name}.png", FIGURE_TITLE)
        paths[name] = str(folder / f"{name}.png")
    return paths


def _operating_point(report: dict) -> dict:
    cm = report["metrics"]["confusion_matrix"]
    return {"sensitivity": cm["tp"] / max(cm["tp"] + cm["fn"], 1),
            "specificity": cm["tn"] / max(cm["tn"] + cm["fp"], 1),
            "precision": cm["tp"] / max(cm["tp"] + cm["fp"], 1)}


def _roc(report, labels, scores, _cached):
    point = _operating_point(report)
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    if len(set(labels.tolist())) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        axis.plot(fpr, tpr, label=f"AUC {report['metrics']['roc_auc']['value']:.3f}")
    axis.plot([0, 1], [0, 1], "k--", lw=0.8)
    axis.plot(1 - point["specificity"], point["sensitivity"], "ro", label=f"threshold {report['threshold']:.2f}")
    axis.set_xlabel("1 - specificity"), axis.set_ylabel("sensitivity"), axis.set_title("ROC"), axis.legend()
    return figure


def _precision_recall(report, labels, scores, _cached):
    point = _operating_point(report)
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    if len(set(labels.tolist())) == 2:
        precision, recall, _ = precision_recall_curve(labels, scores)
        axis.plot(recall, precision, label=f"AP {report['metrics']['pr_auc']['value']:.3f}")
    axis.plot(point["sensitivity"], point["precision"], "ro", label=f"threshold {report['threshold']:.2f}")
    axis.set_xlabel("recall (sensitivity)"), axis.set_ylabel("precision (PPV)"), axis.set_title("Precision-recall")
    axis.legend()
    return figure


def _confusion(report, _labels, _scores, _cached):
    cm = report["metrics"]["confusion_matrix"]
    figure, axis = plt.subplots(figsize=(4, 3.6))
    matrix = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    axis.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        axis.text(j, i, str(value), ha="center", va="center", color="black" if value < matrix.max() / 2 else "white")
    names = [figure_text(name) for name in report["counts"]]
    axis.set_xticks([0, 1], names), axis.set_yticks([0, 1], names)
    axis.set_xlabel("predicted"), axis.set_ylabel("true"), axis.set_title("Confusion matrix")
    return figure


def _reliability(report, labels, scores, _cached):
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    true_fraction, mean_predicted = calibration_curve(labels, scores, n_bins=10, strategy="uniform")
    axis.plot([0, 1], [0, 1], "k--", lw=0.8)
    axis.plot(mean_predicted, true_fraction, "o-", label=f"ECE {report['metrics']['ece']['value']:.3f}")
    axis.set_xlabel("mean predicted probability"), axis.set_ylabel("fraction positive")
    axis.set_title("Reliability"), axis.legend()
    return figure


def _histogram(report, labels, scores, _cached):
    figure, axis = plt.subplots(figsize=(5, 3.6))
    bins = np.linspace(0, 1, 26)
    for index, name in enumerate(report["counts"]):
        axis.hist(scores[labels == index], bins=bins, alpha=0.6, label=figure_text(name))
    axis.axvline(report["threshold"], color="r", ls="--")
    axis.set_xlabel("probability of pneumonia"), axis.set_ylabel("images"), axis.set_title("Scores by class")
    axis.legend()
    return figure


def confident_mistakes(report, labels, scores) -> list[int]:
    """The six most confident false negatives, then the six most confident false positives, as decided (an image
    given no label too: the metrics count it)."""
    predicted = decided_positive(report)
    false_negatives = np.where((labels == 1) & ~predicted)[0]
    false_positives = np.where((labels == 0) & predicted)[0]
    false_negatives = false_negatives[np.argsort(scores[false_negatives])][:6]
    false_positives = false_positives[np.argsort(-scores[false_positives])][:6]
    return [int(i) for i in false_negatives] + [int(i) for i in false_positives]


def _mistakes(report, labels, scores, cached):
    chosen = confident_mistakes(report, labels, scores)
    columns = max(1, min(6, len(chosen)))
    rows = max(1, -(-len(chosen) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, index in zip(axes.ravel(), chosen):
        axis.imshow(np.asarray(cached.images[index]), cmap="gray", vmin=0, vmax=255)
        kind = "FN" if labels[index] == 1 else "FP"
        name = figure_text(Path(cached.paths[index]).name[:22])  # cut before escaping: no half escape
        axis.set_title(f"{kind} p={scores[index]:.2f}\n{name}", fontsize=7)
    if not chosen:
        axes[0][0].text(0.5, 0.5, "no mistakes", ha="center")
    return figure
