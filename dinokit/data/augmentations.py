"""Training augmentation of each `--recipe`: the seed's, the DINOv2 paper's, and DINOv3's.

`paper` is the pipeline of Meta's linear-head configs for VOC 2012 / ADE20K, which are
mmsegmentation 0.x's standard ones (mmseg/datasets/pipelines/transforms.py, 0.27):

    Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))  -> RandomRescale
    RandomCrop(crop_size=518, cat_max_ratio=0.75)          -> ClassBalancedCrop
    RandomFlip(prob=0.5)                                   -> A.HorizontalFlip
    PhotoMetricDistortion()                                -> PhotoMetricDistortion
    Normalize(ImageNet mean/std)                           -> A.Normalize
    Pad(size=crop_size, pad_val=0, seg_pad_val=255)        -> A.PadIfNeeded, bottom/right, after Normalize

`dinov3` is Meta's DINOv3 linear-probe pipeline (dinov3/eval/segmentation/transforms.py,
make_segmentation_train_transforms with config-ade20k-linear-training.yaml): the same chain, but the
rescale sets the short side to int(512 r), r uniform in [0.5, 2.0], with no cap on the long side
(`RandomRescale(long_side_cap=False)`), and 512 crops. Normalisation is the backbone's (model_config.py).

Every random draw goes through the transform's own `py_random`, so `seed_augmentation` makes a
sample's augmentation a function of (seed, epoch, index) whichever worker loads it.
"""

from __future__ import annotations

import random
from typing import Any

import albumentations as A
import cv2
import numpy as np

import config

PAPER_CROP = 518  # Meta's configs: crop_size (518, 518), 37 patches of 14
PAPER_SHORT_SIDE = 512  # img_scale (2048, 512): short side 512, long side at most 2048
PAPER_RATIO_RANGE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75
CROPPED_RECIPES = ("paper", "dinov3", "eomt")  # square random crops (EoMT: DINOv3's rescale and crop)
DINOV3_CROP = 512  # Meta's DINOv3 config: img_size 512, crop_size [512, 512], 32 patches of 16
Normalization = tuple[tuple[float, ...], tuple[float, ...]]
IMAGENET: Normalization = (config.MEAN, config.STD)


def article_train_transform(
    imgsz: tuple[int, int], ignore_index: int = config.IGNORE_INDEX, normalization: Normalization = IMAGENET
) -> A.Compose:
    """The reference article's augmentation: resize, flip, brightness/contrast, rotation (border -> ignore)."""
    width, height = imgsz
    return A.Compose(
        [
            A.Resize(height, width),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(p=0.2),
            A.Rotate(limit=25, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index, p=0.5),
            A.Normalize(*normalization),
        ]
    )


def paper_train_transform(
    crop: int = PAPER_CROP,
    ignore_index: int = config.IGNORE_INDEX,
    normalization: Normalization = IMAGENET,
    *,
    long_side_cap: bool = True,
) -> A.Compose:
    """The DINOv2 paper's augmentation, or with `long_side_cap=False` DINOv3's (module docstring):
    every sample comes out `crop` x `crop`."""
    return A.Compose(
        [
            RandomRescale(PAPER_SHORT_SIDE, PAPER_RATIO_RANGE, long_side_cap=long_side_cap),
            ClassBalancedCrop(crop, CAT_MAX_RATIO, ignore_index),
            A.HorizontalFlip(p=0.5),
            PhotoMetricDistortion(),
            A.Normalize(*normalization),
            # mmseg pads after Normalize with 0 (= the mean colour), masks with the ignore index.
            A.PadIfNeeded(
                crop, crop, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index
            ),
        ]
    )


def train_transform(
    recipe: str,
    imgsz: tuple[int, int],
    ignore_index: int = config.IGNORE_INDEX,
    normalization: Normalization = IMAGENET,
) -> A.Compose:
    """The augmentation of `recipe`: the reference article's at `imgsz`, or the paper's / DINOv3's
    crops of side imgsz[0]."""
    if recipe in CROPPED_RECIPES:
        return paper_train_transform(imgsz[0], ignore_index, normalization, long_side_cap=recipe == "paper")
    return article_train_transform(imgsz, ignore_index, normalization)


DEPTH_ROTATION = 2.5  # degrees: Meta's NYU depth config, RandomRotate(prob=0.5, degree=2.5)


def depth_train_transform(imgsz: tuple[int, int], normalization: Normalization = IMAGENET) -> A.Compose:
    """Augmentation that keeps metric depth true (the depth map rides as the mask: nearest-neighbour,
    unmeasured (0) where rotation uncovers the border). The image is resized to `imgsz` as inference
    resizes it, with no random rescale or zoom: a zoomed-in scene looks nearer while its metres stay
    the same, which would teach the head to ignore what it sees. Flip and a small rotation leave the
    metres right; colour changes touch the image only."""
    width, height = imgsz
    return A.Compose(
        [
            A.Resize(height, width),
            A.HorizontalFlip(p=0.5),
            A.Rotate(limit=DEPTH_ROTATION, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5),
            PhotoMetricDistortion(),
            A.Normalize(*normalization),
        ]
    )


