"""The one train / validate loop, used by train.py (every epoch and the final test), bench.py and the notebook.

Batches come either from a DataLoader (images) or from a `FeatureCache` (backbone features of a
frozen backbone, computed once by `cache_features`; the storage is dinokit/training/feature_cache.py):
the loop, the loss and the metrics are the same code either way, and for either task: a `Scoring`
(segmentation: cross-entropy and a confusion matrix; depth: SigLoss and the depth errors) is the
only part that knows what the targets are. `LoopSettings` carries what every pass needs besides
model and data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import config
from dinokit.depth.losses import gradient_loss, sig_loss
from dinokit.prediction.scores import predicted_classes
from dinokit.training.feature_cache import FeatureCache
from metrics import DEPTH_METRICS, ConfusionMatrix, DepthErrors
from utils import all_reduce_sum, autocast, is_main_process


class NonFiniteLossError(FloatingPointError):
    """The loss became nan/inf: training has diverged (too high a learning rate, fp16 overflow)."""


@dataclass
class EpochResult:
    """One pass over a split: the mean loss and the task's metrics (segmentation: pixacc, miou;
    depth: metrics.DEPTH_METRICS), named as metrics.csv's columns are."""

    loss: float  # segmentation: mean cross-entropy over all valid pixels; depth: mean batch SigLoss
    metrics: dict[str, float] = field(default_factory=dict)
    iou: list[float] = field(default_factory=list)  # segmentation: per class, nan where a class never occurs

    @property
    def miou(self) -> float:
        return self.metrics["miou"]

    @property
    def pixel_accuracy(self) -> float:
        return self.metrics["pixacc"]


def pixel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over non-ignored pixels (in fp32 whatever the autocast dtype), and their count.
    A batch with no valid pixel gives 0, not nan."""
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    valid = (target != ignore_index).sum()
    return loss_sum / valid.clamp(min=1), valid


@dataclass(frozen=True)
class DepthTarget:
    """What a depth run's loss and metrics read from the data (depth.json): the metres that count,
    and the weight of the gradient loss beside SigLoss."""

    min_depth: float
    max_depth: float
    gradient_loss: float = 0.0


@dataclass(frozen=True)
class LoopSettings:
    """What every pass over a split needs besides the model and the data. `depth` makes it a depth
    run (targets in metres, 0 = unmeasured); otherwise targets are class indices."""

    device: torch.device
    num_classes: int = 0
    ignore_index: int = config.IGNORE_INDEX
    amp_dtype: torch.dtype | None = None  # autocast dtype (utils.select_precision), None = fp32
    depth: DepthTarget | None = None

    @property
    def task(self) -> str:
        return "segmentation" if self.depth is None else "depth"


class SegmentationScoring:
    """Cross-entropy per pixel; pixel accuracy and mIoU from one confusion matrix over the split."""

    best = ("miou", "IoU", max)  # (metric the best checkpoint is chosen on, its file's name, better of two)

    def __init__(self, settings: LoopSettings):
        self.ignore_index = settings.ignore_index
        self.confmat = ConfusionMatrix(settings.num_classes, settings.ignore_index)

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and its weight in the split's mean (its valid pixels)."""
        return pixel_cross_entropy(logits, masks, self.ignore_index)

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        self.confmat.update(masks, predicted_classes(logits))

    def result(self, loss: float, device: torch.device) -> EpochResult:
        self.confmat.reduce_from_all_processes(device)  # under torchrun: every rank's counts
        scores = self.confmat.compute()
        return EpochResult(loss, {"pixacc": scores.pixel_accuracy, "miou": scores.miou}, scores.iou)


