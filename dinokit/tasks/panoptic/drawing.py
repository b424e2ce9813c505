"""Drawing a panoptic prediction: one colour per instance (its class's colour, shifted per instance),
contours around every segment, each segment's class name at its most interior point; the COCO
panoptic PNG and segments list of one image; and colours that follow an instance from frame to frame
(the best mask IoU with the previous frame's segments of its class)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from PIL import Image

from dinokit.prediction.drawing import FONT, blend, most_interior_point
from dinokit.tasks.panoptic.coco import LABEL_DIVISOR, Categories
from dinokit.tasks.panoptic.predictions import ObjectPrediction

MATCH_IOU = 0.3  # a segment keeps a previous frame's colour above this mask IoU


def instance_color(base: Sequence[int], instance: int) -> tuple[int, int, int]:
    """The class colour for instance 0/1, then lighter and darker variants (golden-ratio steps)."""
    if instance <= 1:
        return tuple(int(v) for v in base)
    shift = ((instance * 0.618033988749895) % 1.0 - 0.5) * 160
    return tuple(int(np.clip(v + shift, 0, 255)) for v in base)


def segment_list(panoptic: np.ndarray) -> list[int]:
    return [int(v) for v in np.unique(panoptic) if v >= 0]


class SegmentColors:
    """Colours per segment value; with `track`, a segment takes the colour of the previous frame's
    segment of its class it overlaps most (mask IoU > MATCH_IOU), else a new one."""

    def __init__(self, categories: Categories, track: bool = False):
        self.categories, self.track = categories, track
        self.previous: dict[int, tuple[np.ndarray, tuple[int, int, int]]] = {}
        self.next_instance: dict[int, int] = {}

    def __call__(self, panoptic: np.ndarray) -> dict[int, tuple[int, int, int]]:
        colors, current = {}, {}
        taken: set[int] = set()
        for value in segment_list(panoptic):
            cls, instance = value // LABEL_DIVISOR, value % LABEL_DIVISOR
            mask = panoptic == value
            color = None
            if self.track and instance > 0:
                best, best_iou = None, MATCH_IOU
                for old, (old_mask, _) in self.previous.items():
                    if old // LABEL_DIVISOR != cls or old in taken:
                        continue
                    union = np.logical_or(mask, old_mask).sum()
                    iou = np.logical_and(mask, old_mask).sum() / max(union, 1)
                    if iou > best_iou:
                        best, best_iou = old, iou
                if best is not None:
                    taken.add(best)
                    color = self.previous[best][1]
                else:
                    self.next_instance[cls] = self.next_instance.get(cls, 0) + 1
                    color = instance_color(self.categories.colors[cls], self.next_instance[cls])
            if color is None:
                color = instance_color(self.categories.colors[cls], instance)
            colors[value] = color
            current[value] = (mask, color)
        if self.track:
            self.previous = current
        return colors


def draw_panoptic(
    image: np.ndarray,
    panoptic: np.ndarray,
    categories: Categories,
    colors: dict[int, tuple[int, int, int]],
    alpha: float = 0.5,
) -> np.ndarray:
    """The image with every segment blended in its colour, outlined, and named."""
    painted = image.copy()
    for value, color in colors.items():
        painted[panoptic == value] = color
    drawn = blend(image, painted, alpha)
    unlabelled = panoptic < 0
    drawn[unlabelled] = image[unlabelled]
    scale = max(0.35, min(image.shape[:2]) / 900)
    for value in colors:
        region = (panoptic == value).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(drawn, contours, -1, (255, 255, 255), 1, cv2.LINE_AA)
        if region.sum() < 0.002 * region.size:
            continue
        y, x = most_interior_point(region.astype(bool))
        text = categories.names[value // LABEL_DIVISOR]
        (w, h), _ = cv2.getTextSize(text, FONT, scale, 1)
        origin = (
            int(np.clip(x - w // 2, 0, max(0, drawn.shape[1] - w))),
            int(np.clip(y + h // 2, h, drawn.shape[0] - 1)),
        )
        cv2.putText(drawn, text, origin, FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(drawn, text, origin, FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return drawn


def color_panoptic(panoptic: np.ndarray, colors: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """The segments in their colours on black."""
    out = np.zeros((*panoptic.shape, 3), dtype=np.uint8)
    for value, color in colors.items():
        out[panoptic == value] = color
    return out


def coco_panoptic(prediction: ObjectPrediction, categories: Categories) -> tuple[Image.Image, list[dict[str, Any]]]:
    """The COCO panoptic PNG (segment id = R + 256 G + 256^2 B, 0 = no segment) and its segments_info."""
    panoptic = prediction.panoptic
    ids = np.zeros(panoptic.shape, dtype=np.int64)
    segments = []
    for number, value in enumerate(segment_list(panoptic), start=1):
        mask = panoptic == value
        ids[mask] = number
        ys, xs = np.nonzero(mask)
        cls = value // LABEL_DIVISOR
        segments.append(
            {
                "id": number,
                "category_id": categories.ids[cls],
                "category": categories.names[cls],
                "isthing": int(categories.isthing[cls]),
                "iscrowd": 0,
                "area": int(mask.sum()),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                "score": round(prediction.scores.get(value, 0.0), 4),
            }
        )
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    return Image.fromarray(rgb), segments


def legend_html(
    panoptic: np.ndarray, categories: Categories, colors: dict[int, tuple[int, int, int]], scores: dict[int, float]
) -> str:
    """The segments, largest first: colour, class, share of the image, score."""
    values = sorted(colors, key=lambda v: -int((panoptic == v).sum()))
    rows = "".join(
        f'<tr><td><span style="display:inline-block;width:1em;height:1em;border:1px solid #888;'
        f'background:rgb{colors[v]}"></span></td><td>{html.escape(categories.names[v // LABEL_DIVISOR])}</td>'
        f"<td style='text-align:right'>{100 * (panoptic == v).mean():.1f} %</td>"
        f"<td style='text-align:right'>{scores.get(v, 0.0):.2f}</td></tr>"
        for v in values
    )
    return (
        '<table class="legend"><tr><th></th><th>segment</th><th>share of the image</th><th>score</th></tr>'
        f"{rows}</table>"
    )
