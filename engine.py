"""The one train / validate loop, used by train.py (every epoch and the final test), bench.py and the notebook.

Batches come either from a DataLoader (images) or from a `FeatureCache` (backbone features of a
frozen backbone, computed once by an explicit `build` call): the loop, the loss and the metrics
are the same code either way. `LoopSettings` carries what every pass needs besides model and data.
"""
from __future__ import annotations

import itertools
import json
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
from files import format_bytes, temp_path, write_json
from metrics import ConfusionMatrix, predicted_classes
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

    Valid only while the backbone is frozen and what is cached is fixed: the validation split's
    deterministic transforms, or K seeded augmented views of each training image (--train-views).
    Kept in RAM when they fit in `memory_budget` bytes, else in a file-backed tensor under
    `disk_dir` (deleted by `close`). With a `key` the cache is resumable: always in files of
    `disk_dir` named after it, with a `<name>.rank<r>.json` record of the key written once the
    cache is complete, so a resumed run with the same key maps the files instead of recomputing;
    a cache killed while building has no record and is rebuilt.
    """

    def __init__(self, name: str, memory_budget: int, disk_dir: str | Path, *, key: dict | None = None, views: int = 1):
        self.name = name
        self.views = views  # consecutive cached samples per image (--train-views), one drawn per pass
        self.memory_budget = memory_budget
        self.disk_dir = Path(disk_dir)
        self.key = key
        self.features: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.files: list[Path] = []
        self.ready = False

    def _stable_path(self, part: str) -> Path:
        return self.disk_dir / f"{self.name}.rank{rank()}.{part}"

    def allocate(self, count: int, feature_shape: tuple[int, ...], dtype: torch.dtype, mask_shape: tuple[int, ...]) -> None:
        """Reserve the storage (size printed; a disk that cannot hold it refused before any work)."""
        feature_bytes = count * math.prod(feature_shape) * dtype.itemsize
        mask_bytes = count * math.prod(mask_shape)
        if self.key is None and feature_bytes + mask_bytes <= self.memory_budget:
            self.features = torch.empty((count, *feature_shape), dtype=dtype)
            self.masks = torch.empty((count, *mask_shape), dtype=torch.uint8)
            where = "memory"
        else:
            if self.key is not None:  # a previous cache of this name is replaced
                self.discard()
            paths = (self._stable_path("features"), self._stable_path("masks")) if self.key is not None else (None, None)
            in_ram = self.key is None  # masks are small: in RAM unless the cache must survive the process
            reserved = self._reserve_files(feature_bytes, 0 if in_ram else mask_bytes, paths)
            self.features = _mapped(reserved[0], (count, *feature_shape), dtype)
            self.masks = torch.empty((count, *mask_shape), dtype=torch.uint8) if in_ram else _mapped(reserved[1], (count, *mask_shape), torch.uint8)
            where = f"a file ({reserved[0]}{'' if self.key is not None else f'; memory budget {format_bytes(self.memory_budget)}'})"
        shape = "x".join(map(str, feature_shape))
        print(f"{self.name} feature cache: {count} images x {shape} {str(dtype).removeprefix('torch.')} "
              f"= {format_bytes(feature_bytes + mask_bytes)} in {where}")

    def _reserve_files(self, feature_bytes: int, mask_bytes: int, paths: tuple[Path | None, Path | None]) -> list[Path]:
        """Cache files with all their bytes allocated on disk up front. A sparse file would be
        memory-mapped, and a full disk would then kill the process with SIGBUS mid-write (exit 135,
        no message); reserving first turns that into an error before anything is computed."""
        free = shutil.disk_usage(self.disk_dir if self.disk_dir.exists() else self.disk_dir.parent).free
        if self.key is not None:  # a resumable cache lives on disk whatever the memory budget
            hint = "free space or lower --train-views"
        else:
            hint = "free space, raise --cache-ram-gb (to keep it in memory), or " + (
                "use --no-val-cache" if self.name == "valid" else "lower --train-views")
        if feature_bytes + mask_bytes > free:
            raise OSError(f"{self.disk_dir}: the {self.name} feature cache needs {format_bytes(feature_bytes + mask_bytes)} "
                          f"on disk but {format_bytes(free)} are free; {hint}")
        reserved = []
        for size, stable in zip((feature_bytes, mask_bytes), paths):
            if size == 0:
                continue
            path = stable or temp_path(self.disk_dir / f"{self.name}_features.rank{rank()}.cache")
            try:
                with open(path, "w+b" if stable else "r+b") as handle:
                    if hasattr(os, "posix_fallocate"):
                        os.posix_fallocate(handle.fileno(), 0, size)
                    else:  # no fallocate (macOS): writing the zeros reserves the blocks too
                        for _ in range(0, size, 1 << 24):
                            handle.write(bytes(min(1 << 24, size - handle.tell())))
            except OSError as err:
                for made in [*reserved, path]:  # nothing half-reserved stays behind
                    made.unlink(missing_ok=True)
                self.files = [f for f in self.files if f not in reserved]
                raise OSError(f"{path.parent}: the {self.name} feature cache ({format_bytes(size)}) could not be "
                              f"reserved on disk ({err.strerror or err}); {hint}") from err
            self.files.append(path)
            reserved.append(path)
        return reserved

    def reuse(self, count: int, feature_shape: tuple[int, ...], dtype: torch.dtype, mask_shape: tuple[int, ...]) -> bool:
        """Map a complete cache left by a run with the same key (a resumed run); False if there is none."""
        record = self._stable_path("json")
        try:
            stored = json.loads(record.read_text())
        except (OSError, ValueError):
            return False
        if stored != self.key:
            return False
        paths = self._stable_path("features"), self._stable_path("masks")
        sizes = count * math.prod(feature_shape) * dtype.itemsize, count * math.prod(mask_shape)
        if any(not p.is_file() or p.stat().st_size != size for p, size in zip(paths, sizes)):
            return False
        self.features = _mapped(paths[0], (count, *feature_shape), dtype)
        self.masks = _mapped(paths[1], (count, *mask_shape), torch.uint8)
        self.files = list(paths)
        self.ready = True
        print(f"{self.name} feature cache: {count} images reused from {paths[0]} (complete, same key)")
        return True

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
                self.allocate(len(loader.sampler), tuple(features.shape[1:]), store_dtype, tuple(masks.shape[1:]))
            self.features[offset: offset + len(images)] = features.to("cpu", self.features.dtype)
            self.masks[offset: offset + len(images)] = masks.to(torch.uint8)
            offset += len(images)
        if self.key is not None:  # the record that makes the files reusable: written last, atomically
            write_json(self._stable_path("json"), self.key)
        self.ready = True

    def __len__(self) -> int:
        """Cached samples (0 when this process's share of the split is empty)."""
        return len(self.features) if self.features is not None else 0

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (features, masks). With `views` > 1 the cache holds that many consecutive views
        of each image, and every pass draws one view per image (from `generator`) before shuffling."""
        views = self.views
        count = len(self) // views
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
        if views > 1:
            order = order * views + torch.randint(views, (count,), generator=generator)
        for start in range(0, count, batch_size):
            index = order[start: start + batch_size]
            if not shuffle and views == 1:  # contiguous slices: no gather copy
                index = slice(start, start + len(index))
            yield self.features[index].float(), self.masks[index].long()

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) // self.views / batch_size)

    def discard(self) -> None:
        """Delete this cache's files, its resumable record included."""
        if self.key is not None:
            for part in ("json", "features", "masks"):
                self._stable_path(part).unlink(missing_ok=True)
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files = []

    def close(self, keep: bool = False) -> None:
        """Release the storage; files are deleted unless `keep` (a resumable cache of an unfinished run)."""
        self.features = self.masks = None
        self.ready = False
        if not (keep and self.key is not None):
            self.discard()


def _mapped(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(*shape)


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
    after_step: Callable[[torch.Tensor], None] | None = None,
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
                if after_step is not None:
                    after_step(loss.detach())
            loss_total += loss.detach() * valid
            pixels_total += valid
            confmat.update(masks, predicted_classes(logits.detach()))
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
    after_step: Callable[[torch.Tensor], None] | None = None,
    max_steps: int | None = None,
) -> EpochResult:
    """One pass of AdamW/cross-entropy over the training split; metrics are of the (augmented) batches.
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
