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


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 image resized to `size` (H, W) as `eval_transform` resizes it, still uint8: the
    CPU half of preprocessing (DataLoader workers run it; a quarter of the bytes of float32 to upload)."""
    return A.Resize(*size)(image=image)["image"]


def normalisation_table(mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """`[3, 256]` float32: what `eval_transform`'s normalisation maps each uint8 value of each channel
    to, read from it, so normalising on the device by lookup gives its numbers exactly."""
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    return torch.from_numpy(A.Normalize(mean=mean, std=std)(image=ramp)["image"][0].T.copy())


def normalise(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, H, W, 3]` images (on any device) -> `[B, 3, H, W]` float32 through `table`
    (`normalisation_table`, on the same device)."""
    channels = images.permute(0, 3, 1, 2).long()
    return torch.stack([table[c][channels[:, c]] for c in range(3)], dim=1)


def preprocess(image: np.ndarray, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB uint8 image resized to `size` (H, W) and normalised, as validation does: `[1, 3, H, W]`."""
    resized = torch.from_numpy(np.ascontiguousarray(resize_image(image, size)))[None]
    return normalise(resized, normalisation_table(mean, std))
