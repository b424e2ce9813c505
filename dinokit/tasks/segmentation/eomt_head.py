"""`--task segmentation --head eomt`: EoMT's queries and mask module read as per-pixel classes (the
paper's semantic inference: each class's score is the sum over queries of class probability x mask
probability). In training the model returns its queries and learns with the mask-classification loss
(each class present in an image is one segment to match; ignored pixels take no part); in evaluation
it returns the log of the per-pixel class scores, so every segmentation path (sliding windows,
test-time averaging, export, the mIoU) takes it as it takes the linear head's logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dinokit.tasks.panoptic.coco import IGNORED, LABEL_DIVISOR
from dinokit.tasks.panoptic.eomt import EomtModel, QueryOutputs
from dinokit.tasks.panoptic.loss import MaskClassificationLoss
from dinokit.tasks.panoptic.predictions import semantic_scores
from dinokit.tasks.segmentation.scoring import SegmentationScoring, pixel_cross_entropy


class SemanticEomt(EomtModel):
    """EoMT whose evaluation output is `[B, C, H, W]` log class scores (training: its `QueryOutputs`)."""

    def forward_head(
        self, features: torch.Tensor, image_size: Sequence[int], output_size: Sequence[int] | None = None
    ) -> QueryOutputs | torch.Tensor:
        outputs = super().forward_head(features, image_size)
        if self.training:
            return outputs
        masks = outputs.image_masks(output_size if output_size is not None else image_size)
        return semantic_scores(masks, outputs.classes).clamp(min=1e-6).log()


def as_segments(masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Class-index masks as the panoptic targets' encoding: one stuff segment per class, ignored pixels IGNORED."""
    encoded = masks.long() * LABEL_DIVISOR
    return torch.where(masks == ignore_index, torch.full_like(encoded, IGNORED), encoded)


class EomtSegmentationScoring(SegmentationScoring):
    """The mask-classification loss on training batches (queries), cross-entropy of the per-pixel
    class probabilities on evaluation batches; the confusion matrix of the per-pixel classes either way."""

    def __init__(self, num_classes: int, ignore_index: int):
        super().__init__(num_classes, ignore_index)
        self.mask_loss = MaskClassificationLoss(num_classes, [False] * num_classes)

    def loss(self, outputs: Any, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(outputs, QueryOutputs):
            loss, _ = self.mask_loss(outputs, as_segments(masks, self.ignore_index))
            return loss, (masks != self.ignore_index).sum()
        return pixel_cross_entropy(outputs, masks, self.ignore_index)

    def update(self, outputs: Any, masks: torch.Tensor) -> None:
        if isinstance(outputs, QueryOutputs):
            outputs = semantic_scores(outputs.image_masks(masks.shape[-2:]), outputs.classes)
        super().update(outputs, masks)
