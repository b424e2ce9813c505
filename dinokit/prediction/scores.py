"""Class scores -> class indices: the one argmax every prediction, metric and export goes through."""

from __future__ import annotations

import torch


def predicted_classes(scores: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The class of highest score along `dim`: argmax, first index on ties. `max(dim).indices` is
    the same and about 4x faster than `argmax(dim)` over the class axis of [B, C, H, W] on CPU."""
    return scores.max(dim).indices
