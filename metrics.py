"""Segmentation metrics from a confusion matrix accumulated over a whole split.

Averaging per-batch mIoU is biased (a class absent from one batch drags that batch's mean);
accumulating pixel counts over the split and computing the ratios once is the standard
(torchvision references, mmseg) and what this module does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import config
from distributed import all_reduce_sum


@dataclass
class SegmentationScores:
    pixel_accuracy: float  # correct pixels / valid (non-ignored) pixels
    miou: float  # mean IoU over classes present in ground truth or prediction
    iou: list[float]  # per class; nan for a class in neither ground truth nor prediction


class ConfusionMatrix:
    """`mat[t, p]` counts pixels of true class t predicted as p; ignored pixels are never counted."""

    def __init__(self, num_classes: int, ignore_index: int = config.IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat: torch.Tensor | None = None

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        n = self.num_classes
        if self.mat is None:
            self.mat = torch.zeros((n, n), dtype=torch.int64, device=target.device)
        target, prediction = target.flatten(), prediction.flatten()
        keep = target != self.ignore_index
        target, prediction = target[keep].long(), prediction[keep].long()
        counts = torch.bincount(target * n + prediction, minlength=n * n)
        if counts.numel() != n * n:
            raise ValueError(f"target holds class indices >= {n} that are not the ignore index {self.ignore_index}")
        self.mat += counts.reshape(n, n)

    def reduce_from_all_processes(self, device: torch.device) -> None:
        """Sum the counts of every rank (torchrun): each pixel of the split was seen by exactly one."""
        if self.mat is None:
            self.mat = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64, device=device)
        all_reduce_sum(self.mat)

    def compute(self) -> SegmentationScores:
        mat = self.mat.double().cpu() if self.mat is not None else torch.zeros(self.num_classes, self.num_classes).double()
        correct = mat.diag()
        total = mat.sum()
        union = mat.sum(0) + mat.sum(1) - correct  # predicted + true - intersection
        iou = correct / union  # 0/0 -> nan for classes seen nowhere
        present = union > 0
        return SegmentationScores(
            pixel_accuracy=(correct.sum() / total).item() if total > 0 else float("nan"),
            miou=iou[present].mean().item() if present.any() else float("nan"),
            iou=iou.tolist(),
        )
