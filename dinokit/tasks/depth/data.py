"""An RGB-D folder as datasets (datasets.py's shared plumbing with depth's own reading): pairs by
stem, depth in metres as the target, depth-safe augmentation for training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import config
from datasets import OriginalPairs, PairedDataset, find_pairs
from dinokit.data.augmentations import IMAGENET, Normalization, depth_train_transform
from dinokit.data.image_files import DatasetError, read_image
from dinokit.data.resize import eval_transform
from dinokit.tasks.depth.files import DepthSpec, check_depth_pairs, list_depth_files, load_depth_spec, read_depth


def find_depth_pairs(data_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
    """`(image, depth)` paths of one split of an RGB-D folder, `<split>_images` with `<split>_depth`."""
    return find_pairs(data_dir, split, "depth", list_targets=list_depth_files, noun="depth map")


class DepthReader:
    """An image and its depth in metres (`unmeasured`: the value of pixels without a measurement)."""

    def __init__(self, spec: DepthSpec, unmeasured: float = float("nan")):
        self.spec, self.unmeasured = spec, unmeasured

    def __call__(self, image_path: Path, depth_path: Path) -> tuple[np.ndarray, np.ndarray]:
        image, depth = read_image(image_path), read_depth(depth_path, self.spec)
        if image.shape[:2] != depth.shape:  # checked before training (check_depth_pairs); files can change
            raise DatasetError(f"{depth_path}: depth is {depth.shape[1]}x{depth.shape[0]}, its image is not")
        return image, depth if np.isnan(self.unmeasured) else np.nan_to_num(depth, nan=self.unmeasured)


def build_depth_datasets(
    data_dir: str | Path,
    imgsz: tuple[int, int],
    *,
    seed: int = config.SEED,
    normalization: Normalization = IMAGENET,
) -> tuple[PairedDataset, PairedDataset, DepthSpec, dict[str, int]]:
    """Train (depth-safe augmentation) and validation (resize only) datasets of an RGB-D folder,
    `(image [3, H, W] float32, depth [H, W] float32 metres, 0 = unmeasured)`, after every depth
    file has been read and checked (`check_depth_pairs`); with the folder's `depth.json` and each
    split's valid depth pixels."""
    spec = load_depth_spec(data_dir)
    splits = {split: find_depth_pairs(data_dir, split) for split in ("train", "valid")}
    valid_pixels = {split: check_depth_pairs(pairs, spec, f"{data_dir}: {split}") for split, pairs in splits.items()}
    reader = DepthReader(spec, unmeasured=0.0)
    transforms = {"train": depth_train_transform(imgsz, normalization), "valid": eval_transform(imgsz, *normalization)}
    train, valid = (
        PairedDataset(splits[split], reader, transforms[split], target_dtype=np.float32, seed=seed)
        for split in ("train", "valid")
    )
    return train, valid, spec, valid_pixels


def truth_pairs(pairs: list[tuple[Path, Path]], spec: DepthSpec) -> OriginalPairs:
    """`(image [H, W, 3] uint8, depth [H, W] float32 metres, NaN = unmeasured)` at the files' size."""
    return OriginalPairs(pairs, DepthReader(spec))
