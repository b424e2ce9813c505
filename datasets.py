"""Images + masks -> (normalised image tensor, class-index mask) pairs (an RGB-D folder: depth maps in
metres), with augmentation and loaders.

Layout of a dataset directory (Pascal VOC as distributed on Kaggle, or anything shaped like it):

    <data-dir>/train_images/*.jpg   <data-dir>/train_labels/*.png
    <data-dir>/valid_images/*.jpg   <data-dir>/valid_labels/*.png

Images and masks are paired by file stem (hidden files skipped, one file per stem). What mask
values mean is dinokit/data/labels.py; how files are read, dinokit/data/image_files.py; the
check of every pair before training, dinokit/data/data_check.py; image sizes, dinokit/data/resize.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

import config
from dinokit.data.augmentations import (
    IMAGENET,
    Normalization,
    depth_train_transform,
    seed_augmentation,
    train_transform,
)
from dinokit.data.data_check import DatasetCheck, check_dataset
from dinokit.data.depth_files import DepthSpec, check_depth_pairs, list_depth_files, load_depth_spec, read_depth
from dinokit.data.image_files import DatasetError, list_image_files, read_image
from dinokit.data.labels import VOC, ColorMap, DatasetSpec, read_mask
from dinokit.data.resize import eval_transform
from utils import distributed, rank, world_size


def find_pairs(data_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
    """`(image, mask)` paths of one split, `<data_dir>/<split>_images` with `<split>_labels`."""
    data_dir = Path(data_dir)
    return pair_folders(data_dir / f"{split}_images", data_dir / f"{split}_labels", f"{data_dir}: {split} split")


def find_depth_pairs(data_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
    """`(image, depth)` paths of one split of an RGB-D folder, `<split>_images` with `<split>_depth`
    (dinokit/data/depth_files.py)."""
    data_dir = Path(data_dir)
    return pair_folders(
        data_dir / f"{split}_images", data_dir / f"{split}_depth", f"{data_dir}: {split} split", depth=True
    )


def pair_folders(images_dir: Path, labels_dir: Path, what: str, *, depth: bool = False) -> list[tuple[Path, Path]]:
    """Images and masks (`depth`: depth maps) paired by file stem; an image without its mask (or the
    reverse) is an error."""
    images = {p.stem: p for p in list_image_files(images_dir)}
    masks = {p.stem: p for p in (list_depth_files(labels_dir) if depth else list_image_files(labels_dir))}
    noun = "depth map" if depth else "mask"
    problems = [f"no {noun} for {images[s].name}" for s in sorted(images.keys() - masks.keys())]
    problems += [f"no image for {masks[s].name}" for s in sorted(masks.keys() - images.keys())]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetError(f"{what} has unpaired files: {shown}")
    return [(images[s], masks[s]) for s in sorted(images)]


class DepthPairDataset(Dataset):
    """Yields `(image [H, W, 3] uint8, depth [H, W] float32 metres, NaN = unmeasured)` at original size."""

    def __init__(self, pairs: list[tuple[Path, Path]], spec: DepthSpec):
        self.pairs, self.spec = pairs, spec

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, depth_path = self.pairs[index]
        return read_image(image_path), read_depth(depth_path, self.spec)


class SegmentationDataset(Dataset):
    """Yields `(image [3, H, W] float32, mask [H, W] int64)`; masks resize with nearest neighbour."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        color_map: ColorMap | None,
        transform: A.Compose,
        mask_format: str = "auto",
        *,
        seed: int = config.SEED,
    ):
        self.pairs = pairs
        self.color_map = color_map
        self.transform = transform
        self.mask_format = mask_format
        # Sample i of epoch e is always augmented the same way, whichever worker loads it: runs
        # repeat exactly and a resumed run continues as if never stopped (`set_epoch` moves e).
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed RGB image and its class-index mask."""
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        mask = read_mask(mask_path, self.color_map, self.mask_format)
        if image.shape[:2] != mask.shape[:2]:
            raise DatasetError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} "
                f"is {image.shape[1]}x{image.shape[0]}"
            )
        return image, mask

    def target(self, mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(mask.astype(np.int64))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair `index` as epoch `epoch` augments it."""
        image, mask = self.load_pair(index)
        seed_augmentation(self.transform, self.seed, epoch, index)
        out = self.transform(image=image, mask=mask)
        image_tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image_tensor, self.target(out["mask"])


