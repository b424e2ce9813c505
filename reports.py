"""A run's metric log: metrics.csv and the loss / pixel accuracy / mIoU curves."""
from __future__ import annotations

import csv
from pathlib import Path

from files import atomic_write


def write_metrics_csv(history: list[dict[str, float]], path: str | Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
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
