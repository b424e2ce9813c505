"""The frozen backbone's features of a split, computed once and reused every epoch (train.py's
validation cache and --train-views), in RAM or in file-backed tensors of the run folder."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from dinokit.runs.reports import format_bytes
from dinokit.writing import temp_path, write_json


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

    def __init__(
        self,
        name: str,
        memory_budget: int,
        disk_dir: str | Path,
        *,
        key: dict | None = None,
        views: int = 1,
        rank: int = 0,
        target_dtype: torch.dtype = torch.uint8,
    ):
        self.name = name
        self.target_dtype = target_dtype  # class masks: uint8; depth maps: float32 metres
        self.views = views  # consecutive cached samples per image (--train-views), one drawn per pass
        self.memory_budget = memory_budget
        self.disk_dir = Path(disk_dir)
        self.key = key
        self.features: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.files: list[Path] = []
        self.ready = False
        self.filled = 0  # samples stored so far (add)
        self.rank = rank  # this process's shard under torchrun: its own files

    def _stable_path(self, part: str) -> Path:
        return self.disk_dir / f"{self.name}.rank{self.rank}.{part}"

    def allocate(
        self, count: int, feature_shape: tuple[int, ...], dtype: torch.dtype, mask_shape: tuple[int, ...]
    ) -> None:
        """Reserve the storage (size printed; a disk that cannot hold it refused before any work); `add`
        fills it from the start."""
        self.filled = 0
        feature_bytes = count * math.prod(feature_shape) * dtype.itemsize
        mask_bytes = count * math.prod(mask_shape) * self.target_dtype.itemsize
        if self.key is None and feature_bytes + mask_bytes <= self.memory_budget:
            self.features = torch.empty((count, *feature_shape), dtype=dtype)
            self.masks = torch.empty((count, *mask_shape), dtype=self.target_dtype)
            where = "memory"
        else:
            if self.key is not None:  # a previous cache of this name is replaced
                self.discard()
            paths = (
                (self._stable_path("features"), self._stable_path("masks")) if self.key is not None else (None, None)
            )
            in_ram = self.key is None  # masks are small: in RAM unless the cache must survive the process
            reserved = self._reserve_files(feature_bytes, 0 if in_ram else mask_bytes, paths)
            self.features = _mapped(reserved[0], (count, *feature_shape), dtype)
            self.masks = (
                torch.empty((count, *mask_shape), dtype=self.target_dtype)
                if in_ram
                else _mapped(reserved[1], (count, *mask_shape), self.target_dtype)
            )
            budget = "" if self.key is not None else f"; memory budget {format_bytes(self.memory_budget)}"
            where = f"a file ({reserved[0]}{budget})"
        shape = "x".join(map(str, feature_shape))
        print(
            f"{self.name} feature cache: {count} images x {shape} {str(dtype).removeprefix('torch.')} "
            f"= {format_bytes(feature_bytes + mask_bytes)} in {where}"
        )

    def _reserve_files(self, feature_bytes: int, mask_bytes: int, paths: tuple[Path | None, Path | None]) -> list[Path]:
        """Cache files with all their bytes allocated on disk up front. A sparse file would be
        memory-mapped, and a full disk would then kill the process with SIGBUS mid-write (exit 135,
        no message); reserving first turns that into an error before anything is computed."""
        free = shutil.disk_usage(self.disk_dir if self.disk_dir.exists() else self.disk_dir.parent).free
        if self.key is not None:  # a resumable cache lives on disk whatever the memory budget
            hint = "free space or lower --train-views"
        else:
            hint = "free space, raise --cache-ram-gb (to keep it in memory), or " + (
                "use --no-val-cache" if self.name == "valid" else "lower --train-views"
            )
        if feature_bytes + mask_bytes > free:
            raise OSError(
                f"{self.disk_dir}: the {self.name} feature cache needs {format_bytes(feature_bytes + mask_bytes)} "
                f"on disk but {format_bytes(free)} are free; {hint}"
            )
        reserved = []
        for size, stable in zip((feature_bytes, mask_bytes), paths):
            if size == 0:
                continue
            path = stable or temp_path(self.disk_dir / f"{self.name}_features.rank{self.rank}.cache")
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
                raise OSError(
                    f"{path.parent}: the {self.name} feature cache ({format_bytes(size)}) could not be "
                    f"reserved on disk ({err.strerror or err}); {hint}"
                ) from err
            self.files.append(path)
            reserved.append(path)
        return reserved

    def reuse(
        self, count: int, feature_shape: tuple[int, ...], dtype: torch.dtype, mask_shape: tuple[int, ...]
    ) -> bool:
        """Map a complete cache left by a run with the same key (a resumed run); False if there is none."""
        record = self._stable_path("json")
        try:
            stored = json.loads(record.read_text())
        except (OSError, ValueError):
            return False
        if stored != self.key:
            return False
        paths = self._stable_path("features"), self._stable_path("masks")
        sizes = (
            count * math.prod(feature_shape) * dtype.itemsize,
            count * math.prod(mask_shape) * self.target_dtype.itemsize,
        )
        if any(not p.is_file() or p.stat().st_size != size for p, size in zip(paths, sizes)):
            return False
        self.features = _mapped(paths[0], (count, *feature_shape), dtype)
        self.masks = _mapped(paths[1], (count, *mask_shape), self.target_dtype)
        self.files = list(paths)
        self.ready = True
        print(f"{self.name} feature cache: {count} images reused from {paths[0]} (complete, same key)")
        return True

    def add(self, features: torch.Tensor, masks: torch.Tensor, *, count: int, dtype: torch.dtype) -> None:
        """Store the next batch, in order; the first batch reserves room for `count` samples stored as `dtype`."""
        if self.features is None:
            self.allocate(count, tuple(features.shape[1:]), dtype, tuple(masks.shape[1:]))
        self.features[self.filled : self.filled + len(features)] = features.to("cpu", self.features.dtype)
        self.masks[self.filled : self.filled + len(features)] = masks.to("cpu", self.target_dtype)
        self.filled += len(features)

    def finish(self) -> None:
        """Mark the cache complete. A resumable cache writes its record last, atomically: the record is
        what makes its files reusable."""
        if self.key is not None:
            write_json(self._stable_path("json"), self.key)
        self.ready = True

    def __len__(self) -> int:
        """Cached samples (0 when this process's share of the split is empty)."""
        return len(self.features) if self.features is not None else 0

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (features, targets: class masks as int64, depth as float32). With `views` > 1
        the cache holds that many consecutive views of each image, and every pass draws one view per
        image (from `generator`) before shuffling."""
        views = self.views
        count = len(self) // views
        order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
        if views > 1:
            order = order * views + torch.randint(views, (count,), generator=generator)
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            if not shuffle and views == 1:  # contiguous slices: no gather copy
                index = slice(start, start + len(index))
            targets = self.masks[index]
            yield self.features[index].float(), targets.float() if targets.is_floating_point() else targets.long()

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
        self.ready, self.filled = False, 0
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
