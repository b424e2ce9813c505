"""TensorBoard logging of a training run (train.py --tensorboard), in <run folder>/tensorboard.

Per optimizer step: the training loss and learning rate (under torchrun: rank 0's batch). Per
epoch: train/valid loss and every metric (pixel accuracy, mIoU and each class's validation IoU; a
depth run's errors). Every
`--tensorboard-every` epochs (and the last): a fixed set of validation images, ground truth and
prediction side by side (depth: in colour). Only rank 0 writes. View with `tensorboard --logdir outputs/`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

LOG_DIR = "tensorboard"
METRIC_TAGS = {"pixacc": "pixel_accuracy"}  # tags of earlier runs' logs, kept so that their curves continue


class Predicting(Protocol):
    def predict(self, image: np.ndarray) -> np.ndarray: ...


class EpochScores(Protocol):
    """One split's scores of an epoch (engine.EpochResult is one)."""

    loss: float
    metrics: dict[str, float]
    iou: list[float]


class TrainingBoard:
    """One run's TensorBoard writer; `purge_step` (a resumed run's steps done) drops the events a
    killed run wrote after its last checkpoint, so resumed curves do not fold back on themselves.
    `examples`: (name, image, truth) of the images shown; `draw(image, truth or prediction)` makes
    one picture of either (segmentation: an overlay; depth: the depth in colour)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        classes: Sequence[str],
        examples: Sequence[tuple[str, np.ndarray, np.ndarray]],
        draw: Callable[[np.ndarray, np.ndarray], np.ndarray],
        every: int,
        purge_step: int | None = None,
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / LOG_DIR
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        self.classes, self.every = list(classes), every
        self.examples, self.draw = list(examples), draw

    def log_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.writer.add_scalar("step/loss", loss.item(), step)
        self.writer.add_scalar("step/lr", lr, step)

    def log_epoch(self, epoch: int, train: EpochScores, valid: EpochScores) -> None:
        for split, result in (("train", train), ("valid", valid)):
            self.writer.add_scalar(f"loss/{split}", result.loss, epoch)
            for name, value in result.metrics.items():
                self.writer.add_scalar(f"{METRIC_TAGS.get(name, name)}/{split}", value, epoch)
        for name, iou in zip(self.classes, valid.iou):
            if not math.isnan(iou):  # a class absent from the split has no IoU
                self.writer.add_scalar(f"iou_valid/{name}", iou, epoch)

    def log_examples(self, epoch: int, predictor: Predicting, *, last: bool = False) -> None:
        """Ground truth | prediction for each example image, every `every` epochs and at the last."""
        if not self.examples or (epoch % self.every and not last):
            return
        for name, image, truth in self.examples:
            pair = np.concatenate([self.draw(image, truth), self.draw(image, predictor.predict(image))], 1)
            self.writer.add_image(f"valid/{name} (truth | prediction)", pair, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
