"""The one train / validate loop, used by train.py (every epoch and the final test), bench.py and the
notebook; and a training run's epochs (`Run`, `fit`): checkpoints, metrics.csv and curves, feature
caches and TensorBoard, the same for every task.

Batches come either from a DataLoader (images) or from a `FeatureCache` (backbone features of a
frozen backbone, computed once by `cache_features`; the storage is dinokit/training/feature_cache.py):
the loop is the same code either way, and for every task: the task's `Scoring` (dinokit/tasks/;
segmentation: cross-entropy and a confusion matrix; depth: SigLoss and the depth errors) is the
only part that knows what the targets are. `LoopSettings` carries what every pass needs besides
model and data.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import RunCheckpoints
from cli import random_init_note
from datasets import PairedDataset, ViewsDataset, epoch_seed, set_epoch, shard_indices
from dinokit.backbones.loading import weights_digest
from dinokit.data.file_kinds import fingerprint_files
from dinokit.data.resize import eval_transform
from dinokit.prediction.modes import InferenceMode
from dinokit.runs.reports import save_plots, write_csv
from dinokit.runs.resume import steps_done
from dinokit.runs.tensorboard_log import TrainingBoard
from dinokit.tasks.task import Scoring, Task
from dinokit.training.feature_cache import FeatureCache, default_cache_budget
from dinokit.training.schedules import StepSchedule
from inference import Predictor
from model import DenseModel
from utils import all_reduce_sum, autocast, is_main_process, rank, sync_buffers, world_size


class NonFiniteLossError(FloatingPointError):
    """The loss became nan/inf: training has diverged (too high a learning rate, fp16 overflow)."""


@dataclass
class EpochResult:
    """One pass over a split: the mean loss and the task's metrics, named as metrics.csv's columns
    are (segmentation: pixacc, miou; depth: metrics.DEPTH_METRICS)."""

    loss: float  # the mean of the task's loss over the split (segmentation: over its valid pixels)
    metrics: dict[str, float] = field(default_factory=dict)
    iou: list[float] = field(default_factory=list)  # segmentation: per class, nan where a class never occurs


@dataclass(frozen=True)
class LoopSettings:
    """What every pass over a split needs besides the model and the data: the device, the task's
    `scoring` (a new `Scoring` per pass: its loss and metrics, dinokit/tasks/) and the precision."""

    device: torch.device
    scoring: Callable[[], Scoring]
    amp_dtype: torch.dtype | None = None  # autocast dtype (utils.select_precision), None = fp32


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
    scoring = settings.scoring()
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
    metrics, per_class = scoring.result(device)
    return EpochResult((loss_total / weight_total.clamp(min=1)).item(), metrics, per_class)


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


# -- a training run: its epochs, checkpoints, caches and logs (train.py builds it) ------------------


@dataclass
class Run:
    """Everything one training run is made of, built by `build_run`."""

    args: argparse.Namespace
    task: Task
    out_dir: Path
    imgsz: tuple[int, int]  # --imgsz rounded up to the patch size
    total_steps: int  # optimizer steps of the whole run (--steps, or --epochs x batches per epoch)
    spec: Any  # the task's dataset description: classes.json / VOC, or an RGB-D folder's depth.json
    settings: LoopSettings
    train_loader: torch.utils.data.DataLoader
    valid_loader: torch.utils.data.DataLoader
    model: DenseModel
    train_model: torch.nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped per epoch (multistep) or per optimizer step
    scaler: torch.amp.GradScaler
    checkpoints: RunCheckpoints
    valid_cache: FeatureCache | None = None  # frozen backbone: validation features computed once
    train_cache: FeatureCache | None = None  # --train-views: K views of every training image

    def close(self, finished: bool) -> None:
        """Release the caches; an unfinished run keeps its resumable training views on disk."""
        for cache in (self.valid_cache, self.train_cache):
            if cache is not None:
                cache.close(keep=not finished)


def build_caches(
    args: argparse.Namespace,
    task: Task,
    model: DenseModel,
    train_set: PairedDataset,
    imgsz: tuple[int, int],
    amp_dtype: torch.dtype | None,
    out_dir: Path,
) -> tuple[FeatureCache | None, FeatureCache | None]:
    """The frozen backbone's feature caches: validation (unless --no-val-cache) and --train-views."""
    if args.fine_tune:
        return None, None
    budget = int(args.cache_ram_gb * 1e9) if args.cache_ram_gb is not None else default_cache_budget()
    targets = task.target_dtype
    valid = None if args.no_val_cache else FeatureCache("valid", budget, out_dir, rank=rank(), target_dtype=targets)
    train = None
    if args.train_views:
        key = train_views_key(args, model, train_set, imgsz, amp_dtype)
        train = FeatureCache(
            "train_views", budget, out_dir, views=args.train_views, rank=rank(), key=key, target_dtype=targets
        )
    return valid, train


