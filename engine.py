"""The one train / validate loop, used by train.py (every epoch and the final test), bench.py and the notebook.

Batches come either from a DataLoader (images) or from a `FeatureCache` (backbone features of a
frozen backbone, computed once by an explicit `build` call): the loop, the loss and the metrics
are the same code either way. `LoopSettings` carries what every pass needs besides model and data.
"""
from __future__ import annotations

import itertools

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import config
from distributed import all_reduce_sum, is_main_process, rank
from files import format_bytes, temp_path
from metrics import ConfusionMatrix
from runtime import autocast


class NonFiniteLossError(FloatingPointError):
    """The loss became nan/inf: training has diverged (too high a learning rate, fp16 overflow)."""


@dataclass
class EpochResult:
    loss: float  # mean cross-entropy over all valid pixels of the split
    pixel_accuracy: float
    miou: float
    iou: list[float] = field(default_factory=list)  # per class, nan where a class never occurs


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over non-ignored pixels (in fp32 whatever the autocast dtype), and their count.
    A batch with no valid pixel gives 0, not nan."""
    loss_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    valid = (target != ignore_index).sum()
    return loss_sum / valid.clamp(min=1), valid


@dataclass(frozen=True)
class LoopSettings:
    """What every pass over a split needs besides the model and the data."""

    device: torch.device
    num_classes: int
    ignore_index: int = config.IGNORE_INDEX
    amp_dtype: torch.dtype | None = None  # autocast dtype (runtime.select_precision), None = fp32


class FeatureCache:
    """Backbone features (and masks) of a split, computed once and reused every epoch.

    Valid only while the backbone is frozen and the split's transforms are deterministic: then an
    epoch's backbone pass would recompute exactly the same tensors. Kept in RAM when they fit in
    `memory_budget` bytes, else in a file-backed tensor under `disk_dir` (deleted by `close`).
    """

    def __init__(self, name: str, memory_budget: int, disk_dir: str | Path):
        self.name = name
        self.memory_budget = memory_budget
        self.disk_dir = Path(disk_dir)
        self.features: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.file: Path | None = None
        self.ready = False

    def _allocate(self, count: int, feature_shape: tuple[int, ...], dtype: torch.dtype, mask_shape: tuple[int, ...]) -> None:
        feature_bytes = count * math.prod(feature_shape) * dtype.itemsize
        total = feature_bytes + count * math.prod(mask_shape)
        if total <= self.memory_budget:
            self.features = torch.empty((count, *feature_shape), dtype=dtype)
            where = "memory"
        else:
            self.file = self._reserve_file(feature_bytes)
            flat = torch.from_file(str(self.file), shared=True, size=count * math.prod(feature_shape), dtype=dtype)
            self.features = flat.view(count, *feature_shape)
            where = f"a file ({self.file}; memory budget {format_bytes(self.memory_budget)})"
        self.masks = torch.empty((count, *mask_shape), dtype=torch.uint8)
        shape = "x".join(map(str, feature_shape))
        print(f"{self.name} feature cache: {count} images x {shape} {str(dtype).removeprefix('torch.')} "
              f"= {format_bytes(total)} in {where}")

    def _reserve_file(self, size: int) -> Path:
        """A cache file with all `size` bytes allocated on disk up front. A sparse file would be
        memory-mapped, and a full disk would then kill the process with SIGBUS mid-write (exit 135,
        no message); reserving first turns that into an error before anything is computed."""
        free = shutil.disk_usage(self.disk_dir if self.disk_dir.exists() else self.disk_dir.parent).free
        hint = "free space, raise --cache-ram-gb (to keep it in memory), or " + (
            "use --no-val-cache" if self.name == "valid" else "drop --cache-train-features")
        if size > free:
            raise OSError(f"{self.disk_dir}: the {self.name} feature cache needs {format_bytes(size)} on disk but "
                          f"{format_bytes(free)} are free; {hint}")
        path = temp_path(self.disk_dir / f"{self.name}_features.rank{rank()}.cache")
        try:
            with open(path, "r+b") as handle:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(handle.fileno(), 0, size)
                else:  # no fallocate (macOS): writing the zeros reserves the blocks too
                    for _ in range(0, size, 1 << 24):
                        handle.write(bytes(min(1 << 24, size - handle.tell())))
        except OSError as err:
            path.unlink(missing_ok=True)
            raise OSError(f"{path.parent}: the {self.name} feature cache ({format_bytes(size)}) could not be "
                          f"reserved on disk ({err.strerror or err}); {hint}") from err
        return path

    @torch.no_grad()
    def build(self, model: nn.Module, loader: DataLoader, settings: LoopSettings) -> None:
        """One backbone pass over `loader` (which must not shuffle) filling the cache in its order."""
        model = getattr(model, "module", model)  # unwrap DistributedDataParallel
        model.eval()
        offset = 0
        for images, masks in tqdm(loader, desc=f"Caching {self.name} features", leave=False, dynamic_ncols=True,
                                  disable=not is_main_process()):
            with autocast(settings.device, settings.amp_dtype):
                features = model.extract_features(images.to(settings.device, non_blocking=True))
            if self.features is None:
                store_dtype = settings.amp_dtype or torch.float32  # the head would cast to the autocast dtype anyway
                self._allocate(len(loader.sampler), tuple(features.shape[1:]), store_dtype, tuple(masks.shape[1:]))
            self.features[offset: offset + len(images)] = features.to("cpu", self.features.dtype)
            self.masks[offset: offset + len(images)] = masks.to(torch.uint8)
            offset += len(images)
        self.ready = True

    def __len__(self) -> int:
        """Cached samples (0 when this process's share of the split is empty)."""
        return len(self.features) if self.features is not None else 0

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self)
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
        for start in range(0, count, batch_size):
            index = order[start: start + batch_size]
            if not shuffle:  # contiguous slices: no gather copy
                index = slice(start, start + len(index))
            yield self.features[index].float(), self.masks[index].long()

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def close(self) -> None:
        self.features = self.masks = None
        self.ready = False
        if self.file is not None:
            self.file.unlink(missing_ok=True)


