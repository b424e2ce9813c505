"""Patch features of one block, and their principal components as colours: DINOv2's "what the
backbone sees" picture (visualize_features.py, notebooks/features.ipynb).

One PCA is fitted to all the patches of an input (every image or frame), so a colour means the
same direction in feature space in every image. The components are the top eigenvectors of the
features' covariance (`torch.linalg.eigh`: exact and deterministic; the covariance is only C x C),
each signed so that its largest loading is positive, so the same input gives the same colours on
every run. Colours are each component's projection min-max scaled over the whole input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeaturePca:
    """A fitted PCA: `mean` [C], `components` [k, C] (rows, by decreasing variance), `variance` [k]
    (in squared feature units), the range of each component's projection over the fitted input
    (`low`, `high` [k]), and `total_variance` (the covariance's trace: all C directions)."""

    mean: torch.Tensor
    components: torch.Tensor
    variance: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    total_variance: float = float("nan")

    def variance_shares(self) -> list[float]:
        """Each component's share of the features' total variance (0..1): what a figure reports,
        unlike `variance`, whose scale is the backbone's."""
        return (self.variance / self.total_variance).tolist()

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """`[..., C]` features -> `[..., k]` component scores."""
        return (features.float() - self.mean) @ self.components.T

    def colors(self, features: torch.Tensor) -> torch.Tensor:
        """`[..., C]` features -> `[..., k]` values in [0, 1], scaled by the fitted input's range."""
        return ((self.project(features) - self.low) / (self.high - self.low).clamp(min=1e-12)).clamp(0, 1)

    def to(self, device: torch.device | str) -> FeaturePca:
        moved = (t.to(device) for t in (self.mean, self.components, self.variance, self.low, self.high))
        return FeaturePca(*moved, self.total_variance)

    def scaled_to(self, features: torch.Tensor) -> FeaturePca:
        """The same components with `low`/`high` measured on `features` (all patches, when the
        components were fitted on a sample)."""
        scores = self.project(features)
        return FeaturePca(
            self.mean, self.components, self.variance, scores.min(0).values, scores.max(0).values, self.total_variance
        )


def fit_pca(features: torch.Tensor, components: int = 3) -> FeaturePca:
    """PCA of `[N, C]` features, on their device (float64 for a stable covariance; float32 on Apple
    MPS, which has no float64); the result is on that device too."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"PCA needs [N >= 2, C] features, got {tuple(features.shape)}")
    if not 1 <= components <= features.shape[1]:
        raise ValueError(f"components must be in [1, {features.shape[1]}], got {components}")
    data = features.to(torch.float32 if features.device.type == "mps" else torch.float64)
    mean = data.mean(0)
    centred = data - mean
    covariance = centred.T @ centred / (data.shape[0] - 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    top = vectors[:, -components:].flip(1).T  # [k, C], largest variance first
    signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
    top = top * signs
    scores = centred @ top.T
    return FeaturePca(
        mean.float(),
        top.float(),
        values[-components:].flip(0).float(),
        scores.min(0).values.float(),
        scores.max(0).values.float(),
        float(values.sum()),
    )


def foreground_split(first: torch.Tensor, threshold: float) -> tuple[torch.Tensor, bool]:
    """Foreground patches from the first component's scaled scores (`[...]` in [0, 1]), the
    official DINOv2 trick: `score > threshold` is foreground. The first component separates
    object from background but its sign is arbitrary; the side with more patches is taken to be the
    background (objects rarely fill most of a frame), so when `score > threshold` covers more than
    half of the patches the score is flipped (1 - score). Returns (mask, flipped)."""
    foreground = first > threshold
    flipped = bool(foreground.float().mean() > 0.5)
    if flipped:
        foreground = (1 - first) > threshold
    return foreground, flipped
