"""Segmentation metrics from a confusion matrix accumulated over a whole split, depth metrics, and
retrieval metrics.

Averaging per-batch mIoU is biased (a class absent from one batch drags that batch's mean);
accumulating pixel counts over the split and computing the ratios once is the standard
(torchvision references, mmseg) and what this module does.

Depth: the errors every monocular-depth paper reports (Eigen et al. 2014; BTS, AdaBins and Meta's
DINOv2 depth evaluation compute them the same way), each computed over one image's valid pixels
and averaged over the images of the split (`DepthErrors`) — the papers' convention, not a
pixel-pooled one.

Retrieval: mAP, mAP@k and recall@k of ranked results (`retrieval_scores`), as image-retrieval
papers define them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import config
from utils import all_reduce_sum


@dataclass
class SegmentationScores:
    pixel_accuracy: float  # correct pixels / valid (non-ignored) pixels
    miou: float  # mean IoU over classes present in ground truth or prediction
    iou: list[float]  # per class; nan for a class in neither ground truth nor prediction
    mean_class_accuracy: float = float("nan")  # mean over classes present in the ground truth of their recall
    fwiou: float = float("nan")  # frequency-weighted IoU: IoU weighted by each class's share of the ground truth
    class_accuracy: list[float] = field(
        default_factory=list
    )  # per class recall; nan where absent from the ground truth
    pixel_share: list[float] = field(default_factory=list)  # per class share of the valid ground-truth pixels


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
        target, prediction = target.flatten().long(), prediction.flatten().long()
        ignored = target == self.ignore_index
        if bool(((target >= n) & ~ignored).any()):
            raise ValueError(f"target holds class indices >= {n} that are not the ignore index {self.ignore_index}")
        # Ignored pixels go to an extra last bin instead of being filtered out (no masked copies).
        index = (target * n + prediction).masked_fill_(ignored, n * n)
        self.mat += torch.bincount(index, minlength=n * n + 1)[: n * n].reshape(n, n)

    def reduce_from_all_processes(self, device: torch.device) -> None:
        """Sum the counts of every rank (torchrun): each pixel of the split was seen by exactly one."""
        if self.mat is None:
            self.mat = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64, device=device)
        all_reduce_sum(self.mat)

    def compute(self) -> SegmentationScores:
        mat = (
            self.mat.double().cpu()
            if self.mat is not None
            else torch.zeros(self.num_classes, self.num_classes).double()
        )
        correct = mat.diag()
        total = mat.sum()
        truth = mat.sum(1)
        union = mat.sum(0) + truth - correct  # predicted + true - intersection
        iou = correct / union  # 0/0 -> nan for classes seen nowhere
        accuracy = correct / truth  # nan for classes absent from the ground truth
        present = union > 0
        share = truth / total if total > 0 else torch.full_like(truth, float("nan"))
        return SegmentationScores(
            pixel_accuracy=(correct.sum() / total).item() if total > 0 else float("nan"),
            miou=iou[present].mean().item() if present.any() else float("nan"),
            iou=iou.tolist(),
            mean_class_accuracy=accuracy[truth > 0].mean().item() if (truth > 0).any() else float("nan"),
            fwiou=(share[truth > 0] * iou[truth > 0]).sum().item() if total > 0 else float("nan"),
            class_accuracy=accuracy.tolist(),
            pixel_share=share.tolist(),
        )


class ArticleIoU:
    """The mIoU that the reference article's training loop prints, for comparison with ours.

    Per batch: IoU of every class = intersection / (union + eps) over the batch's pixels, so a
    class absent from the batch counts as 0; the batch's mIoU is the mean over all classes; the
    reported figure is the mean over batches (the ESPNet `IOUEval` of DebuggerCafe's segmentation
    code, without its off-by-one batch count). It depends on the batch size and on how many
    classes a batch holds: a batch cannot score above (classes present) / (all classes)."""

    def __init__(self, num_classes: int, ignore_index: int = config.IGNORE_INDEX, batch_images: int = 2):
        self.num_classes, self.ignore_index, self.batch_images = num_classes, ignore_index, batch_images
        self.batch = ConfusionMatrix(num_classes, ignore_index)
        self.in_batch = 0
        self.total = torch.zeros(2, dtype=torch.float64)  # sum of batch mIoUs, number of batches

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """One image (or one batch of images of one size); a batch closes every `batch_images` images."""
        self.batch.update(target, prediction)
        self.in_batch += target.shape[0] if target.dim() == 3 else 1
        if self.in_batch >= self.batch_images:
            self._close_batch()

    def _close_batch(self) -> None:
        mat = self.batch.mat.double().cpu()
        inter = mat.diag()
        union = mat.sum(0) + mat.sum(1) - inter
        self.total += torch.tensor([(inter / (union + _EPS)).mean().item(), 1.0], dtype=torch.float64)
        self.batch, self.in_batch = ConfusionMatrix(self.num_classes, self.ignore_index), 0

    def compute(self, device: torch.device | str = "cpu") -> float:
        """Mean over all batches (of every rank under torchrun); a last, partial batch counts as one."""
        if self.in_batch:
            self._close_batch()
        total = self.total.to(device)
        all_reduce_sum(total)
        return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


_EPS = float(torch.finfo(torch.float64).eps)  # numpy's np.spacing(1), as the article's loops use


DEPTH_METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")
LOWER_IS_BETTER = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"}


def depth_errors(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """One image's errors over its valid pixels (`pred`, `truth`: 1-D metres, truth > 0, pred > 0).
    delta_k: share of pixels with max(pred/truth, truth/pred) < 1.25^k; silog: 100 x the standard
    deviation of log(pred) - log(truth) (scale-invariant log error, as BTS reports it)."""
    pred, truth = pred.double(), truth.double()
    ratio = torch.maximum(pred / truth, truth / pred)
    log_error = pred.log() - truth.log()
    return {
        "abs_rel": ((pred - truth).abs() / truth).mean().item(),
        "sq_rel": ((pred - truth) ** 2 / truth).mean().item(),
        "rmse": ((pred - truth) ** 2).mean().sqrt().item(),
        "rmse_log": (log_error**2).mean().sqrt().item(),
        "log10": (pred.log10() - truth.log10()).abs().mean().item(),
        "silog": 100 * ((log_error**2).mean() - log_error.mean() ** 2).clamp(min=0).sqrt().item(),
        "delta1": (ratio < 1.25).double().mean().item(),
        "delta2": (ratio < 1.25**2).double().mean().item(),
        "delta3": (ratio < 1.25**3).double().mean().item(),
    }


class DepthErrors:
    """`depth_errors` of every image of a split, averaged over the images (images without a valid
    pixel are counted apart, not averaged in). Under torchrun, `compute` sums over the processes."""

    def __init__(self):
        self.totals = torch.zeros(len(DEPTH_METRICS), dtype=torch.float64)
        self.images = 0
        self.empty = 0

    def update(self, pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> None:
        """One image: predicted and true depth (metres, same shape) and the pixels that count."""
        pred, truth = pred[valid], truth[valid]
        if truth.numel() == 0:
            self.empty += 1
            return
        errors = depth_errors(pred.clamp(min=1e-6), truth)
        self.totals += torch.tensor([errors[name] for name in DEPTH_METRICS], dtype=torch.float64)
        self.images += 1

    def compute(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """The means over every image (of every rank: summed on `device`, which NCCL wants on the GPU)."""
        counts = torch.tensor([self.images, self.empty], dtype=torch.float64, device=device)
        totals = self.totals.to(device)
        all_reduce_sum(counts, totals)
        images = int(counts[0])
        means = (totals / max(images, 1)).tolist()
        return {**dict(zip(DEPTH_METRICS, means)), "images": images, "images_without_depth": int(counts[1])}


def retrieval_scores(relevant: np.ndarray, relevant_totals: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval metrics over queries, each with its ranked results marked relevant or not
    (`relevant`: `[Q, R]` bool, best first, over the whole collection for mAP) and its number of
    relevant items in the collection (`relevant_totals`; queries with none are left out):

    - mAP: the mean over queries of average precision, sum of precision@i at each relevant rank
      i, divided by the query's relevant items;
    - mAP@k: the same over the first k ranks, divided by min(relevant items, k);
    - recall@k: the share of queries with a relevant item in the first k (the "R@k" of retrieval
      papers; with the training split as collection, recall@1 is 1-NN accuracy)."""
    keep = relevant_totals > 0
    relevant, totals = relevant[keep].astype(np.float64), relevant_totals[keep].astype(np.float64)
    if not len(totals):
        return {"queries": 0}
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_at = np.cumsum(relevant, axis=1) / ranks
    scores = {"queries": int(len(totals)), "map": float(np.mean((precision_at * relevant).sum(1) / totals))}
    for k in ks:
        top = relevant[:, :k]
        scores[f"map@{k}"] = float(np.mean((precision_at[:, :k] * top).sum(1) / np.minimum(totals, k)))
        scores[f"recall@{k}"] = float(np.mean(top.any(axis=1)))
    return scores
