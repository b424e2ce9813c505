"""Segmentation heads: the papers' linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv over the concatenated patch features: DINOv2's linear probe ("BNHead");
    with `dropout`, DINOv3's (Dropout2d on the features first, in training only)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        if self.training and batch * height * width == 1 and type(self.norm) is nn.BatchNorm2d:
            # One value per channel (one image with a 1x1 token grid, e.g. a last batch of one at
            # --imgsz 14) has no batch statistics: normalise it with the running ones instead of
            # failing. SyncBatchNorm pools the values of every process and needs no such care.
            norm = self.norm
            normed = F.batch_norm(
                features, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
            )
            return self.classifier(normed)
        return self.classifier(self.norm(self.dropout(features)))
