"""A small synthetic segmentation dataset in the VOC Kaggle layout, for `make demo`, the tests and bench.py.

Each image is a noisy background with a few filled shapes; each shape's class decides its image
colour, so even a random-init backbone's features separate the classes and a short run learns.
Masks are RGB colour PNGs in the VOC palette with a void (224,224,192) outline, as in real VOC.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

import config


def make_pair(rng: np.random.Generator, size: tuple[int, int], class_ids: Sequence[int],
              colors: Sequence[Sequence[int]], void_color: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
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


def make_dataset(root: str | Path, n_train: int = 24, n_valid: int = 8, size: tuple[int, int] = (160, 120),
                 class_ids: Sequence[int] = (1, 7, 8, 12, 15), colors: Sequence[Sequence[int]] = config.COLORS,
                 void_color: Sequence[int] | None = config.IGNORE_COLORS[0], seed: int = 0) -> Path:
    """Write `{train,valid}_{images,labels}/` under `root` (JPEG images, PNG masks) and return `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("valid", n_valid)):
        (root / f"{split}_images").mkdir(parents=True, exist_ok=True)
        (root / f"{split}_labels").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask = make_pair(rng, size, class_ids, colors, void_color)
            stem = f"{split}_{i:04d}"
            cv2.imwrite(str(root / f"{split}_images" / f"{stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(root / f"{split}_labels" / f"{stem}.png"), cv2.cvtColor(mask, cv2.COLOR_RGB2BGR))
    return root
