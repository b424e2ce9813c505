"""Metric logs and figures: metrics.csv, the loss / pixel accuracy / mIoU curves, confusion matrices."""
from __future__ import annotations

import csv
from pathlib import Path

from files import atomic_write


def write_metrics_csv(history: list[dict[str, float]], path: str | Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            # every column of every row, in order of appearance: a run resumed from a checkpoint
            # written before a column existed has rows without it
            columns = list(dict.fromkeys(key for row in history for key in row))
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def save_plots(history: list[dict[str, float]], out_dir: str | Path) -> None:
    """loss.png, accuracy.png and miou.png: train and validation curves per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    for key, label, filename in (("loss", "Loss", "loss.png"), ("pixacc", "Pixel accuracy", "accuracy.png"), ("miou", "mIoU", "miou.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", label=f"Train {label.lower()}")
        ax.plot(epochs, [row[f"valid_{key}"] for row in history], marker="o", label=f"Validation {label.lower()}")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        atomic_write(Path(out_dir) / filename, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def save_confusion_matrix(matrix, classes: list[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (row = true class, each row sums to 1) with class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = max(5.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion matrix (rows normalised)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
