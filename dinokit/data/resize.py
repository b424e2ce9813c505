"""Image sizes: the patch-multiple rules for `--imgsz`, and the resize + normalise that validation,
feature caches, inference, export and the feature maps all apply."""

from __future__ import annotations

import math
from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch

import config
from model_config import PATCH_SIZE

MAX_SIDE = 4096


def check_imgsz(imgsz: Sequence[int], patch_size: int = PATCH_SIZE) -> None:
    """`--imgsz W H` must hold at least one patch per side and stay below absurd sizes."""
    if min(imgsz) < patch_size or max(imgsz) > MAX_SIDE:
        raise ValueError(f"--imgsz {imgsz[0]} {imgsz[1]}: each side must be in [{patch_size}, {MAX_SIDE}]")


def round_to_patch(imgsz: Sequence[int], patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """Round (width, height) up to multiples of the patch size (640 -> 644)."""
    if len(imgsz) != 2 or min(imgsz) < 1:
        raise ValueError(f"image size must be two positive integers W H, got {list(imgsz)}")
    return tuple(math.ceil(side / patch_size) * patch_size for side in imgsz)  # type: ignore[return-value]


def eval_transform(
    imgsz: tuple[int, int], mean: Sequence[float] = config.MEAN, std: Sequence[float] = config.STD
) -> A.Compose:
    """Resize + normalise: validation, feature caches and inference all preprocess with this."""
    width, height = imgsz
    return A.Compose([A.Resize(height, width), A.Normalize(mean=mean, std=std)])


def preprocess(image: np.ndarray, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB uint8 image resized to `size` (H, W) and normalised, as validation does: `[1, 3, H, W]`."""
    normalised = eval_transform((size[1], size[0]), mean, std)(image=image)["image"]
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1))).unsqueeze(0)