class DepthScoring:
    """SigLoss (+ the gradient loss) per batch; the depth errors of every image, averaged."""

    best = ("rmse", "RMSE", min)

    def __init__(self, settings: LoopSettings):
        self.target = settings.depth
        self.errors = DepthErrors()

    def valid(self, depth: torch.Tensor) -> torch.Tensor:
        return (depth >= self.target.min_depth) & (depth <= self.target.max_depth)

    def loss(self, pred: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (fp32) and its weight in the split's mean (its images)."""
        pred, valid = pred[:, 0].float(), self.valid(depth)
        loss = sig_loss(pred, depth, valid)
        if self.target.gradient_loss:
            loss = loss + self.target.gradient_loss * gradient_loss(pred, depth, valid)
        return loss, torch.tensor(depth.shape[0], device=depth.device)

    def update(self, pred: torch.Tensor, depth: torch.Tensor) -> None:
        valid = self.valid(depth)
        for image_pred, image_depth, image_valid in zip(pred[:, 0].float(), depth, valid):
            self.errors.update(image_pred, image_depth, image_valid)

    def result(self, loss: float, device: torch.device) -> EpochResult:
        errors = self.errors.compute(device)  # under torchrun: summed over the ranks
        return EpochResult(loss, {name: errors[name] for name in DEPTH_METRICS})


SCORINGS = {"segmentation": SegmentationScoring, "depth": DepthScoring}  # by task


def scoring_for(settings: LoopSettings) -> SegmentationScoring | DepthScoring:
    """The loss and metrics of the settings' task."""
    return SCORINGS[settings.task](settings)


def _run_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    total: int,
    settings: LoopSettings,
    *,
    desc: str,
    from_features: bool,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> EpochResult:
    """One pass: forward, loss, (with an optimizer) backward and step, and the split's metrics."""
    training = optimizer is not None
    device = settings.device
    model.train(training)
    scoring = scoring_for(settings)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    weight_total = torch.zeros((), dtype=torch.int64, device=device)
    progress = tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main_process())
    with torch.set_grad_enabled(training):
        for step, (inputs, targets) in enumerate(progress):
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, settings.amp_dtype):
                outputs = model(features=inputs, image_size=targets.shape[-2:]) if from_features else model(inputs)
            loss, weight = scoring.loss(outputs, targets)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"{desc}, step {step + 1}/{total}: loss is {loss.item()}")
            if training:
                _step(loss, optimizer, scaler)
                if after_step is not None:
                    after_step(loss.detach())
            loss_total += loss.detach() * weight
            weight_total += weight
            scoring.update(outputs.detach(), targets)
            if step % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
    all_reduce_sum(loss_total, weight_total)  # under torchrun each rank saw its own share of the split
    return scoring.result((loss_total / weight_total.clamp(min=1)).item(), device)


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():  # fp16: scale the loss so small gradients survive
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    epoch: int = 0,
    scaler: torch.amp.GradScaler | None = None,
    cache: FeatureCache | None = None,
    generator: torch.Generator | None = None,
    after_step: Callable[[torch.Tensor], None] | None = None,
    max_steps: int | None = None,
) -> EpochResult:
    """One pass of AdamW over the training split (the task's loss); metrics are of the (augmented) batches.
    With a built `cache`, the batches are its cached features in an order drawn from `generator`.
    `after_step(loss)` runs after every optimizer step with the step's (detached) loss: a per-step
    learning-rate schedule, per-step logging; `max_steps` ends the pass early (the last epoch of a
    run counted in steps)."""
    desc = f"Train {epoch}"
    if cache is not None:
        _require_built(cache)
        batches = cache.batches(loader.batch_size, shuffle=True, generator=generator)
        total = cache.num_batches(loader.batch_size)
    else:
        batches, total = loader, len(loader)
    if max_steps is not None and max_steps < total:
        batches, total = itertools.islice(batches, max_steps), max_steps
    return _run_epoch(
        model,
        batches,
        total,
        settings,
        desc=desc,
        from_features=cache is not None,
        optimizer=optimizer,
        scaler=scaler,
        after_step=after_step,
    )


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    settings: LoopSettings,
    *,
    desc: str = "Valid",
    cache: FeatureCache | None = None,
) -> EpochResult:
    """Loss and metrics over the whole split (segmentation: one confusion matrix, not per-batch means).
    With a built `cache` (frozen backbone), the head runs on the cached features alone."""
    if cache is None:
        return _run_epoch(model, loader, len(loader), settings, desc=desc, from_features=False)
    _require_built(cache)
    return _run_epoch(
        model,
        cache.batches(loader.batch_size),
        cache.num_batches(loader.batch_size),
        settings,
        desc=desc,
        from_features=True,
    )


@torch.no_grad()
def cache_features(cache: FeatureCache, model: nn.Module, loader: DataLoader, settings: LoopSettings) -> None:
    """One backbone pass over `loader` (which must not shuffle) filling `cache` in its order."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model.eval()
    for images, masks in tqdm(
        loader, desc=f"Caching {cache.name} features", leave=False, dynamic_ncols=True, disable=not is_main_process()
    ):
        with autocast(settings.device, settings.amp_dtype):
            features = model.extract_features(images.to(settings.device, non_blocking=True))
        # stored in the autocast dtype: the head would cast to it anyway
        cache.add(features, masks, count=len(loader.sampler), dtype=settings.amp_dtype or torch.float32)
    cache.finish()


def _require_built(cache: FeatureCache) -> None:
    if not cache.ready:
        raise RuntimeError(f"the {cache.name} feature cache is empty: call its build() first")
