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


PANOPTIC_CATEGORIES = (  # (id, name, isthing): COCO-style ids, things first
    (1, "disc", 1),
    (2, "square", 1),
    (3, "triangle", 1),
    (4, "sky", 0),
    (5, "ground", 0),
)
THING_HUES = {1: (200, 60, 60), 2: (60, 170, 70), 3: (70, 90, 210)}
STUFF_COLORS = {4: (150, 190, 235), 5: (120, 95, 60)}


def thing_polygon(kind: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """The outline of a disc (a 24-gon), a square or a triangle: `[N, 2]` (x, y) float points."""
    if kind == 1:
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
    if kind == 2:
        return np.array(
            [
                [cx - radius, cy - radius],
                [cx + radius, cy - radius],
                [cx + radius, cy + radius],
                [cx - radius, cy + radius],
            ]
        )
    return np.array([[cx, cy - radius], [cx + radius, cy + radius], [cx - radius, cy + radius]])


def make_panoptic_scene(
    rng: np.random.Generator, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, list[np.ndarray]]]]:
    """One image of `size` (W, H): a sky band over a ground band (stuff) and 2-5 things (discs,
    squares, triangles), some of them touching another of their class; each instance a little
    brighter or darker than its neighbours. Returns (image, segment ids [H, W], segments: (id,
    category id, polygons)); segment ids are unique per image, 0 nowhere (every pixel is labelled)."""
    width, height = size
    horizon = int(rng.integers(height // 3, 2 * height // 3))
    ids = np.zeros((height, width), dtype=np.int32)
    ids[:horizon], ids[horizon:] = 1, 2
    segments: list[tuple[int, int, list[np.ndarray]]] = [(1, 4, []), (2, 5, [])]
    image = np.zeros((height, width, 3), dtype=np.float64)
    image[:horizon], image[horizon:] = STUFF_COLORS[4], STUFF_COLORS[5]
    next_id = 3
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(1, 4))
        radius = float(rng.uniform(min(size) / 10, min(size) / 5))
        cx, cy = float(rng.uniform(radius, width - 3 * radius)), float(rng.uniform(radius, height - radius))
        centres = [(cx, cy)] + ([(cx + 2 * radius, cy)] if rng.random() < 0.6 else [])  # a touching twin
        for x, y in centres:
            polygon = thing_polygon(kind, x, y, radius)
            shape = np.zeros((height, width), dtype=np.uint8)
            cv2.fillPoly(shape, [np.round(polygon).astype(np.int32)], 1)
            inside = shape.astype(bool)
            ids[inside] = next_id
            tone = np.array(THING_HUES[kind]) * rng.uniform(0.7, 1.15)
            image[inside] = tone
            edge = cv2.morphologyEx(shape, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool) & inside
            image[edge] *= 0.6
            segments.append((next_id, kind, [polygon]))
            next_id += 1
    image += rng.normal(0, 10, image.shape)
    present = set(np.unique(ids).tolist())
    segments = [s for s in segments if s[0] in present]  # a thing fully covered by a later one
    return image.clip(0, 255).astype(np.uint8), ids, segments


def make_panoptic_dataset(
    root: str | Path, n_train: int = 24, n_valid: int = 8, size: tuple[int, int] = (160, 120), *, seed: int = 0
) -> Path:
    """A COCO-format shapes set: `{split}_images/`, `annotations/panoptic_{split}.json` with
    `annotations/panoptic_{split}/*.png`, and the same things as polygons in
    `annotations/instances_{split}.json` (things only, as COCO's instances files)."""
    import json

    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = [
        {"id": i, "name": n, "isthing": t, "color": list(THING_HUES.get(i) or STUFF_COLORS[i])}
        for i, n, t in PANOPTIC_CATEGORIES
    ]
    for split, count in (("train", n_train), ("valid", n_valid)):
        images_dir, png_dir = root / f"{split}_images", root / "annotations" / f"panoptic_{split}"
        images_dir.mkdir(parents=True, exist_ok=True)
        png_dir.mkdir(parents=True, exist_ok=True)
        images, panoptic, instances = [], [], []
        for index in range(count):
            image, ids, segments = make_panoptic_scene(rng, size)
            name = f"{split}_{index:04d}"
            Image.fromarray(image).save(images_dir / f"{name}.jpg", quality=95)
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
            Image.fromarray(rgb).save(png_dir / f"{name}.png")
            image_id = index + 1
            images.append({"id": image_id, "file_name": f"{name}.jpg", "width": size[0], "height": size[1]})
            infos = []
            for segment_id, category, polygons in segments:
                area = int((ids == segment_id).sum())
                ys, xs = np.nonzero(ids == segment_id)
                bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
                infos.append({"id": segment_id, "category_id": category, "iscrowd": 0, "area": area, "bbox": bbox})
                if polygons:
                    instances.append(
                        {
                            "id": len(instances) + 1,
                            "image_id": image_id,
                            "category_id": category,
                            "segmentation": [[round(float(v), 2) for v in p.reshape(-1)] for p in polygons],
                            "area": area,
                            "bbox": bbox,
                            "iscrowd": 0,
                        }
                    )
            panoptic.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": infos})
        with open(root / "annotations" / f"panoptic_{split}.json", "w") as handle:
            json.dump({"images": images, "annotations": panoptic, "categories": categories}, handle)
        things = [c for c in categories if c["isthing"]]
        with open(root / "annotations" / f"instances_{split}.json", "w") as handle:
            json.dump({"images": images, "annotations": instances, "categories": things}, handle)
    return root


def clustered_unit_vectors(count: int, dim: int, *, clusters: int = 1000, spread: float = 1.0, seed: int = 0):
    """`count` L2-normalised float32 rows around `clusters` random centres (noise `spread` of a
    centre's norm): the shape of image embeddings (groups of similar images), for index benchmarks
    and tests that need many vectors but no images. Made in blocks: 10^6 x 384 needs no copy."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 65_536):
        n = min(65_536, count - start)
        block = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(kind: str, image: np.ndarray, center: tuple[int, int], radius: int, angle: float, color) -> None:
    """One filled shape on `image` (in place)."""
    cx, cy = center
    if kind == "circle":
        cv2.circle(image, (cx, cy), radius, color, -1, cv2.LINE_AA)
        return
    if kind == "cross":
        arm = max(2, radius // 3)
        corners = [(-radius, -arm), (radius, -arm), (radius, arm), (-radius, arm)]
        polygons = [corners, [(y, x) for x, y in corners]]
    else:
        count = 4 if kind == "square" else 3
        polygons = [
            [(radius * np.cos(2 * np.pi * i / count), radius * np.sin(2 * np.pi * i / count)) for i in range(count)]
        ]
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    for polygon in polygons:
        points = (np.array(polygon, dtype=np.float64) @ rotation.T + (cx, cy)).round().astype(np.int32)
        cv2.fillPoly(image, [points], color, cv2.LINE_AA)


def make_shape_folders(
    root: str | Path, per_class: int = 200, val_per_class: int = 50, size: int = 98, seed: int = 0
) -> Path:
    """`train/<shape>/` and `val/<shape>/` under `root`: one shape (SHAPES) per image, in a random
    colour on a random-colour noisy background, at a random place, size and angle. Colour says
    nothing of the class, so a random-init backbone's kNN is near chance (pretrain.py's figure)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for kind in SHAPES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                background = rng.integers(0, 256, 3)
                image = (background + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
                color = tuple(int(c) for c in rng.integers(0, 256, 3))
                radius = int(rng.uniform(0.2, 0.38) * size)
                center = tuple(int(c) for c in rng.integers(radius, size - radius, 2))
                draw_shape(kind, image, center, radius, float(rng.uniform(0, 2 * np.pi)), color)
                cv2.imwrite(str(folder / f"{kind}_{i:04d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root