class DepthDataset(SegmentationDataset):
    """Yields `(image [3, H, W] float32, depth [H, W] float32 metres, 0 = unmeasured)`: an RGB-D
    split for training, the depth map transformed as a mask (nearest neighbour); the same epochs
    and seeds as segmentation."""

    def __init__(self, pairs: list[tuple[Path, Path]], spec: DepthSpec, transform: A.Compose, *, seed: int):
        super().__init__(pairs, None, transform, seed=seed)
        self.depth_spec = spec

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, depth_path = self.pairs[index]
        image, depth = read_image(image_path), read_depth(depth_path, self.depth_spec)
        if image.shape[:2] != depth.shape:  # checked before training (check_depth_pairs); files can change
            raise DatasetError(f"{depth_path}: depth is {depth.shape[1]}x{depth.shape[0]}, its image is not")
        return image, np.nan_to_num(depth, nan=0.0)

    def target(self, depth: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))


class ViewsDataset(Dataset):
    """`views` augmented views of each pair in `indices`, consecutively: item j is pair
    indices[j // views] augmented with key (seed, j % views, index), the augmentation epoch
    j % views would give it. What --train-views caches."""

    def __init__(self, dataset: SegmentationDataset, indices: Sequence[int], views: int):
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


class PairDataset(Dataset):
    """`(image [H, W, 3] uint8 RGB, mask [H, W] uint8 class indices)` at the files' own resolution,
    unaugmented: what full-resolution evaluation scores against."""

    def __init__(self, pairs: list[tuple[Path, Path]], color_map: ColorMap, mask_format: str = "auto"):
        self.pairs, self.color_map, self.mask_format = pairs, color_map, mask_format

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        return read_image(image_path), read_mask(mask_path, self.color_map, self.mask_format)


def build_datasets(
    data_dir: str | Path,
    imgsz: tuple[int, int],
    spec: DatasetSpec = VOC,
    *,
    threads: int = 2,
    seed: int = config.SEED,
    recipe: str = "seed",
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


def build_depth_datasets(
    data_dir: str | Path,
    imgsz: tuple[int, int],
    *,
    seed: int = config.SEED,
    normalization: Normalization = IMAGENET,
) -> tuple[DepthDataset, DepthDataset, DepthSpec, dict[str, int]]:
    """Train (depth-safe augmentation) and validation (resize only) datasets of an RGB-D folder,
    after every depth file has been read and checked (`check_depth_pairs`); with the folder's
    `depth.json` and each split's valid depth pixels."""
    spec = load_depth_spec(data_dir)
    splits = {split: find_depth_pairs(data_dir, split) for split in ("train", "valid")}
    valid_pixels = {split: check_depth_pairs(pairs, spec, f"{data_dir}: {split}") for split, pairs in splits.items()}
    train = DepthDataset(splits["train"], spec, depth_train_transform(imgsz, normalization), seed=seed)
    valid = DepthDataset(splits["valid"], spec, eval_transform(imgsz, *normalization), seed=seed)
    return train, valid, spec, valid_pixels


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
    dataset: SegmentationDataset, batch_size: int, *, shuffle: bool, workers: int = 0, pin_memory: bool = False
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


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Make the next pass over `loader` the `epoch`-th: its shuffling and augmentation."""
    loader.dataset.epoch = epoch
    loader.generator.manual_seed(epoch_seed(loader.dataset.seed, epoch))
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
