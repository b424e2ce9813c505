"""The depth losses a head trains with (train.py --task depth), written from Meta's DINOv2 depth
code (dinov2/eval/depth/models/losses/), over the pixels that count (`valid`).

- `sig_loss`: Meta's SigLoss (from AdaBins), sqrt(Var(g) + 0.15 mean(g)^2) with
  g = log(pred + eps) - log(truth + eps) over every valid pixel of the batch: scale-invariant
  log error plus a share of the absolute scale. Meta's optional warm-up (the mean term alone for
  the first 100 steps) is left out.
- `gradient_loss`: Meta's GradientLoss (from MegaDepth): the log difference's changes two pixels
  apart, vertically and horizontally, at four scales (every 1st, 2nd, 4th, 6th pixel), over valid
  pairs, each scale divided by its valid pixels. Meta's code slices the first two dimensions of
  its `[B, 1, H, W]` tensors — batch and channel, not rows and columns — so its "gradients" run
  across the images of a batch; here they run along each image's rows and columns.
"""

from __future__ import annotations

import torch

EPS = 1e-3  # Meta's: keeps log() away from 0 (and the gradient from exploding)
MEAN_SHARE = 0.15  # Meta's weight of the squared mean log error (lambda = 0.85 in Eigen's terms)
GRADIENT_STRIDES = (1, 2, 4, 6)


def sig_loss(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Meta's SigLoss over the valid pixels of a batch (module docstring); 0 without any."""
    g = torch.log(pred[valid].float() + EPS) - torch.log(truth[valid].float() + EPS)
    if g.numel() < 2:  # no variance to speak of: nothing to learn from this batch
        return pred.sum() * 0.0
    return torch.sqrt(torch.var(g) + MEAN_SHARE * g.mean() ** 2)


def gradient_loss(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Multi-scale gradient matching of log depth along rows and columns (module docstring);
    `pred`, `truth`, `valid`: `[B, H, W]` (or `[B, 1, H, W]`)."""
    total = pred.sum() * 0.0
    for stride in GRADIENT_STRIDES:
        p, t, m = (x[..., ::stride, ::stride] for x in (pred.float(), truth.float(), valid))
        count = m.sum()
        if count == 0:
            continue
        diff = torch.where(m, torch.log(p + EPS) - torch.log(t.clamp(min=0) + EPS), torch.zeros_like(p))
        vertical = (diff[..., :-2, :] - diff[..., 2:, :]).abs() * (m[..., :-2, :] & m[..., 2:, :])
        horizontal = (diff[..., :, :-2] - diff[..., :, 2:]).abs() * (m[..., :, :-2] & m[..., :, 2:])
        total = total + (vertical.sum() + horizontal.sum()) / count
    return total