def default_cache_budget() -> int:
    """A quarter of the machine's RAM: the cache must leave room for the loaders and the model."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 1024**3


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
    after_step: Callable[[], None] | None = None,
) -> EpochResult:
    """One pass: forward, loss, (with an optimizer) backward and step, and the split's metrics."""
    training = optimizer is not None
    device = settings.device
    model.train(training)
    confmat = ConfusionMatrix(settings.num_classes, settings.ignore_index)
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    pixels_total = torch.zeros((), dtype=torch.int64, device=device)
    progress = tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main_process())
    with torch.set_grad_enabled(training):
        for step, (inputs, masks) in enumerate(progress):
            inputs = inputs.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            with autocast(device, settings.amp_dtype):
                logits = model(features=inputs, image_size=masks.shape[-2:]) if from_features else model(inputs)
            loss, valid = pixel_cross_entropy(logits, masks, settings.ignore_index)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"{desc}, step {step + 1}/{total}: loss is {loss.item()}")
            if training:
                _step(loss, optimizer, scaler)
                if after_step is not None:  # a per-step learning-rate schedule
                    after_step()
            loss_total += loss.detach() * valid
            pixels_total += valid
            confmat.update(masks, logits.detach().argmax(1))
            if step % 10 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
    # Under torchrun each rank saw its own share of the split: add the counts up.
    confmat.reduce_from_all_processes(device)
    all_reduce_sum(loss_total, pixels_total)
    scores = confmat.compute()
    return EpochResult(
        loss=(loss_total / pixels_total.clamp(min=1)).item(),
        pixel_accuracy=scores.pixel_accuracy,
        miou=scores.miou,
        iou=scores.iou,
    )


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
    after_step: Callable[[], None] | None = None,
    max_steps: int | None = None,
) -> EpochResult:
    """One pass of AdamW/cross-entropy over the training split; metrics are of the (augmented) batches.
    With a built `cache`, the batches are its cached features in an order drawn from `generator`.
    `after_step` runs after every optimizer step (a per-step learning-rate schedule); `max_steps`
    ends the pass early (the last epoch of a run counted in steps)."""
    desc = f"Train {epoch}"
    if cache is not None:
        _require_built(cache)
        batches = cache.batches(loader.batch_size, shuffle=True, generator=generator)
        total = cache.num_batches(loader.batch_size)
    else:
        batches, total = loader, len(loader)
    if max_steps is not None and max_steps < total:
        batches, total = itertools.islice(batches, max_steps), max_steps
    return _run_epoch(model, batches, total, settings, desc=desc, from_features=cache is not None,
                      optimizer=optimizer, scaler=scaler, after_step=after_step)


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: DataLoader,
    settings: LoopSettings,
    *,
    desc: str = "Valid",
    cache: FeatureCache | None = None,
) -> EpochResult:
    """Loss, pixel accuracy and mIoU over the whole split (one confusion matrix, not per-batch means).
    With a built `cache` (frozen backbone), the head runs on the cached features alone."""
    if cache is None:
        return _run_epoch(model, loader, len(loader), settings, desc=desc, from_features=False)
    _require_built(cache)
    return _run_epoch(model, cache.batches(loader.batch_size), cache.num_batches(loader.batch_size), settings,
                      desc=desc, from_features=True)


def _require_built(cache: FeatureCache) -> None:
    if not cache.ready:
        raise RuntimeError(f"the {cache.name} feature cache is empty: call its build() first")
