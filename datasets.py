"""The data plumbing every task shares: files paired by stem, augmented pairs whose epochs repeat
exactly, feature-cache views, loaders and their shards under torchrun; and the segmentation pairs
the reference article trains on (images + masks -> normalised image tensor, class-index mask). A
task's own files and targets are its folder's (dinokit/tasks/depth/: RGB-D folders).

Layout of a dataset directory (Pascal VOC as distributed on Kaggle, or anything shaped like it):

    <data-dir>/train_images/*.jpg   <data-dir>/train_labels/*.png
    <data-dir>/valid_images/*.jpg   <data-dir>/valid_labels/*.png

Images and masks are paired by file stem (hidden files skipped, one file per stem). What mask
values mean is dinokit/data/labels.py; how files are read, dinokit/data/image_files.py; the
check of every pair before training, dinokit/data/data_check.py; image sizes, dinokit/data/resize.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

import config
from dinokit.data.augmentations import IMAGENET, Normalization, seed_augmentation, train_transform
from dinokit.data.data_check import DatasetCheck, check_dataset
from dinokit.data.image_files import DatasetError, list_image_files, read_image
from dinokit.data.labels import VOC, ColorMap, DatasetSpec, read_mask
from dinokit.data.resize import eval_transform
from utils import distributed, rank, world_size


def find_pairs(
    data_dir: str | Path,
    split: str,
    targets: str = "labels",
    *,
    list_targets: Callable[[Path], list[Path]] = list_image_files,
    noun: str = "mask",
) -> list[tuple[Path, Path]]:
    """`(image, target)` paths of one split, `<data_dir>/<split>_images` with `<split>_<targets>`
    (segmentation: `_labels`, masks; a task's own targets through `list_targets` and `noun`)."""
    data_dir = Path(data_dir)
    images, found = data_dir / f"{split}_images", data_dir / f"{split}_{targets}"
    return pair_folders(images, found, f"{data_dir}: {split} split", list_targets=list_targets, noun=noun)


def pair_folders(
    images_dir: Path,
    labels_dir: Path,
    what: str,
    *,
    list_targets: Callable[[Path], list[Path]] = list_image_files,
    noun: str = "mask",
) -> list[tuple[Path, Path]]:
    """Images and their targets (`list_targets` finds them: masks by default) paired by file stem;
    an image without its target (or the reverse) is an error."""
    images = {p.stem: p for p in list_image_files(images_dir)}
    masks = {p.stem: p for p in list_targets(labels_dir)}
    problems = [f"no {noun} for {images[s].name}" for s in sorted(images.keys() - masks.keys())]
    problems += [f"no image for {masks[s].name}" for s in sorted(masks.keys() - images.keys())]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetError(f"{what} has unpaired files: {shown}")
    return [(images[s], masks[s]) for s in sorted(images)]


PairReader = Callable[[Path, Path], tuple[np.ndarray, np.ndarray]]  # (image, target) of one pair's files


class PairedDataset(Dataset):
    """Yields `(image [3, H, W] float32, target [H, W] of `target_dtype`)`: each pair read by
    `read_pair` (the task's: a mask, a depth map), then transformed (the target resizes with nearest
    neighbour). Sample i of epoch e is always augmented the same way, whichever worker loads it:
    runs repeat exactly and a resumed run continues as if never stopped (`set_epoch` moves e)."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        read_pair: PairReader,
        transform: A.Compose,
        *,
        target_dtype: type = np.int64,
        seed: int = config.SEED,
    ):
        self.pairs, self.read_pair, self.transform = pairs, read_pair, transform
        self.target_dtype = target_dtype
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed RGB image and its target."""
        return self.read_pair(*self.pairs[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair `index` as epoch `epoch` augments it."""
        image, target = self.load_pair(index)
        seed_augmentation(self.transform, self.seed, epoch, index)
        out = self.transform(image=image, mask=target)
        image_tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image_tensor, torch.from_numpy(np.ascontiguousarray(out["mask"], dtype=self.target_dtype))


class OriginalPairs(Dataset):
    """`(image [H, W, 3] uint8 RGB, target)` at the files' own resolution, unaugmented, read by the
    task's `read_pair`: what full-resolution evaluation scores against."""

    def __init__(self, pairs: list[tuple[Path, Path]], read_pair: PairReader):
        self.pairs, self.read_pair = pairs, read_pair

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read_pair(*self.pairs[index])


class MaskReader:
    """A segmentation pair: the image and its class-index mask (same size, or the mask's file is named)."""

    def __init__(self, color_map: ColorMap | None, mask_format: str = "auto"):
        self.color_map, self.mask_format = color_map, mask_format

    def __call__(self, image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(image_path)
        mask = read_mask(mask_path, self.color_map, self.mask_format)
        if image.shape[:2] != mask.shape[:2]:
            raise DatasetError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        return image, mask


class SegmentationDataset(PairedDataset):
    """Yields `(image [3, H, W] float32, mask [H, W] int64)`: the reference article's pairs."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        color_map: ColorMap | None,
        transform: A.Compose,
        mask_format: str = "auto",
        *,
        seed: int = config.SEED,
    ):
        super().__init__(pairs, MaskReader(color_map, mask_format), transform, seed=seed)


class ViewsDataset(Dataset):
    """`views` augmented views of each pair in `indices`, consecutively: item j is pair
    indices[j // views] augmented with key (seed, j % views, index), the augmentation epoch
    j % views would give it. What --train-views caches."""

    def __init__(self, dataset: PairedDataset, indices: Sequence[int], views: int):
        self.dataset, self.indices, self.views = dataset, list(indices), views

    def __len__(self) -> int:
        return len(self.indices) * self.views

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.sample(self.indices[item // self.views], item % self.views)


def shard_indices(size: int, rank: int, world_size: int) -> list[int]:
    """This process's share of a training split under torchrun, as DistributedSampler(shuffle=False)
    draws it: padded with the first indices to equal counts, so every rank takes as many steps."""
    padded = list(range(size))
    missing = -size % world_size
    padded += (padded * math.ceil(missing / max(size, 1)))[:missing]
    return padded[rank::world_size]


def build_datasets(
    data_dir: str | Path,
    imgsz: tuple[int, int],
    spec: DatasetSpec = VOC,
    *,
    threads: int = 2,
    seed: int = config.SEED,
    recipe: str = "article",
    normalization: Normalization = IMAGENET,
) -> tuple[SegmentationDataset, SegmentationDataset, DatasetCheck]:
    """Train (augmented by `recipe`, dinokit/data/augmentations.py) and validation (resize only) datasets of
    `data_dir`, after `check_dataset` has decoded every file; the check's spec (mask format decided)
    is the one the datasets use. `normalization`: (mean, std) of the backbone's weights."""
    splits = {split: find_pairs(data_dir, split) for split in ("train", "valid")}
    check = check_dataset(splits, spec, threads)
    color_map, mask_format = check.spec.color_map(), check.spec.mask_format
    train = SegmentationDataset(
        splits["train"],
        color_map,
        train_transform(recipe, imgsz, color_map.ignore_index, normalization),
        mask_format,
        seed=seed,
    )
    valid = SegmentationDataset(
        splits["valid"], color_map, eval_transform(imgsz, *normalization), mask_format, seed=seed
    )
    return train, valid, check


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class ShardSampler(torch.utils.data.Sampler[int]):
    """Indices rank, rank + world, ... of a dataset, in order and without padding: across ranks every
    sample is seen exactly once (DistributedSampler pads with repeats, which would count twice)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: PairedDataset, batch_size: int, *, shuffle: bool, workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader whose order and augmentation depend only on (dataset seed, epoch); call
    `set_epoch` per epoch.

    Shuffled (training) loaders restart their workers every epoch so that the dataset's epoch
    reaches them; validation loaders keep theirs. Under torchrun each process gets its share:
    training through DistributedSampler (equal counts, so every rank takes the same number of
    steps), evaluation through ShardSampler (exact counts)."""
    sampler = None
    if distributed():
        if shuffle:
            sampler = torch.utils.data.DistributedSampler(
                dataset, world_size(), rank(), shuffle=True, seed=dataset.seed
            )
        else:
            sampler = ShardSampler(len(dataset), rank(), world_size())
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0 and not shuffle,
        generator=torch.Generator().manual_seed(epoch_seed(dataset.seed, 0)),
    )


def build_loaders(
    train_set: PairedDataset,
    valid_set: PairedDataset,
    *,
    batch: int,
    workers: int,
    device: torch.device,
    where: str,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """A run's two loaders (`make_loader`: epochs that repeat exactly, shards under torchrun); a batch
    larger than the training split (of `where`) is refused."""
    if batch > len(train_set):
        raise ValueError(f"--batch {batch} is larger than the training split ({len(train_set)} images in {where})")
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, batch, shuffle=True, workers=workers, pin_memory=pin)
    valid_loader = make_loader(valid_set, batch, shuffle=False, workers=workers, pin_memory=pin)
    if world_size() > 1:
        print(
            f"Distributed: {world_size()} processes x batch {batch} = global batch {batch * world_size()} "
            f"per step ({'NCCL' if device.type == 'cuda' else 'gloo'}); --lr applies to the global batch."
        )
    return train_loader, valid_loader


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Make the next pass over `loader` the `epoch`-th: its shuffling and augmentation."""
    loader.dataset.epoch = epoch
    loader.generator.manual_seed(epoch_seed(loader.dataset.seed, epoch))
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
