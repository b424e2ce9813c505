"""TensorBoard logging of a training run (train.py --tensorboard), in <run folder>/tensorboard.

Per optimizer step: the training loss and learning rate (under torchrun: rank 0's batch). Per
epoch: train/valid loss, pixel accuracy and mIoU, and each class's validation IoU. Every
`--tensorboard-every` epochs (and the last): a fixed set of validation images, ground truth and
prediction side by side. Only rank 0 writes. View with `tensorboard --logdir outputs/`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dinokit.data.image_files import read_image
from dinokit.data.labels import ColorMap, read_mask
from dinokit.prediction.drawing import Segmenter, overlay

LOG_DIR = "tensorboard"


class EpochScores(Protocol):
    """One split's scores of an epoch (engine.EpochResult is one)."""

    loss: float
    pixel_accuracy: float
    miou: float
    iou: list[float]


class TrainingBoard:
    """One run's TensorBoard writer; `purge_step` (a resumed run's steps done) drops the events a
    killed run wrote after its last checkpoint, so resumed curves do not fold back on themselves."""

    def __init__(
        self,
        run_dir: Path,
        *,
        classes: Sequence[str],
        examples: Sequence[tuple[Path, Path]],
        color_map: ColorMap,
        mask_format: str,
        every: int,
        purge_step: int | None = None,
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / LOG_DIR
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        self.classes, self.every = list(classes), every
        self.examples = [
            (image.stem, read_image(image), read_mask(mask, color_map, mask_format)) for image, mask in examples
        ]

    def log_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.writer.add_scalar("step/loss", loss.item(), step)
        self.writer.add_scalar("step/lr", lr, step)

    def log_epoch(self, epoch: int, train: EpochScores, valid: EpochScores) -> None:
        for split, result in (("train", train), ("valid", valid)):
            self.writer.add_scalar(f"loss/{split}", result.loss, epoch)
            self.writer.add_scalar(f"pixel_accuracy/{split}", result.pixel_accuracy, epoch)
            self.writer.add_scalar(f"miou/{split}", result.miou, epoch)
        for name, iou in zip(self.classes, valid.iou):
            if not math.isnan(iou):  # a class absent from the split has no IoU
                self.writer.add_scalar(f"iou_valid/{name}", iou, epoch)

    def log_examples(self, epoch: int, predictor: Segmenter, *, last: bool = False) -> None:
        """Ground truth | prediction for each example image, every `every` epochs and at the last."""
        if not self.examples or (epoch % self.every and not last):
            return
        for name, image, truth in self.examples:
            prediction = predictor.predict(image)
            pair = np.concatenate(
                [overlay(image, truth, predictor.color_map), overlay(image, prediction, predictor.color_map)], 1
            )
            self.writer.add_image(f"valid/{name} (truth | prediction)", pair, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
