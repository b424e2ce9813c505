"""What runs write and print for people: metrics.csv, the loss / pixel accuracy / mIoU (or depth) curves,
confusion matrices, neighbour galleries, and sizes in bytes as people read them."""

from __future__ import annotations

import csv
from pathlib import Path

from dinokit.writing import atomic_write


def write_csv(rows: list[dict], path: str | Path) -> None:
    """`rows` as a CSV file (atomically): metrics per epoch, predictions per file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            # every column of every row, in order of appearance: a run resumed from a checkpoint
            # written before a column existed has rows without it
            columns = list(dict.fromkeys(key for row in rows for key in row))
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def save_plots(
    history: list[dict[str, float]],
    out_dir: str | Path,
    curves: tuple[tuple[str, str, str], ...],
    splits: tuple[str, str] = ("train", "valid"),
    title: str = "",
) -> None:
    """One PNG per curve (`curves`: (metric, axis label, file); the rows hold <split>_<metric>): the
    training and validation values of a metric per epoch (whole epochs on the axis); `title` above
    each (a random-init run says so there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    train, valid = splits
    for key, label, filename in curves:
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot(epochs, [row[f"{train}_{key}"] for row in history], marker="o", label=f"Train {label.lower()}")
        ax.plot(epochs, [row[f"{valid}_{key}"] for row in history], marker="o", label=f"Validation {label.lower()}")
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if title:
            ax.set_title(title, fontsize=10)
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


def save_neighbour_gallery(
    rows: list[tuple[Path, str | None, list[tuple[Path, str, float]]]], path: str | Path
) -> None:
    """A row per query image: the image with its true class, then its nearest images with class (or
    name) and cosine similarity (green: same class as the query, red: another; a query without a
    class (None): titles in black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dinokit.data.image_files import read_image

    columns = 1 + max(len(neighbours) for _, _, neighbours in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.4 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for (query, truth, neighbours), row in zip(rows, axes):
        row[0].imshow(read_image(query))
        row[0].set_title(f"query: {truth or Path(query).name}", fontsize=8, fontweight="bold")
        for ax, (image, name, similarity) in zip(row[1:], neighbours):
            ax.imshow(read_image(image))
            colour = "black" if truth is None else "green" if name == truth else "red"
            ax.set_title(f"{name}\n{similarity:.4f}", fontsize=8, color=colour)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def format_bytes(count: int) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks are sold and `df -H` prints)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"