def train_views_key(
    args: argparse.Namespace,
    model: DenseModel,
    train_set: PairedDataset,
    imgsz: tuple[int, int],
    amp_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """What cached training views depend on; a cache left in the run folder under another key is rebuilt."""
    return {
        "format": 1,
        "views": args.train_views,
        "recipe": args.recipe,
        "imgsz": list(imgsz),
        "seed": args.seed,
        "pairs": fingerprint_files(path for pair in train_set.pairs for path in pair),
        "arch": {k: v for k, v in model.arch.items() if k != "num_classes"},
        "weights": weights_digest(model.backbone),
        "dtype": str(amp_dtype or torch.float32),
        "rank": rank(),
        "world_size": world_size(),
    }


def fit(run: Run) -> None:
    """Train from the epoch after the last recorded one to --epochs, recording each (RunCheckpoints)."""
    args, settings = run.args, run.settings
    if run.train_cache is not None:
        prepare_train_views(run)
    shuffle = torch.Generator()  # order (and views) of cached training features, reseeded every epoch
    step = steps_done(run.checkpoints.history, len(run.train_loader))
    board = open_board(run, step)
    after_step = step_hook(run, board, step)
    try:
        for epoch in range(run.checkpoints.epochs_done, args.epochs):
            print(f"EPOCH: {epoch + 1}/{args.epochs}")
            started = time.perf_counter()
            set_epoch(run.train_loader, epoch)
            shuffle.manual_seed(epoch_seed(args.seed, epoch) + rank())
            train_result = train_one_epoch(
                run.train_model,
                run.train_loader,
                run.optimizer,
                settings,
                epoch=epoch + 1,
                scaler=run.scaler,
                cache=run.train_cache,
                generator=shuffle,
                after_step=after_step,
                max_steps=run.total_steps - step,
            )
            step += min(len(run.train_loader), run.total_steps - step)
            sync_buffers(run.model)  # every rank validates, and rank 0 saves, the same model
            valid_result = validate_split(run, "Valid")
            if not isinstance(run.scheduler, StepSchedule):
                run.scheduler.step()
            seconds = time.perf_counter() - started
            print(run.task.epoch_line("Train", train_result.loss, train_result.metrics))
            print(run.task.epoch_line("Valid", valid_result.loss, valid_result.metrics))
            end_epoch(run, epoch, step, train_result, valid_result, seconds)
            if board is not None:
                board.log_epoch(epoch + 1, train_result, valid_result)
                board.log_examples(epoch + 1, run_predictor(run), last=epoch + 1 == args.epochs)
    finally:
        if board is not None:
            board.close()
    run.checkpoints.save_final(args.epochs)
    passes = torch.tensor(run.model.backbone_images)
    all_reduce_sum(passes)
    print(
        f"Backbone passes: {int(passes):,} images"
        + (f" ({world_size()} processes)" if world_size() > 1 else "")
        + " (images run through the backbone in this run; cached features take none)"
    )


def prepare_train_views(run: Run) -> None:
    """--train-views K: reuse a complete cache of this run's views, else compute them now, K per
    image of this process's shard (K=1: the un-augmented image), storage reserved up front."""
    args, base = run.args, run.train_loader.dataset
    views = args.train_views
    source = copy.copy(base)
    if views == 1:
        source.transform = eval_transform(run.imgsz, run.model.mean, run.model.std)
    dataset = ViewsDataset(source, shard_indices(len(base), rank(), world_size()), views)
    width, height = run.imgsz
    shapes = (
        len(dataset),
        run.model.feature_shape(height, width),
        run.settings.amp_dtype or torch.float32,
        (height, width),
    )
    if run.train_cache.reuse(*shapes):
        return
    what = "un-augmented images" if views == 1 else f"{views} augmented views per image"
    print(
        f"Caching training features: {what}, {len(dataset)} backbone passes"
        + (f" on this process's {len(dataset) // views} images" if world_size() > 1 else "")
    )
    run.train_cache.allocate(*shapes)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=False,
        num_workers=args.workers,
        pin_memory=run.settings.device.type == "cuda",
    )
    cache_features(run.train_cache, run.model, loader, run.settings)


