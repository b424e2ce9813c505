"""Mask classification's loss (Mask2Former / EoMT): each target segment is matched to one query by
the Hungarian algorithm (scipy) on class + mask BCE + Dice costs, computed on points sampled
uniformly (torch's generator, which train.py seeds); matched queries learn their segment's class
and mask (BCE + Dice on points sampled where the prediction is most uncertain), the others
"no object" (weighted 0.1). Every prediction EoMT
makes (after each query block's input and the last block) is supervised the same way. Crowd regions
take no part in the mask terms.

Weights and point counts are the papers': class 2, mask 5, dice 5; 12544 points, oversampled 3x,
75 % of them by uncertainty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from dinokit.tasks.panoptic.coco import IGNORED, LABEL_DIVISOR
from utils import all_reduce_sum, world_size


@dataclass(frozen=True)
class LossWeights:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object: float = 0.1
    points: int = 12544
    oversample: float = 3.0
    importance: float = 0.75


@dataclass
class Segments:
    """One image's target segments: `[S, H, W]` masks, `[S]` class indices, and `[H, W]` where the
    loss looks (False on crowd regions)."""

    masks: torch.Tensor
    classes: torch.Tensor
    valid: torch.Tensor


def target_segments(target: torch.Tensor, isthing: torch.Tensor) -> Segments:
    """An encoded target map (dinokit/tasks/panoptic/coco.py) as segments: every (class, instance)
    value is one, a thing class's instance 0 is a crowd region and IGNORED pixels are out of the
    loss, VOID is in no segment."""
    values = torch.unique(target)
    values = values[values >= 0]
    classes, instances = values // LABEL_DIVISOR, values % LABEL_DIVISOR
    crowd = isthing[classes] & (instances == 0)
    valid = target != IGNORED
    for value in values[crowd]:
        valid &= target != value
    kept = values[~crowd]
    masks = target[None] == kept[:, None, None]
    return Segments(masks.float(), classes[~crowd].long(), valid)


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """`maps` `[N, C, H, W]` at `points` `[N, P, 2]` (x, y in [0, 1]): `[N, C, P]` (bilinear)."""
    return F.grid_sample(maps, 2.0 * points[:, :, None] - 1.0, align_corners=False).squeeze(-1)


def uncertain_points(logits: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """Mask2Former's importance sampling: oversample, keep the most uncertain (|logit| smallest),
    the rest uniform. `logits` `[N, 1, H, W]` -> `[N, P, 2]`."""
    count, device = logits.shape[0], logits.device
    sampled = int(weights.points * weights.oversample)
    candidates = torch.rand(count, sampled, 2, device=device)
    uncertainty = -point_sample(logits, candidates).abs()[:, 0]
    important = int(weights.importance * weights.points)
    index = uncertainty.topk(important, dim=1).indices
    chosen = torch.gather(candidates, 1, index[..., None].expand(-1, -1, 2))
    uniform = torch.rand(count, weights.points - important, 2, device=device)
    return torch.cat([chosen, uniform], dim=1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    probs = logits.sigmoid() * valid
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + (targets * valid).sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def match(
    masks: torch.Tensor, classes: torch.Tensor, target: Segments, weights: LossWeights
) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, segment indices) of the cheapest one-to-one assignment for one image."""
    if len(target.classes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cost_class = -classes.float().softmax(-1)[:, target.classes]
    points = torch.rand(1, weights.points, 2, device=masks.device)
    predicted = point_sample(masks[None].float(), points)[0]  # [K, P]
    wanted = point_sample(target.masks[None], points)[0]  # [S, P]
    valid = point_sample(target.valid[None, None].float(), points)[0]  # [1, P]
    positive = F.binary_cross_entropy_with_logits(predicted, torch.ones_like(predicted), reduction="none") * valid
    negative = F.binary_cross_entropy_with_logits(predicted, torch.zeros_like(predicted), reduction="none") * valid
    count = valid.sum().clamp(min=1)
    cost_mask = (positive @ wanted.T + negative @ (1 - wanted).T) / count
    probs = predicted.sigmoid() * valid
    cost_dice = 1 - (2 * probs @ wanted.T + 1) / (probs.sum(-1)[:, None] + (wanted * valid).sum(-1)[None] + 1)
    cost = weights.mask_weight * cost_mask + weights.class_weight * cost_class + weights.dice_weight * cost_dice
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows, cols


class MaskClassificationLoss:
    """The loss of one batch of `QueryOutputs` against encoded target maps."""

    def __init__(self, num_classes: int, isthing: list[bool], weights: LossWeights = LossWeights()):
        self.num_classes, self.weights = num_classes, weights
        self.isthing = torch.tensor(isthing, dtype=torch.bool)
        self.class_weights = torch.ones(num_classes + 1)
        self.class_weights[-1] = weights.no_object

    def __call__(self, outputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, weight): the sum over every supervised prediction, and the batch's segment count."""
        device = targets.device
        segments = [target_segments(t, self.isthing.to(device)) for t in targets]
        count = torch.tensor(float(sum(len(s.classes) for s in segments)), device=device)
        total_segments = count.clone()
        if world_size() > 1:
            all_reduce_sum(total_segments)
            total_segments /= world_size()
        normaliser = total_segments.clamp(min=1)
        loss = torch.zeros((), device=device)
        for masks, classes in outputs.predictions():
            loss = loss + self.one_prediction(masks, classes, segments, normaliser)
        return loss, count.long().clamp(min=1)

    def one_prediction(
        self, masks: torch.Tensor, classes: torch.Tensor, segments: list[Segments], normaliser: torch.Tensor
    ) -> torch.Tensor:
        weights = self.weights
        device = masks.device
        matches = [match(masks[i], classes[i], s, weights) for i, s in enumerate(segments)]
        labels = torch.full(classes.shape[:2], self.num_classes, dtype=torch.long, device=device)
        for i, (rows, cols) in enumerate(matches):
            labels[i, torch.as_tensor(rows, device=device)] = segments[i].classes[torch.as_tensor(cols, device=device)]
        class_loss = F.cross_entropy(classes.float().transpose(1, 2), labels, self.class_weights.to(device))
        chosen = [masks[i, torch.as_tensor(rows, device=device)] for i, (rows, _) in enumerate(matches)]
        if sum(len(c) for c in chosen) == 0:
            return weights.class_weight * class_loss + 0 * masks.sum()
        predicted = torch.cat(chosen)[:, None].float()  # [M, 1, h, w]
        wanted = torch.cat([s.masks[torch.as_tensor(cols, device=device)] for s, (_, cols) in zip(segments, matches)])
        valid = torch.cat([s.valid[None].expand(len(cols), -1, -1) for s, (_, cols) in zip(segments, matches)])
        with torch.no_grad():
            points = uncertain_points(predicted, weights)
            wanted_points = point_sample(wanted[:, None], points)[:, 0]
            valid_points = point_sample(valid[:, None].float(), points)[:, 0]
        predicted_points = point_sample(predicted, points)[:, 0]
        bce = F.binary_cross_entropy_with_logits(predicted_points, wanted_points, reduction="none")
        mask_loss = (bce * valid_points).sum(-1) / valid_points.sum(-1).clamp(min=1)
        dice = dice_loss(predicted_points, wanted_points, valid_points)
        return (
            weights.class_weight * class_loss
            + weights.mask_weight * mask_loss.sum() / normaliser
            + weights.dice_weight * dice.sum() / normaliser
        )
