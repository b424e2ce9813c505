"""Depth's loss and scores: SigLoss (+ the gradient loss) per batch, and the depth errors of every
image averaged (metrics.DepthErrors), per epoch and at full resolution."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dinokit.tasks.depth.files import DepthSpec, eval_crop_mask, valid_depth
from dinokit.tasks.depth.losses import gradient_loss, sig_loss
from metrics import DEPTH_METRICS, DepthErrors


class DepthScoring:
    """SigLoss (+ `gradient_weight` x the gradient loss) per batch over the metres that count
    (`min_depth`..`max_depth`, 0 = unmeasured); the depth errors of every image, averaged."""

    def __init__(self, min_depth: float, max_depth: float, gradient_weight: float = 0.0):
        self.min_depth, self.max_depth, self.gradient_weight = min_depth, max_depth, gradient_weight
        self.errors = DepthErrors()

    def valid(self, depth: torch.Tensor) -> torch.Tensor:
        return (depth >= self.min_depth) & (depth <= self.max_depth)

    def loss(self, pred: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (fp32) and its weight in the split's mean (its images)."""
        pred, valid = pred[:, 0].float(), self.valid(depth)
        loss = sig_loss(pred, depth, valid)
        if self.gradient_weight:
            loss = loss + self.gradient_weight * gradient_loss(pred, depth, valid)
        return loss, torch.tensor(depth.shape[0], device=depth.device)

    def update(self, pred: torch.Tensor, depth: torch.Tensor) -> None:
        valid = self.valid(depth)
        for image_pred, image_depth, image_valid in zip(pred[:, 0].float(), depth, valid):
            self.errors.update(image_pred, image_depth, image_valid)

    def result(self, device: torch.device) -> tuple[dict[str, float], list[float]]:
        errors = self.errors.compute(device)  # under torchrun: summed over the ranks
        return {name: errors[name] for name in DEPTH_METRICS}, []


class DepthEvaluator:
    """The depth errors of every image on the pixels that count: measured, within the dataset's
    range, inside its evaluation crop."""

    def __init__(self, spec: DepthSpec):
        self.spec, self.errors = spec, DepthErrors()

    def update(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        valid = valid_depth(truth.cpu().numpy(), self.spec) & eval_crop_mask(tuple(truth.shape), self.spec.eval_crop)
        self.errors.update(prediction, truth, torch.from_numpy(np.asarray(valid)).to(truth.device))

    def result(self, device: torch.device) -> dict[str, Any]:
        return self.errors.compute(device)


def report_lines(errors: dict[str, Any], ms_per_image: float) -> list[str]:
    """The depth metrics as evaluate.py prints them (lower is better up to silog; deltas: higher)."""
    shown = " | ".join(f"{name} {errors[name]:.4f}" for name in DEPTH_METRICS)
    return [f"{shown}  ({errors['images']} images, {ms_per_image:.0f} ms/image)"]
