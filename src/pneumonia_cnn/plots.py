"""Pictures from arrays (matplotlib, no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .fileio import atomic_path, printable  # noqa: E402


def figure_text(text) -> str:
    """Text naming a file, as a figure shows it verbatim: each line as ``fileio.printable`` writes it (a byte that
    is not UTF-8 as ``\\xff``; matplotlib's font code refuses the lone surrogate Python decodes it to) and every
    ``$`` escaped, so that a name such as ``a$\\foo$.png`` is not parsed as mathtext."""
    return "\n".join(printable(line) for line in str(text).split("\n")).replace("$", r"\$")


SAMPLES_TITLE = "pneumonia-cnn show-samples"  # stored in show-samples' picture: a later run knows it as its own


def save_figure(figure, path, title: str | None = None) -> None:
    kind = str(path).rsplit(".", 1)[-1]
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format=kind, dpi=110, bbox_inches="tight", **_titled(kind.lower(), title))
    plt.close(figure)


def _titled(kind: str, title: str | None) -> dict:
    """savefig's arguments that store ``title`` in the file, where its format has a place for one (GIF, WebP and
    PostScript have none: such a file is not known again as the command's own)."""
    if not title:
        return {}
    if kind in ("png", "pdf", "svg"):
        return {"metadata": {"Title": title}}
    if kind in ("jpg", "jpeg"):
        return {"pil_kwargs": {"comment": title.encode("ascii")}}
    return {"pil_kwargs": {"description": title}} if kind in ("tif", "tiff") else {}


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
                axis.set_title(figure_text(titles[row][column] if titles else name), fontsize=8)
    save_figure(figure, path, SAMPLES_TITLE)


def reliability_diagram(curves: dict[str, list[dict]], path, title: str = "Reliability on validation") -> None:
    """One line per calibration method: mean predicted probability vs observed rate in each bin
    (``calibration.reliability_bins`` rows), dot size by count."""
    figure, axis = plt.subplots(figsize=(5, 4.2))
    axis.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for name, rows in curves.items():
        axis.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "o-", label=name,
                  markersize=3)
    axis.set_xlabel("mean predicted probability"), axis.set_ylabel("observed pneumonia rate")
    axis.set_xlim(0, 1), axis.set_ylim(0, 1), axis.set_title(title), axis.grid(alpha=0.3), axis.legend()
    save_figure(figure, path)
