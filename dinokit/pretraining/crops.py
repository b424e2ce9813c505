"""The unlabelled images of a pretraining run and their views: DINOv2's multi-crop augmentation
(dinov2/data/augmentations.py, DataAugmentationDINO), iBOT's block masks (dinov2/data/masking.py)
and an epoch order that depends only on (seed, epoch), so a resumed run sees the same batches.

Every random choice of an image's views is drawn from a generator seeded by (run seed, epoch,
image index): the views do not depend on how many data-loader workers there are, on which
process of a torchrun job loads the image, or on where a run was resumed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from dinokit.data.image_files import IMAGE_EXTENSIONS, read_image
from dinokit.errors import UserError

GLOBAL_SCALE = (0.32, 1.0)  # DINOv2's global_crops_scale
LOCAL_SCALE = (0.05, 0.32)  # local_crops_scale
LOCAL_FRACTION = 96 / 224  # a local crop's side as a fraction of a global one's (96 px at 224)
COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (DINOv2's)
MASK_PROBABILITY = 0.5  # share of global crops that get an iBOT mask
MASK_RATIO = (0.1, 0.5)  # masked share of a masked crop's patches


class ImagesError(UserError):
    """The --images folders hold nothing to train on."""


def list_unlabelled_images(folders: Sequence[str | Path]) -> tuple[list[Path], int]:
    """Every image file under `folders` (nested folders, hidden ones left out), sorted per folder,
    and the count of other files passed over. A folder that is missing or has no image is refused."""
    files: list[Path] = []
    others = 0
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ImagesError(f"{folder}: --images folder not found")
        found = 0
        for path in sorted(folder.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if not path.is_file() or hidden:
                continue
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
                found += 1
            else:
                others += 1
        if not found:
            raise ImagesError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
    return files, others


def local_crop_size(global_size: int, patch_size: int) -> int:
    """The paper's local crop (96 px beside 224) scaled to `global_size`, rounded to whole patches."""
    return max(patch_size, round(global_size * LOCAL_FRACTION / patch_size) * patch_size)


