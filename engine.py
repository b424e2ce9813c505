"""The one train / validate loop, used by train.py (every epoch and the final test) and the notebook."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from metrics import ConfusionMatrix


@dataclass
class EpochResult:
    loss: float  # mean cross-entropy over all valid pixels of the split
    pixel_accuracy: float
    miou: float
    iou: list[float] = field(default_factory=list)  # per class, nan where a class never occurs


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over non-ignored pixels, and their count. A batch with no valid pixel gives 0, not nan."""
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    valid = (target != ignore_index).sum()
    return loss_sum / valid.clamp(min=1), valid


def _run_epoch(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    ignore_index: int,
    optimizer: torch.optim.Optimizer | None,
    desc: str,
) -> EpochResult:
    training = optimizer is not None
    model.train(training)
    confmat = ConfusionMatrix(num_classes, ignore_index)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    pixels_total = torch.zeros((), dtype=torch.int64, device=device)
    progress = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
    with torch.set_grad_enabled(training):
        for step, (images, masks) in enumerate(progress):
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            logits = model(images)
            loss, valid = pixel_cross_entropy(logits, masks, ignore_index)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            loss_total += loss.detach() * valid
            pixels_total += valid
            confmat.update(masks, logits.detach().argmax(1))
            if step % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
    scores = confmat.compute()
    return EpochResult(
        loss=(loss_total / pixels_total.clamp(min=1)).item(),
        pixel_accuracy=scores.pixel_accuracy,
        miou=scores.miou,
        iou=scores.iou,
    )


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    num_classes: int,
    ignore_index: int = 255,
    epoch: int = 0,
) -> EpochResult:
    """One pass of AdamW/cross-entropy over the training split; metrics are of the augmented batches."""
    return _run_epoch(model, loader, device, num_classes, ignore_index, optimizer, f"Train {epoch}")


@torch.no_grad()
def validate(
    model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, ignore_index: int = 255, desc: str = "Valid"
) -> EpochResult:
    """Loss, pixel accuracy and mIoU over the whole split (one confusion matrix, not per-batch means)."""
    return _run_epoch(model, loader, device, num_classes, ignore_index, None, desc)
