"""Images + colour masks -> (normalised image tensor, class-index mask) pairs, with augmentation.

Layout of a dataset directory (Pascal VOC as distributed on Kaggle, or anything shaped like it):

    <data-dir>/train_images/*.jpg   <data-dir>/train_labels/*.png
    <data-dir>/valid_images/*.jpg   <data-dir>/valid_labels/*.png

Images and masks are paired by file stem. The classes and their colours come from
`<data-dir>/classes.json` (or `--classes FILE`), else the Pascal VOC defaults of config.py:

    {"classes": [{"name": "sky", "color": [128, 128, 128]}, ...],
     "ignore_color": [0, 0, 0],         # or "ignore_colors": [[...], ...]; optional
     "ignore_index": 255,               # value of ignored pixels in index masks; optional
     "mask_format": "auto"}             # auto | color | index; optional

Masks are read per file: RGB(A) colour PNGs and palette ('P') PNGs are mapped by colour through
`ColorMap`; single-channel PNGs (8 or 16 bit) are index masks, pixel value = class index
(`mask_format: "color"` reads them as gray colours instead, e.g. for 0/255 binary masks).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import config
from utils import distributed, rank, world_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "valid")

Color = Sequence[int]


class DatasetError(ValueError):
    """A dataset file or folder that cannot be used as it is; the message names it."""


def _color_code(rgb: np.ndarray) -> np.ndarray:
    """Pack `[..., 3]` uint8 RGB into one int32 per pixel so colours compare as integers."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class ColorMap:
    """The one colour <-> class-index mapping used by training, inference and the notebook."""

    def __init__(self, colors: Sequence[Color], ignore_colors: Sequence[Color] = (), ignore_index: int = config.IGNORE_INDEX):
        if not 0 < len(colors) <= 254 or not len(colors) <= ignore_index <= 255:
            raise ValueError(f"need 1..254 classes and an ignore index in [num_classes, 255]; got {len(colors)}, {ignore_index}")
        self.colors = np.array(colors, dtype=np.uint8).reshape(-1, 3)
        self.ignore_colors = np.array(ignore_colors, dtype=np.uint8).reshape(-1, 3)
        self.ignore_index = ignore_index
        codes = _color_code(np.concatenate([self.colors, self.ignore_colors]))
        values = np.concatenate([np.arange(len(self.colors)), np.full(len(self.ignore_colors), ignore_index)])
        if len(np.unique(codes)) != len(codes):
            raise ValueError("the same colour is listed twice among the class and ignore colours")
        order = np.argsort(codes)
        self._codes, self._values = codes[order], values[order].astype(np.uint8)

    @property
    def num_classes(self) -> int:
        return len(self.colors)

    def encode(self, mask_rgb: np.ndarray, source: str | Path = "mask") -> np.ndarray:
        """`[H, W, 3]` RGB colour mask -> `[H, W]` uint8 class indices (ignore colours -> ignore_index)."""
        codes = _color_code(mask_rgb)
        slot = np.searchsorted(self._codes, codes).clip(max=len(self._codes) - 1)
        known = self._codes[slot] == codes
        if not known.all():
            unknown, counts = np.unique(codes[~known], return_counts=True)
            listed = ", ".join(
                f"({c >> 16 & 255},{c >> 8 & 255},{c & 255}) x{n}" for c, n in list(zip(unknown, counts))[:5]
            )
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise DatasetError(f"{source}: colours not in the class palette (pixel counts): {listed}{more}")
        return self._values[slot]

    def check_indices(self, index: np.ndarray, source: str | Path = "mask") -> np.ndarray:
        """An index mask as uint8 class indices; values that are neither a class nor the ignore index are an error."""
        bad = (index >= self.num_classes) & (index != self.ignore_index)
        if bad.any():
            values, counts = np.unique(index[bad], return_counts=True)
            listed = ", ".join(f"{v} x{n}" for v, n in list(zip(values, counts))[:5])
            raise DatasetError(f"{source}: index mask values outside the {self.num_classes} classes and ignore index "
                               f"{self.ignore_index} (pixel counts): {listed}")
        return index.astype(np.uint8)

    def decode(self, index: np.ndarray) -> np.ndarray:
        """`[H, W]` class indices -> `[H, W, 3]` uint8 RGB; ignore pixels get the first ignore colour."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = self.colors
        if len(self.ignore_colors):
            lut[self.ignore_index] = self.ignore_colors[0]
        return lut[index]


MASK_FORMATS = ("auto", "color", "index")


@dataclass
class DatasetSpec:
    """What a dataset's pixel values mean: class names, their colours, what to ignore."""

    classes: list[str]
    colors: list[tuple[int, int, int]]
    ignore_colors: list[tuple[int, int, int]] = field(default_factory=list)
    ignore_index: int = config.IGNORE_INDEX
    mask_format: str = "auto"
    source: str = "Pascal VOC defaults (config.py)"

    def color_map(self) -> ColorMap:
        return ColorMap(self.colors, self.ignore_colors, self.ignore_index)


