"""Drawing a predicted mask for people: a colour overlay, class names at their regions, a legend,
and the raw prediction as a palette PNG. Shared by the inference scripts and the notebook."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

from dinokit.data.labels import ColorMap

FONT = cv2.FONT_HERSHEY_SIMPLEX


class Segmenter(Protocol):
    """What drawing predictions needs of a predictor (inference.Predictor is one)."""

    classes: list[str]
    color_map: ColorMap

    def predict(self, image: np.ndarray) -> np.ndarray: ...


def blend(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`colors` (uint8 RGB, the image's size) over the image with opacity `alpha`."""
    return cv2.addWeighted(image, 1 - alpha, colors, alpha, 0)


def overlay(image: np.ndarray, mask: np.ndarray, color_map: ColorMap, alpha: float = 0.5) -> np.ndarray:
    """Blend the class colours into the image; classes coloured black (VOC background) stay unblended."""
    # Colours and "is black" are looked up per class value in 256-entry tables (cv2.LUT), not per
    # pixel channel: the same pixels in a fifth of the time on a video frame, where drawing costs
    # as much as the network on a GPU.
    table = color_map.decode(np.arange(256, dtype=np.uint8))
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    blended = blend(image, cv2.LUT(cv2.merge([mask, mask, mask]), table[:, None, :]), alpha)
    black = np.where(table.any(axis=-1), 0, 255).astype(np.uint8)
    cv2.copyTo(image, cv2.LUT(mask, black), blended)
    return blended


def draw_class_names(
    image: np.ndarray, mask: np.ndarray, classes: Sequence[str], min_fraction: float = 0.005, skip: Sequence[int] = ()
) -> np.ndarray:
    """Write each class's name at the most interior point of its region (regions < min_fraction and
    classes in `skip` left out)."""
    out = image.copy()
    scale = max(0.4, min(out.shape[:2]) / 900)
    counts = np.bincount(mask.ravel(), minlength=256)
    for cls in np.flatnonzero(counts):
        if cls in skip or cls >= len(classes) or counts[cls] / mask.size < min_fraction:
            continue
        y, x = most_interior_point(mask == cls)
        text = classes[cls]
        (w, h), _ = cv2.getTextSize(text, FONT, scale, 1)
        origin = (int(np.clip(x - w // 2, 0, max(0, out.shape[1] - w))), int(np.clip(y + h // 2, h, out.shape[0] - 1)))
        cv2.putText(out, text, origin, FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, text, origin, FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def most_interior_point(region: np.ndarray) -> tuple[int, int]:
    """(y, x) of the region's pixel farthest from its border and the image's edge (the first one in
    reading order on ties). The distance transform runs on the region's bounding box with a ring of
    background around it: every path out of the region crosses that ring, so the distances are the
    ones of the whole image, for the area of the box."""
    region = region.astype(np.uint8)
    left, top, width, height = cv2.boundingRect(region)
    boxed = np.pad(region[top : top + height, left : left + width], 1)
    distance = cv2.distanceTransform(boxed, cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(distance.argmax(), distance.shape)
    return int(y) + top, int(x) + left


def draw_legend(image: np.ndarray, mask: np.ndarray, classes: Sequence[str], color_map: ColorMap) -> np.ndarray:
    """A small top-left legend: a swatch and the name of each class present in the mask."""
    out = image.copy()
    present = [int(c) for c in np.unique(mask) if c < len(classes)]
    if not present:
        return out
    scale = max(0.35, min(out.shape[:2]) / 1200)
    line = int(22 * scale / 0.5)
    width = max(cv2.getTextSize(classes[c], FONT, scale, 1)[0][0] for c in present) + line + 12
    height = line * len(present) + 8
    panel = out[:height, :width]
    panel[:] = (panel * 0.4).astype(np.uint8)  # darken behind the legend for contrast
    for row, cls in enumerate(present):
        top = 4 + row * line
        color = tuple(int(v) for v in color_map.colors[cls])
        cv2.rectangle(out, (4, top + 2), (4 + line - 6, top + line - 4), color, thickness=-1)
        cv2.rectangle(out, (4, top + 2), (4 + line - 6, top + line - 4), (255, 255, 255), thickness=1)
        cv2.putText(out, classes[cls], (line + 4, top + line - 6), FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def render(
    image: np.ndarray, mask: np.ndarray, classes: Sequence[str], color_map: ColorMap, alpha: float = 0.5
) -> np.ndarray:
    """Overlay + class names + legend: what infer_image.py and infer_video.py write."""
    drawn = overlay(image, mask, color_map, alpha)
    unblended = [i for i, color in enumerate(color_map.colors) if not color.any()]  # e.g. VOC background
    drawn = draw_class_names(drawn, mask, classes, skip=unblended)
    return draw_legend(drawn, mask, classes, color_map)


def indexed_png(mask: np.ndarray, color_map: ColorMap) -> Image.Image:
    """The raw prediction as a palette PNG: pixel value = class index, shown in the dataset's colours."""
    image = Image.fromarray(mask.astype(np.uint8))  # mode "L"; putpalette makes it "P"
    image.putpalette(color_map.decode(np.arange(256, dtype=np.uint8)).flatten().tolist())
    return image


def class_shares(mask: np.ndarray, num_classes: int) -> list[tuple[int, float]]:
    """(class index, share of the image's pixels) of each class present, largest first."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
    present = np.flatnonzero(counts)
    return [(int(c), float(counts[c] / mask.size)) for c in sorted(present, key=lambda c: (-counts[c], c))]
