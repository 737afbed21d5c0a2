"""Pictures from arrays (matplotlib, no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fileio import atomic_path  # noqa: E402


def save_figure(figure, path) -> None:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=str(path).rsplit(".", 1)[-1], dpi=110, bbox_inches="tight")
    plt.close(figure)


def training_curves(history: list[dict], path) -> None:
    """Accuracy and loss per epoch, train vs val: the tutorial's missing graph."""
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("accuracy", "loss")):
        axis.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label="train")
        if any(row.get(f"val_{metric}") is not None for row in history):
            axis.plot(epochs, [row.get(f"val_{metric}") for row in history], "s-", label="val")
        axis.set_xlabel("epoch"), axis.set_ylabel(metric), axis.set_title(metric), axis.grid(alpha=0.3)
        axis.legend()
    save_figure(figure, path)


def sample_grid(images_by_class: dict[str, list[np.ndarray]], path, titles=None) -> None:
    columns = max(len(v) for v in images_by_class.values())
    figure, axes = plt.subplots(len(images_by_class), columns, figsize=(2.2 * columns, 2.4 * len(images_by_class)),
                                squeeze=False)
    for row, (name, images) in enumerate(images_by_class.items()):
        for column in range(columns):
            axis = axes[row][column]
            axis.axis("off")
            if column < len(images):
                axis.imshow(images[column], cmap="gray", vmin=0, vmax=255)
                axis.set_title(titles[row][column] if titles else name, fontsize=8)
    save_figure(figure, path)