VOC = DatasetSpec(list(config.CLASSES), list(config.COLORS), list(config.IGNORE_COLORS))


def _color(value, where: str) -> tuple[int, int, int]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"{where} must be [r, g, b] with integers 0-255, got {value!r}")
    return tuple(value)  # type: ignore[return-value]


def load_dataset_spec(data_dir: str | Path, classes_file: str | Path | None = None) -> DatasetSpec:
    """The dataset description: `classes_file`, else `<data_dir>/classes.json`, else VOC."""
    path = Path(classes_file) if classes_file else Path(data_dir) / "classes.json"
    if not path.is_file():
        if classes_file:
            raise DatasetError(f"{path}: dataset description file not found")
        return VOC
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not a readable JSON file ({err})") from err
    try:
        if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list) or not raw["classes"]:
            raise ValueError('"classes" must be a non-empty list of {"name": ..., "color": [r, g, b]}')
        names, colors = [], []
        for i, entry in enumerate(raw["classes"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "color" not in entry:
                raise ValueError(f'classes[{i}] must be {{"name": str, "color": [r, g, b]}}, got {entry!r}')
            names.append(entry["name"])
            colors.append(_color(entry["color"], f"classes[{i}].color"))
        if "ignore_color" in raw and "ignore_colors" in raw:
            raise ValueError('give "ignore_color" or "ignore_colors", not both')
        ignore = [raw["ignore_color"]] if "ignore_color" in raw else raw.get("ignore_colors", [])
        ignore_colors = [_color(c, "ignore colour") for c in ignore]
        ignore_index = raw.get("ignore_index", config.IGNORE_INDEX)
        if not isinstance(ignore_index, int) or not len(names) <= ignore_index <= 255:
            raise ValueError(f'"ignore_index" must be an integer in [{len(names)}, 255], got {ignore_index!r}')
        mask_format = raw.get("mask_format", "auto")
        if mask_format not in MASK_FORMATS:
            raise ValueError(f'"mask_format" must be one of {", ".join(MASK_FORMATS)}, got {mask_format!r}')
        spec = DatasetSpec(names, colors, ignore_colors, ignore_index, mask_format, str(path))
        spec.color_map()  # duplicate colours, class count
    except ValueError as err:
        raise DatasetError(f"{path}: {err}") from err
    return spec


def read_mask(path: str | Path, color_map: ColorMap, mask_format: str = "auto") -> np.ndarray:
    """A mask file as `[H, W]` uint8 class indices, whatever its format (see the module docstring)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # palette PNGs come back as BGR colours
    if mask is None:
        raise DatasetError(f"{path}: cannot be read as an image (missing, corrupt or unsupported format)")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim == 2:
        if mask_format == "color":
            return color_map.encode(np.repeat(mask[..., None], 3, axis=2).astype(np.uint8), path)
        return color_map.check_indices(mask, path)
    if mask_format == "index":
        raise DatasetError(f"{path}: a colour mask, but the dataset description says mask_format \"index\"")
    if mask.dtype != np.uint8:
        raise DatasetError(f"{path}: {mask.dtype} colour masks are not supported (use 8-bit RGB or palette PNGs)")
    return color_map.encode(cv2.cvtColor(mask[..., :3], cv2.COLOR_BGR2RGB), path)


MAX_SIDE = 4096


def check_imgsz(imgsz: Sequence[int], patch_size: int = 14) -> None:
    """`--imgsz W H` must hold at least one patch per side and stay below absurd sizes."""
    if min(imgsz) < patch_size or max(imgsz) > MAX_SIDE:
        raise ValueError(f"--imgsz {imgsz[0]} {imgsz[1]}: each side must be in [{patch_size}, {MAX_SIDE}]")


def round_to_patch(imgsz: Sequence[int], patch_size: int = 14) -> tuple[int, int]:
    """Round (width, height) up to multiples of the patch size (640 -> 644)."""
    if len(imgsz) != 2 or min(imgsz) < 1:
        raise ValueError(f"image size must be two positive integers W H, got {list(imgsz)}")
    return tuple(math.ceil(side / patch_size) * patch_size for side in imgsz)  # type: ignore[return-value]


def read_image(path: str | Path) -> np.ndarray:
    """Read any image file as `[H, W, 3]` uint8 RGB (grayscale and RGBA are converted)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"{path}: cannot be read as an image (missing, corrupt or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _files_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    if not files:
        raise DatasetError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def find_pairs(data_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
    """`(image, mask)` paths of one split, paired by stem; an image without a mask (or the reverse) is an error."""
    data_dir = Path(data_dir)
    images = _files_by_stem(data_dir / f"{split}_images")
    masks = _files_by_stem(data_dir / f"{split}_labels")
    problems = [f"no mask for {images[s].name}" for s in sorted(images.keys() - masks.keys())]
    problems += [f"no image for {masks[s].name}" for s in sorted(masks.keys() - images.keys())]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetError(f"{data_dir}: {split} split has unpaired files: {shown}")
    return [(images[s], masks[s]) for s in sorted(images)]


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) as OpenCV will decode it (EXIF rotation applied), from the file header only."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            width, height = height, width
    return width, height


def check_pairs(pairs: list[tuple[Path, Path]]) -> None:
    """Fail before training on unreadable files and image/mask size mismatches (headers only: ~1 s for VOC)."""
    problems = []
    for image_path, mask_path in pairs:
        sizes = []
        for path in (image_path, mask_path):
            try:
                sizes.append(_header_size(path))
            except (OSError, SyntaxError, ValueError) as err:
                problems.append(f"{path}: not a readable image ({err.__class__.__name__})")
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            problems.append(f"{mask_path}: mask is {sizes[1][0]}x{sizes[1][1]} but its image {image_path.name} "
                            f"is {sizes[0][0]}x{sizes[0][1]}")
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise DatasetError("; ".join(problems[:3]) + more)


def train_transform(imgsz: tuple[int, int], ignore_index: int = config.IGNORE_INDEX) -> A.Compose:
    """The seed's augmentation: resize, flip, brightness/contrast, rotation (border -> ignore)."""
    width, height = imgsz
    return A.Compose([
        A.Resize(height, width),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(p=0.2),
        A.Rotate(limit=25, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index, p=0.5),
        A.Normalize(mean=config.MEAN, std=config.STD),
    ])


def eval_transform(imgsz: tuple[int, int], mean: Sequence[float] = config.MEAN, std: Sequence[float] = config.STD) -> A.Compose:
    """Resize + normalise: validation, feature caches and inference all preprocess with this."""
    width, height = imgsz
    return A.Compose([A.Resize(height, width), A.Normalize(mean=mean, std=std)])


class SegmentationDataset(Dataset):
    """Yields `(image [3, H, W] float32, mask [H, W] int64)`; masks resize with nearest neighbour."""

    def __init__(self, pairs: list[tuple[Path, Path]], color_map: ColorMap, transform: A.Compose, mask_format: str = "auto"):
        self.pairs = pairs
        self.color_map = color_map
        self.transform = transform
        self.mask_format = mask_format
        # With a seed, sample i of epoch e is always augmented the same way, whichever worker loads
        # it: runs repeat exactly and a resumed run continues as if never stopped.
        self.seed: int | None = None
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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load_pair(index)
        if self.seed is not None:
            seed_augmentation(self.transform, self.seed, self.epoch, index)
        out = self.transform(image=image, mask=mask)
        image_tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image_tensor, torch.from_numpy(out["mask"].astype(np.int64))


def build_datasets(data_dir: str | Path, imgsz: tuple[int, int], spec: DatasetSpec = VOC) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Train (augmented) and validation (resize only) datasets of `data_dir`."""
    train_pairs, valid_pairs = find_pairs(data_dir, "train"), find_pairs(data_dir, "valid")
    check_pairs(train_pairs + valid_pairs)
    color_map = spec.color_map()
    train = SegmentationDataset(train_pairs, color_map, train_transform(imgsz, color_map.ignore_index), spec.mask_format)
    valid = SegmentationDataset(valid_pairs, color_map, eval_transform(imgsz), spec.mask_format)
    return train, valid


def seed_augmentation(transform: A.Compose, *key: int) -> None:
    """Seed every transform of `transform` from `key`, each with its own stream.

    (albumentations' `set_random_seed` gives all transforms the same seed, so their first draws
    coincide: with p=0.5 flips and p=0.2 brightness changes, every brightness change would come
    with a flip.)"""
    children = np.random.SeedSequence(list(key)).spawn(len(transform.transforms) + 1)
    for target, child in zip([transform, *transform.transforms], children):
        target.random_generator = np.random.default_rng(child)
        target.py_random = random.Random(int(child.generate_state(1)[0]))


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
    dataset: SegmentationDataset, batch_size: int, shuffle: bool, workers: int, seed: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader whose order and augmentation depend only on (seed, epoch); call `set_epoch` per epoch.

    Shuffled (training) loaders restart their workers every epoch so that the dataset's epoch
    reaches them; validation loaders keep theirs. Under torchrun each process gets its share:
    training through DistributedSampler (equal counts, so every rank takes the same number of
    steps), evaluation through ShardSampler (exact counts)."""
    dataset.seed = seed
    sampler = None
    if distributed():
        if shuffle:
            sampler = torch.utils.data.DistributedSampler(dataset, world_size(), rank(), shuffle=True, seed=seed)
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
        generator=torch.Generator().manual_seed(epoch_seed(seed, 0)),
    )


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Make the next pass over `loader` the `epoch`-th: its shuffling and augmentation."""
    loader.dataset.epoch = epoch
    loader.generator.manual_seed(epoch_seed(loader.dataset.seed, epoch))
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
