"""Figures for training runs: curves, confusion matrix, confident mistakes, first-layer filters.

Each plot_* function takes plain numbers or arrays, writes one PNG, and returns its path. The
*_figure functions build the same figures for TensorBoard's add_figure.

The figures are matplotlib `Figure` objects, not pyplot's: they need no backend and no display, so
importing this module leaves the caller's backend alone (a notebook keeps its inline figures), and
pyplot never holds on to them, so there is nothing to close.
"""

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from rundir import atomic_write

DPI = 120


def _save(fig, path) -> Path:
    """Write the figure as PNG, atomically like the checkpoints."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    atomic_write(path, buffer.getvalue())
    return Path(path)


def plot_curves(histories: dict[str, list[dict]], path) -> Path:
    """Loss and accuracy per epoch, train dashed and validation solid, one colour per run."""
    fig = Figure(figsize=(11, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (label, history) in enumerate(histories.items()):
        epochs = [row["epoch"] for row in history]
        colour = f"C{i}"
        for ax, key, scale in ((loss_ax, "loss", 1), (acc_ax, "acc", 100)):
            ax.plot(
                epochs, [row[f"train_{key}"] * scale for row in history], "--", color=colour, label=f"{label} train"
            )
            ax.plot(
                epochs, [row[f"val_{key}"] * scale for row in history], "-o", color=colour, ms=3, label=f"{label} val"
            )
    loss_ax.set(title="Cross-entropy loss", xlabel="epoch", ylabel="loss", yscale="log")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, path, title: str) -> Path:
    return _save(confusion_figure(matrix, title), path)


def confusion_figure(matrix: np.ndarray, title: str):
    """The confusion matrix as a heat map of row-normalised rates, annotated with the counts."""
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    # Colour by the log of the rate, so that a handful of mistakes stands out next to ~1,000 hits.
    image = ax.imshow(np.log10(np.maximum(rates, 1e-4)), cmap="Blues", vmin=-4, vmax=0)
    for (t, p), count in np.ndenumerate(matrix):
        if count:
            ax.text(
                p, t, str(count), ha="center", va="center", fontsize=7, color="white" if rates[t, p] > 0.1 else "black"
            )
    ax.set(title=title, xlabel="predicted digit", ylabel="true digit", xticks=range(10), yticks=range(10))
    bar = fig.colorbar(image, ax=ax, ticks=[-4, -3, -2, -1, 0])
    bar.ax.set_yticklabels(["0.01%", "0.1%", "1%", "10%", "100%"])
    bar.set_label("share of the true digit's images")
    return fig


def plot_mistakes(images, true, predicted, confidence, path, title: str, count: int = 24) -> Path:
    return _save(mistakes_figure(images, true, predicted, confidence, title, count), path)


def mistakes_figure(images, true, predicted, confidence, title: str, count: int = 24):
    """The `count` most confidently wrong digits, each titled with true label, prediction and confidence."""
    wrong = np.flatnonzero(np.asarray(true) != np.asarray(predicted))
    worst = wrong[np.argsort(-np.asarray(confidence)[wrong])][:count]
    cols, rows = 8, max(1, -(-len(worst) // 8))
    # One image of tiles on one axes: drawn in 0.12-0.15 s, where 24 subplots took 0.7 s at the end of every run.
    cell = 28 + 12  # a digit, then room for its caption below it
    sheet = np.zeros((rows * cell, cols * 32))
    fig = Figure(figsize=(cols * 1.3, rows * 1.55))
    ax = fig.subplots()
    for k, i in enumerate(worst):
        top, left = (k // cols) * cell, (k % cols) * 32 + 2
        sheet[top : top + 28, left : left + 28] = np.asarray(images[i])
        ax.text(
            left + 14,
            top + 29,
            f"true {true[i]}, said {predicted[i]}\n{confidence[i]:.1%} sure",
            ha="center",
            va="top",
            fontsize=7,
        )
    ax.imshow(sheet, cmap="gray_r", vmin=0, vmax=255)
    ax.axis("off")
    ax.set_title(f"{title}: {len(wrong)} mistakes, the {len(worst)} most confident", fontsize=10)
    return fig


def plot_filters(weights, path, title: str) -> Path:
    """First-layer convolution kernels (C_out, 1, k, k) as images; red positive, blue negative."""
    weights = np.asarray(weights)[:, 0]
    limit = np.abs(weights).max()
    fig = Figure(figsize=(1.2 * len(weights), 1.6))
    axes = fig.subplots(1, len(weights))
    for i, (ax, kernel) in enumerate(zip(np.atleast_1d(axes), weights)):
        ax.imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"filter {i}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
