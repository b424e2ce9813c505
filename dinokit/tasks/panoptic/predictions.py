"""From EoMT's queries to what a user gets, at the image's size: a panoptic map (each pixel to at most
one segment, in the targets' encoding), each segment's score, and the thing detections mask AP
scores (overlapping masks, each with a score); and per-pixel class scores for semantic segmentation.

Panoptic fusion is EoMT's (after Mask2Former): queries whose best class is an object with
probability > 0.8 compete for pixels by probability x mask probability; a query keeps the pixels it
wins inside its own mask (>= 0.5) if they are at least 80 % of that mask; a stuff class's queries make
one segment. Instances are Mask2Former's: the 100 best (query, thing class) pairs by class
probability x the mean mask probability inside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dinokit.tasks.panoptic.coco import LABEL_DIVISOR, VOID

SCORE_THRESHOLD = 0.8
OVERLAP_THRESHOLD = 0.8
TOP_INSTANCES = 100


@dataclass
class ObjectPrediction:
    """One image's prediction."""

    panoptic: np.ndarray  # [H, W] int32: class * LABEL_DIVISOR + instance, VOID where no segment
    scores: dict[int, float] = field(default_factory=dict)  # each panoptic value's score
    instances: list[tuple[int, dict, float]] = field(default_factory=list)  # (class, COCO RLE, score)

    @property
    def classes(self) -> np.ndarray:
        """`[H, W]` class per pixel (-1: none)."""
        return np.where(self.panoptic >= 0, self.panoptic // LABEL_DIVISOR, -1)


def panoptic_map(
    masks: torch.Tensor,
    classes: torch.Tensor,
    isthing: list[bool],
    score_threshold: float = SCORE_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
) -> tuple[torch.Tensor, dict[int, float]]:
    """EoMT's panoptic fusion of one image's `[K, H, W]` mask logits and `[K, C + 1]` class logits."""
    num_classes = classes.shape[-1] - 1
    scores, labels = classes.float().softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > score_threshold)
    out = torch.full(masks.shape[-2:], VOID, dtype=torch.int32, device=masks.device)
    segment_scores: dict[int, float] = {}
    if not keep.any():
        return out, segment_scores
    probs = masks[keep].float().sigmoid()
    kept_scores, kept_labels = scores[keep], labels[keep].tolist()
    owner = (kept_scores[:, None, None] * probs).argmax(0)
    instances = [0] * num_classes
    for k, label in enumerate(kept_labels):
        own = probs[k] >= 0.5
        won = owner == k
        final = own & won
        own_area, won_area = int(own.sum()), int(won.sum())
        if own_area == 0 or won_area == 0 or not bool(final.any()) or won_area / own_area < overlap_threshold:
            continue
        if isthing[label]:
            instances[label] += 1
            if instances[label] >= LABEL_DIVISOR:
                continue
            value = label * LABEL_DIVISOR + instances[label]
        else:
            value = label * LABEL_DIVISOR
        out[final] = value
        segment_scores[value] = max(segment_scores.get(value, 0.0), float(kept_scores[k]))
    present = set(torch.unique(out).tolist())
    return out, {v: s for v, s in segment_scores.items() if v in present}


def instance_detections(
    masks: torch.Tensor, classes: torch.Tensor, isthing: list[bool], top: int = TOP_INSTANCES
) -> list[tuple[int, dict, float]]:
    """Mask2Former's instance inference: (class, RLE, score) of the best (query, thing class) pairs."""
    from pycocotools import mask as coco_mask

    probs = classes.float().softmax(-1)[:, :-1]
    things = torch.tensor(isthing, dtype=torch.bool, device=probs.device)
    probs = probs * things
    flat = probs.flatten()
    top = min(top, int((flat > 0).sum()))
    if top == 0:
        return []
    best, index = flat.topk(top)
    queries, labels = index // probs.shape[1], index % probs.shape[1]
    chosen = masks[queries].float()
    binary = chosen > 0
    mask_scores = (chosen.sigmoid() * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
    scores = (best * mask_scores).tolist()
    encoded = coco_mask.encode(np.asfortranarray(binary.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
    return [(int(c), rle, s) for c, rle, s in zip(labels.tolist(), encoded, scores)]


def semantic_scores(masks: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """EoMT's semantic inference: `[B, C, H, W]` = sum over queries of class probability x mask probability."""
    return torch.einsum("bqc,bqhw->bchw", classes.float().softmax(-1)[..., :-1], masks.float().sigmoid())


def predict_objects(masks: torch.Tensor, classes: torch.Tensor, isthing: list[bool]) -> ObjectPrediction:
    """One image's `ObjectPrediction` from its mask logits at the image's size."""
    panoptic, scores = panoptic_map(masks, classes, isthing)
    return ObjectPrediction(panoptic.cpu().numpy(), scores, instance_detections(masks, classes, isthing))
