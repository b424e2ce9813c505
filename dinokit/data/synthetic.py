"""Small synthetic datasets for `make demo`, the tests and bench.py: segmentation pairs in the VOC
Kaggle layout (`make_dataset`), classification images in ImageFolder layout (`make_image_folders`),
and RGB-D scenes whose depth the image shows (`make_depth_dataset`).

Each image is a noisy background with a few filled shapes; each shape's class decides its image
colour, so even a random-init backbone's features separate the classes and a short run learns.
Masks are RGB colour PNGs in the VOC palette with a void (224,224,192) outline, as in real VOC.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

import config


def make_pair(
    rng: np.random.Generator,
    size: tuple[int, int],
    class_ids: Sequence[int],
    colors: Sequence[Sequence[int]],
    void_color: Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One `(image RGB, colour mask RGB)` pair of `size` (W, H) with 1-3 shapes of classes drawn from `class_ids`."""
    width, height = size
    image = rng.normal(110, 20, (height, width, 3)).clip(0, 255).astype(np.uint8)
    mask = np.zeros((height, width, 3), dtype=np.uint8)
    mask[:] = colors[0]
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.choice(class_ids))
        # Image colour of a class: a fixed hue per class, plus noise added below.
        hue = np.array([(cls * 67) % 256, (cls * 131 + 80) % 256, (cls * 29 + 160) % 256], dtype=np.float64)
        shape = np.zeros((height, width), dtype=np.uint8)
        cx, cy = int(rng.integers(width // 5, 4 * width // 5)), int(rng.integers(height // 5, 4 * height // 5))
        radius = int(rng.integers(min(size) // 8, min(size) // 3))
        if rng.random() < 0.5:
            cv2.circle(shape, (cx, cy), radius, 1, thickness=-1)
        else:
            cv2.rectangle(shape, (cx - radius, cy - radius), (cx + radius, cy + radius), 1, thickness=-1)
        inside = shape.astype(bool)
        image[inside] = (hue + rng.normal(0, 12, (inside.sum(), 3))).clip(0, 255).astype(np.uint8)
        mask[inside] = colors[cls]
        if void_color is not None:
            outline = cv2.morphologyEx(shape, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
            mask[outline] = void_color
    return image, mask


def make_dataset(
    root: str | Path,
    n_train: int = 24,
    n_valid: int = 8,
    size: tuple[int, int] = (160, 120),
    class_ids: Sequence[int] = (1, 7, 8, 12, 15),
    colors: Sequence[Sequence[int]] = config.COLORS,
    void_color: Sequence[int] | None = config.IGNORE_COLORS[0],
    seed: int = 0,
) -> Path:
    """Write `{train,valid}_{images,labels}/` under `root` (JPEG images, PNG masks) and return `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("valid", n_valid)):
        (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
        (root / f"{split}_labels").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = make_pair(rng, size, class_ids, colors, void_color)
            stem = f"{split}_{i:04d}"
            cv2.imwrite(
                str(root / f"{split}_images" / f"{stem}.jpg"),
                cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95],
            )
            cv2.imwrite(str(root / f"{split}_labels" / f"{stem}.png"), cv2.cvtColor(mask, cv2.COLOR_RGB2BGR))
    return root


def make_image_folders(
    root: str | Path,
    classes: int = 3,
    n_train: int = 6,
    n_val: int = 2,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
) -> Path:
    """Write `train/<class>/` and `val/<class>/` under `root`: noisy images whose mean colour is the
    class's, as JPEGs (every third with an upper-case .JPG), and return `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in (("train", n_train), ("val", n_val)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            color = np.array(
                [(label * 97 + 40) % 256, (label * 53 + 120) % 256, (label * 151 + 200) % 256], dtype=np.float64
            )
            for i in range(count):
                image = (color + rng.normal(0, 25, (height, width, 3))).clip(0, 255).astype(np.uint8)
                suffix = ".JPG" if i % 3 == 2 else ".jpg"
                cv2.imwrite(str(folder / f"{split}_{label}_{i:03d}{suffix}"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root


def make_depth_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One `(image RGB, depth metres)` scene of `size` (W, H): a textured ground plane whose depth grows
    from 1 m at the bottom row to 6 m at the top (its texture fades with distance, so the image shows
    the depth), a box standing at 2 m (brighter: nearer), and an unmeasured (0) strip at the top."""
    width, height = size
    rows = np.linspace(6.0, 1.0, height, dtype=np.float32)[:, None].repeat(width, axis=1)
    shade = (200 - 25 * rows).clip(0, 255)  # near is bright
    texture = rng.normal(0, 1, (height, width)) * (30 / rows)
    image = np.stack([shade + texture, shade * 0.8 + texture, shade * 0.6 + texture], axis=-1)
    depth = rows.copy()
    box_w, box_h = width // 4, height // 3
    left, top = int(rng.integers(0, width - box_w)), int(rng.integers(height // 3, height - box_h))
    depth[top : top + box_h, left : left + box_w] = 2.0
    image[top : top + box_h, left : left + box_w] = (220, 60, 60)
    depth[: max(1, height // 20)] = 0.0
    return image.clip(0, 255).astype(np.uint8), depth


def make_depth_dataset(
    root: str | Path, n_train: int = 8, n_valid: int = 4, size: tuple[int, int] = (96, 72), seed: int = 0
) -> Path:
    """An RGB-D folder (dinokit/tasks/depth/files.py): JPEG images, 16-bit millimetre PNG depth, depth.json."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, count in (("train", n_train), ("valid", n_valid)):
        (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
        (root / f"{split}_depth").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, depth = make_depth_scene(rng, size)
            Image.fromarray(image).save(root / f"{split}_images" / f"{split}_{index:04d}.jpg", quality=95)
            millimetres = np.round(depth * 1000).astype(np.uint16)
            Image.fromarray(millimetres).save(root / f"{split}_depth" / f"{split}_{index:04d}.png")
    (root / "depth.json").write_text('{"depth_scale": 1000, "min_depth": 0.001, "max_depth": 10}\n')
    return root