def step_hook(run: Run, board: TrainingBoard | None, steps_before: int) -> Callable[[torch.Tensor], None]:
    """What runs after every optimizer step: a per-step schedule's step, the model's own schedule
    (`training_progress`), and the step's loss and learning rate for TensorBoard (the rate the step
    used: read before the schedule moves it)."""
    per_step = isinstance(run.scheduler, StepSchedule)
    counter = itertools.count(steps_before + 1)
    run.model.training_progress(steps_before, run.total_steps)

    def after_step(loss: torch.Tensor) -> None:
        step = next(counter)
        if board is not None:
            board.log_step(step, loss, run.optimizer.param_groups[0]["lr"])
        if per_step:
            run.scheduler.step()
        run.model.training_progress(step, run.total_steps)

    return after_step


def open_board(run: Run, steps_before: int) -> TrainingBoard | None:
    """--tensorboard: rank 0's writer into <run>/tensorboard (a resumed run drops the events after its checkpoint)."""
    if not run.args.tensorboard or not is_main_process():
        return None
    dataset = run.valid_loader.dataset
    examples = [
        (dataset.pairs[i][0].stem, *dataset.load_pair(i)) for i in range(run.args.tensorboard_images)[: len(dataset)]
    ]
    board = TrainingBoard(
        run.out_dir,
        classes=run.checkpoints.info.get("classes", []),
        examples=examples,
        draw=run.task.drawer(run.checkpoints.info),
        every=run.args.tensorboard_every,
        purge_step=steps_before if run.checkpoints.epochs_done else None,
    )
    print(f"TensorBoard: {board.log_dir} (tensorboard --logdir {run.out_dir.parent})")
    return board


def validate_split(run: Run, desc: str) -> EpochResult:
    """The validation split's metrics; a frozen backbone's features are computed on the first call only."""
    if run.valid_cache is not None and not run.valid_cache.ready:
        cache_features(run.valid_cache, run.model, run.valid_loader, run.settings)
    return validate(run.model, run.valid_loader, run.settings, desc=desc, cache=run.valid_cache)


def end_epoch(
    run: Run, epoch: int, step: int, train_result: EpochResult, valid_result: EpochResult, seconds: float
) -> None:
    """Record the epoch (checkpoints, metrics.csv, curves) and report it."""
    row = {"epoch": epoch + 1, "step": step}
    for split, result in (("train", train_result), ("valid", valid_result)):
        row[f"{split}_loss"] = result.loss
        row.update({f"{split}_{name}": value for name, value in result.metrics.items()})
    row.update(lr=run.optimizer.param_groups[0]["lr"], seconds=seconds)
    for name, value in run.checkpoints.end_epoch(row).items():
        print(f"Best validation {name}: {value:.4f}\nSaved best model for epoch: {epoch + 1}")
    if is_main_process():
        write_csv(run.checkpoints.history, run.out_dir / "metrics.csv")
        save_plots(run.checkpoints.history, run.out_dir, run.task.curves, title=random_init_note(run.args))
    print(f"LR for next epoch: {run.scheduler.get_last_lr()}  ({seconds:.1f} s)")
    print("-" * 50)


def run_predictor(run: Run) -> Predictor:
    """The model being trained, predicting as inference will (whole image at the training size)."""
    return Predictor(
        run.model,
        run.checkpoints.info,
        device=run.settings.device,
        amp_dtype=run.settings.amp_dtype,
        mode=InferenceMode(imgsz=run.imgsz),
    )