def blur_kernel(size: int) -> int:
    """DINOv2's 9-pixel blur kernel at 224 px, scaled with the crop (odd, at least 3)."""
    return max(3, int(9 * size / 224) // 2 * 2 + 1)


class MultiCrop:
    """2 global crops (`size`, GLOBAL_SCALE) and `local_crops` local ones (LOCAL_SCALE), each flipped,
    colour-jittered (0.4, 0.4, 0.2, 0.1; p 0.8), greyed (p 0.2); the first global crop always blurred,
    the second blurred with p 0.1 and solarised with p 0.2, local crops blurred with p 0.5 — DINOv2's
    recipe. `color_jitter` scales the jitter's strengths (hue up to 0.5, the others up to 0.9): for
    images whose colours say nothing of their content. Draws from torch's generator: call it
    inside `seeded`."""

    def __init__(
        self,
        size: int,
        local_size: int,
        local_crops: int,
        mean: Sequence[float],
        std: Sequence[float],
        color_jitter: float = 1.0,
    ):
        self.local_crops = local_crops
        strengths = [min(cap, base * color_jitter) for base, cap in zip(COLOR_JITTER, (0.9, 0.9, 0.9, 0.5))]
        flip_and_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(*strengths)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
        bicubic = transforms.InterpolationMode.BICUBIC

        def blur(p: float, side: int) -> transforms.RandomApply:
            return transforms.RandomApply([transforms.GaussianBlur(blur_kernel(side), sigma=(0.1, 2.0))], p=p)

        crop = lambda side, scale: transforms.RandomResizedCrop(side, scale=scale, interpolation=bicubic)  # noqa: E731
        self.first = transforms.Compose([crop(size, GLOBAL_SCALE), flip_and_jitter, blur(1.0, size), to_tensor])
        self.second = transforms.Compose(
            [
                crop(size, GLOBAL_SCALE),
                flip_and_jitter,
                blur(0.1, size),
                transforms.RandomSolarize(128, p=0.2),
                to_tensor,
            ]
        )
        self.local = transforms.Compose(
            [crop(local_size, LOCAL_SCALE), flip_and_jitter, blur(0.5, local_size), to_tensor]
        )

    def __call__(self, image: Image.Image) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(global crops, local crops) of one image."""
        return [self.first(image), self.second(image)], [self.local(image) for _ in range(self.local_crops)]


def block_mask(grid: tuple[int, int], masked: int, rng: np.random.Generator) -> np.ndarray:
    """BEiT/iBOT block-wise masking: rectangles of at least 4 patches and aspect ratio 0.3-3.3
    (log-uniform) until `masked` patches are covered, as dinov2's MaskingGenerator; boolean [H, W]."""
    height, width = grid
    mask = np.zeros(grid, dtype=bool)
    attempts = 0
    while mask.sum() < masked and attempts < 100:
        attempts += 1
        left_to_mask = masked - int(mask.sum())
        area = rng.uniform(min(4, left_to_mask), max(4, left_to_mask))
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h = min(height, max(1, int(round(math.sqrt(area * aspect)))))
        w = min(width, max(1, int(round(math.sqrt(area / aspect)))))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        mask[top : top + h, left : left + w] = True
    if mask.sum() > masked:  # the last rectangle overshot: unmask its excess, so the ratio is what was drawn
        extra = rng.choice(np.flatnonzero(mask), int(mask.sum()) - masked, replace=False)
        mask.flat[extra] = False
    return mask


def ibot_masks(grid: tuple[int, int], crops: int, rng: np.random.Generator) -> torch.Tensor:
    """[crops, H, W] masks: each global crop masked with MASK_PROBABILITY, at a ratio drawn from MASK_RATIO."""
    masks = np.zeros((crops, *grid), dtype=bool)
    for index in range(crops):
        if rng.random() < MASK_PROBABILITY:
            ratio = rng.uniform(*MASK_RATIO)
            masks[index] = block_mask(grid, int(round(ratio * grid[0] * grid[1])), rng)
    return torch.from_numpy(masks)


@dataclass(frozen=True)
class Views:
    """One image's training input: global crops [2, 3, S, S], local crops [L, 3, s, s], iBOT masks [2, H, W]."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor


class UnlabelledImages(Dataset):
    """The images of a run; an item is (index, seed) from `EpochOrder` and gives `Views`, or None
    for a file that cannot be read (skipped; the loop counts them)."""

    def __init__(self, files: Sequence[Path], multicrop: MultiCrop, mask_grid: tuple[int, int] | None):
        self.files, self.multicrop, self.mask_grid = list(files), multicrop, mask_grid

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, Views | None]:
        index, seed = item
        try:
            image = Image.fromarray(read_image(self.files[index]))
        except (UserError, OSError, ValueError):
            return index, None
        with seeded(seed):
            global_crops, local_crops = self.multicrop(image)
        rng = np.random.default_rng(seed)
        grid = self.mask_grid
        masks = ibot_masks(grid, 2, rng) if grid else torch.zeros(2, 0, 0, dtype=torch.bool)
        locals_ = torch.stack(local_crops) if local_crops else torch.zeros(0, *global_crops[0].shape)
        return index, Views(torch.stack(global_crops), locals_, masks)


class seeded:
    """Run a block with torch's and Python's generators seeded, restoring them afterwards (the
    main process's generators drive drop-path: loading an image there must not move them)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        self.torch_state, self.python_state = torch.random.get_rng_state(), random.getstate()
        torch.manual_seed(self.seed)
        random.seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.torch_state)
        random.setstate(self.python_state)


@dataclass(frozen=True)
class Batch:
    """A collated batch: `Views` stacked crop-major ([2B, ...] globals, [L*B, ...] locals, [2B, H, W]
    masks: all first crops, then all second ones, as DINOv2 lays them out), the dataset indices,
    and how many of the batch's files could not be read."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor
    indices: list[int]
    unreadable: int

    @property
    def size(self) -> int:
        return len(self.indices)


def collate(items: list[tuple[int, Views | None]]) -> Batch:
    readable = [(index, views) for index, views in items if views is not None]
    indices = [index for index, _ in readable]
    if not readable:
        empty = torch.zeros(0)
        return Batch(empty, empty, torch.zeros(0, dtype=torch.bool), [], len(items))
    crop_major = lambda name: torch.stack([getattr(v, name) for _, v in readable], 1).flatten(0, 1)  # noqa: E731
    return Batch(
        crop_major("global_crops"), crop_major("local_crops"), crop_major("masks"), indices, len(items) - len(readable)
    )


class EpochOrder:
    """Batches of (index, seed) for one epoch: a permutation drawn from (seed, epoch), cut into global
    batches of `batch * world` (the last partial one dropped), of which process `rank` takes its
    slice; `start` skips the steps a resumed run has done. Each image's seed is a function of
    (seed, epoch, index) only."""

    def __init__(self, count: int, batch: int, seed: int, *, world: int = 1, rank: int = 0):
        self.count, self.batch, self.seed, self.world, self.rank = count, batch, seed, world, rank
        self.epoch, self.start = 0, 0

    def steps_per_epoch(self) -> int:
        return self.count // (self.batch * self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch() - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.count, generator=generator).tolist()
        step_size = self.batch * self.world
        for step in range(self.start, self.steps_per_epoch()):
            chunk = order[step * step_size : (step + 1) * step_size]
            mine = chunk[self.rank * self.batch : (self.rank + 1) * self.batch]
            yield [(index, image_seed(self.seed, self.epoch, index)) for index in mine]


def image_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's views in one epoch (below 2^32 for NumPy)."""
    return (seed * 1_000_003 + epoch * 10_007 + index * 7_919 + 12_345) % (2**32)
