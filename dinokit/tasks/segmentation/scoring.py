"""Segmentation's loss and scores: cross-entropy per pixel, and one confusion matrix over a whole
split (metrics.py) per epoch and at full resolution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dinokit.prediction.scores import predicted_classes
from metrics import ArticleIoU, ConfusionMatrix, SegmentationScores


def pixel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over non-ignored pixels (in fp32 whatever the autocast dtype), and their count.
    A batch with no valid pixel gives 0, not nan."""
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    valid = (target != ignore_index).sum()
    return loss_sum / valid.clamp(min=1), valid


class SegmentationScoring:
    """Cross-entropy per pixel; pixel accuracy and mIoU from one confusion matrix over the split."""

    def __init__(self, num_classes: int, ignore_index: int):
        self.ignore_index = ignore_index
        self.confmat = ConfusionMatrix(num_classes, ignore_index)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and its weight in the split's mean (its valid pixels)."""
        return pixel_cross_entropy(logits, masks, self.ignore_index)

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        self.confmat.update(masks, predicted_classes(logits))

    def result(self, device: torch.device) -> tuple[dict[str, float], list[float]]:
        """The split's metrics (metrics.csv's columns) and the IoU of each class."""
        self.confmat.reduce_from_all_processes(device)  # under torchrun: every rank's counts
        scores = self.confmat.compute()
        return {"pixacc": scores.pixel_accuracy, "miou": scores.miou}, scores.iou


@dataclass
class SegmentationEvaluation:
    """A split scored at full resolution: the scores, the confusion matrix and, for comparison with
    per-batch loops, the reference article's per-batch mIoU on the same predictions."""

    scores: SegmentationScores
    confusion: torch.Tensor  # [num_classes, num_classes] pixel counts, row = true class
    article_miou: float
    article_batch: int  # images per batch of `article_miou`


class SegmentationEvaluator:
    """One confusion matrix over the split (ignore pixels excluded) and the article-style mIoU beside it."""

    def __init__(self, num_classes: int, ignore_index: int, article_batch: int = 2):
        self.confmat = ConfusionMatrix(num_classes, ignore_index)
        self.article = ArticleIoU(num_classes, ignore_index, article_batch)
        self.article_batch = article_batch

    def update(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        self.confmat.update(truth, prediction)
        self.article.update(truth, prediction)

    def result(self, device: torch.device) -> SegmentationEvaluation:
        self.confmat.reduce_from_all_processes(device)
        scores, confusion = self.confmat.compute(), self.confmat.mat.cpu()
        return SegmentationEvaluation(scores, confusion, self.article.compute(device), self.article_batch)


def report_lines(result: SegmentationEvaluation, classes: list[str], images: int, ms_per_image: float) -> list[str]:
    """The summary and the per-class table that evaluate.py and train.py print."""
    s = result.scores
    lines = [
        f"pixel accuracy {s.pixel_accuracy:.4f} | mIoU {s.miou:.4f} | mean class accuracy {s.mean_class_accuracy:.4f}"
        f" | frequency-weighted IoU {s.fwiou:.4f}"
        f"  ({images} images, {ms_per_image:.0f} ms/image)",
        f"{'class':<20} {'IoU':>7} {'acc':>7} {'share':>7}",
    ]
    for name, iou, acc, share in zip(classes, s.iou, s.class_accuracy, s.pixel_share):
        shown = [f"{v:7.4f}" if v == v else f"{'-':>7}" for v in (iou, acc, share)]
        lines.append(f"{name[:20]:<20} {' '.join(shown)}")
    return lines


def report_json(result: SegmentationEvaluation, classes: list[str]) -> dict[str, Any]:
    """The scores as eval_*.json and best_validation.json hold them."""
    s = result.scores
    return {
        "pixel_accuracy": s.pixel_accuracy,
        "miou": s.miou,
        "mean_class_accuracy": s.mean_class_accuracy,
        "fwiou": s.fwiou,
        "article_miou": result.article_miou,
        "article_batch": result.article_batch,
        "iou": dict(zip(classes, s.iou)),
        "class_accuracy": dict(zip(classes, s.class_accuracy)),
        "pixel_share": dict(zip(classes, s.pixel_share)),
    }