class RandomRescale(A.DualTransform):
    """mmseg `Resize` with `ratio_range`: draw r in `ratio_range`, rescale keeping the aspect ratio
    to the largest size with short side <= short_side * r and long side <= 4 * short_side * r
    (mmcv.imrescale; size rounded with int(x + 0.5)); image bilinear, mask nearest.
    `long_side_cap=False` is DINOv3's `FixedSideResize` instead: short side int(short_side * r)
    exactly, the long side int(short * long / short_before + 0.5), uncapped."""

    def __init__(
        self,
        short_side: int = PAPER_SHORT_SIDE,
        ratio_range: tuple[float, float] = PAPER_RATIO_RANGE,
        long_side_cap: bool = True,
    ):
        super().__init__(p=1.0)
        self.short_side, self.ratio_range, self.long_side_cap = short_side, ratio_range, long_side_cap

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = data["image"].shape[:2]
        ratio = self.py_random.uniform(*self.ratio_range)
        if not self.long_side_cap:
            short = int(self.short_side * ratio)
            if height > width:
                return {"size": (short, int(short * height / width + 0.5))}
            return {"size": (int(short * width / height + 0.5), short)}
        factor = min(4 * self.short_side * ratio / max(height, width), self.short_side * ratio / min(height, width))
        return {"size": (int(width * factor + 0.5), int(height * factor + 0.5))}

    def apply(self, img: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("short_side", "ratio_range", "long_side_cap")


class ClassBalancedCrop(A.DualTransform):
    """mmseg `RandomCrop` with `cat_max_ratio`: a random `size` x `size` window (smaller where the
    image is), redrawn up to 10 times until it holds at least two classes and no class covers
    `cat_max_ratio` or more of its labelled pixels; the last draw is kept if none does."""

    ATTEMPTS = 10

    def __init__(
        self, size: int = PAPER_CROP, cat_max_ratio: float = CAT_MAX_RATIO, ignore_index: int = config.IGNORE_INDEX
    ):
        super().__init__(p=1.0)
        self.size, self.cat_max_ratio, self.ignore_index = size, cat_max_ratio, ignore_index

    def _window(self, height: int, width: int) -> tuple[int, int, int, int]:
        top = self.py_random.randint(0, max(height - self.size, 0))
        left = self.py_random.randint(0, max(width - self.size, 0))
        return top, left, top + min(self.size, height), left + min(self.size, width)

    def balanced(self, mask: np.ndarray) -> bool:
        """Whether a crop's mask passes the class-ratio rule."""
        counts = np.bincount(mask[mask != self.ignore_index].ravel())
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        mask = data["mask"]
        window = self._window(*mask.shape[:2])
        if self.cat_max_ratio < 1:
            for _ in range(self.ATTEMPTS):
                top, left, bottom, right = window
                if self.balanced(mask[top:bottom, left:right]):
                    break
                window = self._window(*mask.shape[:2])
        return {"window": window}

    def apply(self, img: np.ndarray, window: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        top, left, bottom, right = window
        return np.ascontiguousarray(img[top:bottom, left:right])

    def apply_to_mask(self, mask: np.ndarray, window: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        return self.apply(mask, window)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "cat_max_ratio", "ignore_index")


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """mmseg `PhotoMetricDistortion` on uint8 RGB: brightness +-32, then contrast x[0.5, 1.5] either
    here or last (coin flip), saturation x[0.5, 1.5], hue +-18 (OpenCV's 0-180 hue), each applied
    with probability 1/2; every step clips to 0-255 and truncates to uint8, as mmseg's `convert`."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__(p=1.0)
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta = saturation_range, hue_delta

    def get_params(self) -> dict[str, Any]:
        draw = self.py_random
        coin = lambda: draw.randint(0, 1) == 1  # noqa: E731 - mmseg's random.randint(2)
        return {
            "brightness": draw.uniform(-self.brightness_delta, self.brightness_delta) if coin() else None,
            "contrast_first": coin(),
            "contrast": draw.uniform(*self.contrast_range) if coin() else None,
            "saturation": draw.uniform(*self.saturation_range) if coin() else None,
            "hue": draw.randint(-self.hue_delta, self.hue_delta) if coin() else None,
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float | None,
        contrast_first: bool,
        contrast: float | None,
        saturation: float | None,
        hue: int | None,
        **params: Any,
    ) -> np.ndarray:
        if brightness is not None:
            img = _convert(img, beta=brightness)
        if contrast is not None and contrast_first:
            img = _convert(img, alpha=contrast)
        if saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(int) + hue) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast is not None and not contrast_first:
            img = _convert(img, alpha=contrast)
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta")


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def seed_augmentation(transform: A.Compose, *key: int) -> None:
    """Seed every transform of `transform` from `key`, each with its own stream.

    (albumentations' `set_random_seed` gives all transforms the same seed, so their first draws
    coincide: with p=0.5 flips and p=0.2 brightness changes, every brightness change would come
    with a flip.)"""
    children = np.random.SeedSequence(list(key)).spawn(len(transform.transforms) + 1)
    for target, child in zip([transform, *transform.transforms], children):
        target.random_generator = np.random.default_rng(child)
        target.py_random = random.Random(int(child.generate_state(1)[0]))
