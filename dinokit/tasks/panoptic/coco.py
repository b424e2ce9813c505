"""COCO panoptic and COCO instances folders: finding a split's files, reading and checking its
annotations, and the one target both formats become.

Layouts (`split`: train / valid, as the other tasks; COCO 2017's own names work too):
    <data-dir>/{split}_images/*.jpg
    <data-dir>/annotations/panoptic_{split}.json + annotations/panoptic_{split}/*.png   (--task panoptic)
    <data-dir>/annotations/instances_{split}.json                                      (--task instance)
    COCO 2017: train2017/, val2017/, annotations/panoptic_train2017.json, instances_val2017.json, ...
A panoptic PNG stores segment ids as R + 256 G + 256^2 B; each id is described in the image's
`segments_info` (category, iscrowd). Instances are polygons or RLE (pycocotools), `iscrowd` RLE for
crowds. An instance-task model reads an instances file, else a panoptic one's thing segments.

The target of one image, whatever the format: an int32 map whose value is
`class index * LABEL_DIVISOR + instance number` (instance numbers from 1 for things, 0 for a stuff
class's one segment), `CROWD` instance 0 of a thing class (a crowd region: ignored by the loss,
COCO's crowd rule in the metrics) and `VOID` (-1) for pixels no segment covers. It resizes with
nearest neighbour like any mask, so the shared augmentation serves it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dinokit.data.image_files import DatasetError, read_image

LABEL_DIVISOR = 1000  # value = class * LABEL_DIVISOR + instance; at most 999 instances of a class in an image
VOID = -1
IGNORED = -2  # semantic masks' ignore index (--head eomt): out of the loss, like a crowd
COCO_2017 = {"train": "train2017", "valid": "val2017"}  # COCO's own names of the two splits
FORMATS = ("panoptic", "instances")


@dataclass(frozen=True)
class Categories:
    """A dataset's classes: names, COCO category ids, thing or stuff, colours (from the file when it gives them)."""

    names: tuple[str, ...]
    ids: tuple[int, ...]
    isthing: tuple[bool, ...]
    colors: tuple[tuple[int, int, int], ...]

    def things(self) -> Categories:
        """The thing classes alone (what an instance model predicts)."""
        keep = [i for i, thing in enumerate(self.isthing) if thing]
        return Categories(
            *(tuple(values[i] for i in keep) for values in (self.names, self.ids, self.isthing, self.colors))
        )

    def to_json(self) -> list[dict[str, Any]]:
        """COCO's `categories` list."""
        return [
            {"id": i, "name": n, "isthing": int(t), "color": list(c)}
            for n, i, t, c in zip(self.names, self.ids, self.isthing, self.colors)
        ]

    @classmethod
    def from_json(cls, raw: list[dict[str, Any]], where: str, *, instances: bool = False) -> Categories:
        if not isinstance(raw, list) or not raw:
            raise DatasetError(f"{where}: no categories")
        rows = []
        for entry in raw:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry:
                raise DatasetError(f"{where}: a category needs an integer id and a name, got {entry!r}"[:300])
            thing = bool(entry.get("isthing", 1 if instances else 0))
            rows.append((entry["id"], str(entry["name"]), thing, entry.get("color")))
        rows.sort()
        ids = [r[0] for r in rows]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{where}: category ids listed twice")
        colors = [tuple(int(v) for v in r[3]) if r[3] else category_color(k) for k, r in enumerate(rows)]
        return cls(tuple(r[1] for r in rows), tuple(ids), tuple(r[2] for r in rows), tuple(colors))


def category_color(index: int) -> tuple[int, int, int]:
    """A distinct colour per class for files that give none (golden-angle hues)."""
    hue = (index * 0.618033988749895) % 1.0
    rgb = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 200, 230)).convert("RGB")).reshape(3)
    return tuple(int(v) for v in rgb)


@dataclass(frozen=True)
class SplitFiles:
    """Where one split's files are."""

    images: Path
    annotations: Path  # the json
    format: str  # "panoptic" or "instances"
    masks: Path | None = None  # panoptic: the PNG folder


@dataclass
class Segment:
    """One annotated region of an image: its class index, crowd or not, and where it is (a panoptic
    PNG's id, or an instance's polygons / RLE)."""

    category: int
    iscrowd: bool
    png_id: int = 0
    geometry: Any = None


@dataclass
class ImageRecord:
    """An image of a split: its file, COCO id and size, and its segments."""

    image: Path
    image_id: int
    width: int
    height: int
    segments: list[Segment] = field(default_factory=list)
    mask: Path | None = None  # panoptic: its PNG


def candidates(data_dir: Path, split: str, kind: str) -> list[SplitFiles]:
    """The layouts a split may have: ours ({split}_images) and COCO 2017's (train2017, val2017)."""
    names = [(f"{split}_images", split)]
    if split in COCO_2017:
        names.append((COCO_2017[split], COCO_2017[split]))
    found = []
    for images, stem in names:
        notes = data_dir / "annotations" / f"{kind}_{stem}.json"
        masks = data_dir / "annotations" / f"panoptic_{stem}" if kind == "panoptic" else None
        found.append(SplitFiles(data_dir / images, notes, kind, masks))
    return found


def find_split(data_dir: str | Path, split: str, kinds: Iterable[str]) -> SplitFiles:
    """The first layout of `kinds` (in order) whose annotation file exists; else an error listing where it looked."""
    data_dir = Path(data_dir)
    looked = []
    for kind in kinds:
        for files in candidates(data_dir, split, kind):
            if files.annotations.is_file():
                if not files.images.is_dir():
                    raise DatasetError(f"{files.annotations}: its images folder {files.images} is missing")
                return files
            looked.append(str(files.annotations.relative_to(data_dir)))
    raise DatasetError(f"{data_dir}: no {split} annotations (looked for {', '.join(looked)})")


def split_files(annotations: Path, images: Path) -> SplitFiles:
    """The files of a split from its annotation file (panoptic PNGs: the folder of the file's name)."""
    kind = "panoptic" if annotations.name.startswith("panoptic") else "instances"
    return SplitFiles(images, annotations, kind, annotations.with_suffix("") if kind == "panoptic" else None)


def load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise DatasetError(f"{path}: not a COCO annotation file (no 'images' list)")
    return raw


def read_split(files: SplitFiles, things_only: bool = False) -> tuple[Categories, list[ImageRecord]]:
    """A split's categories and images, every reference checked: each listed image exists at its
    listed size, each annotation's category is listed, polygons lie inside their image; the
    panoptic PNGs are checked when decoded (`check_records`)."""
    raw = load_json(files.annotations)
    where = str(files.annotations)
    categories = Categories.from_json(raw.get("categories"), where, instances=files.format == "instances")
    records = image_records(raw, files)
    if files.format == "panoptic":
        attach_panoptic(raw, files, categories, records)
    else:
        attach_instances(raw, files, categories, records)
    if things_only:
        categories = keep_things(categories, records.values())
    if not records:
        raise DatasetError(f"{where}: the split has no images")
    return categories, sorted(records.values(), key=lambda r: r.image.name)


def image_records(raw: dict[str, Any], files: SplitFiles) -> dict[int, ImageRecord]:
    records = {}
    for entry in raw["images"]:
        try:
            image_id, name, width, height = entry["id"], entry["file_name"], int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(
                f"{files.annotations}: an image entry lacks id/file_name/width/height: {entry!r}"[:300]
            ) from err
        path = files.images / name
        if not path.is_file():
            raise DatasetError(f"{files.annotations}: image {name} is listed but {path} does not exist")
        records[image_id] = ImageRecord(path, image_id, width, height)
    return records


def annotated_record(entry: dict[str, Any], records: dict[int, ImageRecord], where: Path) -> ImageRecord:
    """The image an annotation entry is of (its image_id must be listed in 'images')."""
    record = records.get(entry.get("image_id"))
    if record is None:
        raise DatasetError(f"{where}: annotation of image id {entry.get('image_id')} not in 'images'")
    return record


def category_index(categories: Categories, category_id: Any, record: ImageRecord, where: Path) -> int:
    """The class index of a COCO category id (it must be listed in 'categories')."""
    if category_id not in categories.ids:
        raise DatasetError(f"{where}: {record.image.name}: category id {category_id} is not in 'categories'")
    return categories.ids.index(category_id)


def attach_panoptic(
    raw: dict[str, Any], files: SplitFiles, categories: Categories, records: dict[int, ImageRecord]
) -> None:
    for entry in raw.get("annotations", []):
        record = annotated_record(entry, records, files.annotations)
        record.mask = files.masks / entry["file_name"]
        if not record.mask.is_file():
            raise DatasetError(f"{files.annotations}: {record.mask} (the PNG of {record.image.name}) does not exist")
        for info in entry.get("segments_info", []):
            category = category_index(categories, info.get("category_id"), record, files.annotations)
            record.segments.append(Segment(category, bool(info.get("iscrowd", 0)), png_id=int(info["id"])))
    unannotated = [r.image.name for r in records.values() if r.mask is None]
    if unannotated:
        raise DatasetError(f"{files.annotations}: no annotation for {', '.join(unannotated[:3])}")


def attach_instances(
    raw: dict[str, Any], files: SplitFiles, categories: Categories, records: dict[int, ImageRecord]
) -> None:
    for entry in raw.get("annotations", []):
        record = annotated_record(entry, records, files.annotations)
        category = category_index(categories, entry.get("category_id"), record, files.annotations)
        geometry = entry.get("segmentation")
        check_geometry(geometry, record, files.annotations)
        record.segments.append(Segment(category, bool(entry.get("iscrowd", 0)), geometry=geometry))


def check_geometry(geometry: Any, record: ImageRecord, where: Path) -> None:
    """Polygons inside the image (one pixel of slack, as labelling tools round), RLE of the image's size."""
    name = record.image.name
    if isinstance(geometry, list):
        for polygon in geometry:
            points = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
            if len(points) < 3:
                raise DatasetError(f"{where}: {name}: a polygon needs at least 3 points")
            if (
                (points < -1).any()
                or (points[:, 0] > record.width + 1).any()
                or (points[:, 1] > record.height + 1).any()
            ):
                raise DatasetError(
                    f"{where}: {name}: a polygon reaches outside the {record.width}x{record.height} image "
                    f"(x {points[:, 0].min():.0f}..{points[:, 0].max():.0f}, "
                    f"y {points[:, 1].min():.0f}..{points[:, 1].max():.0f})"
                )
    elif isinstance(geometry, dict) and "size" in geometry and "counts" in geometry:
        if list(geometry["size"]) != [record.height, record.width]:
            raise DatasetError(
                f"{where}: {name}: an RLE mask of size {geometry['size']} (h, w) "
                f"for a {record.width}x{record.height} image"
            )
    else:
        raise DatasetError(f"{where}: {name}: 'segmentation' is neither polygons nor RLE")


def keep_things(categories: Categories, records: Iterable[ImageRecord]) -> Categories:
    """Thing classes only, renumbered; stuff segments dropped (their pixels become VOID)."""
    new_index = {}
    for k, thing in enumerate(categories.isthing):
        if thing:
            new_index[k] = len(new_index)
    for record in records:
        record.segments = [s for s in record.segments if s.category in new_index]
        for segment in record.segments:
            segment.category = new_index[segment.category]
    if not new_index:
        raise DatasetError("the annotations list no thing categories (isthing: 1): nothing to detect")
    return categories.things()


def decode_instance(geometry: Any, height: int, width: int) -> np.ndarray:
    """A COCO instance's polygons or RLE as a `[H, W]` bool mask."""
    from pycocotools import mask as coco_mask

    if isinstance(geometry, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(geometry, height, width))
    elif isinstance(geometry["counts"], list):
        rle = coco_mask.frPyObjects(geometry, height, width)
    else:
        rle = geometry
    return coco_mask.decode(rle).astype(bool)


def read_png_ids(path: Path) -> np.ndarray:
    """A panoptic PNG's segment ids (R + 256 G + 256^2 B)."""
    with Image.open(path) as png:
        rgb = np.asarray(png.convert("RGB"), dtype=np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def encode_target(record: ImageRecord, categories: Categories) -> np.ndarray:
    """The image's `[H, W]` int32 target (module docstring), every pixel's segment checked."""
    target = np.full((record.height, record.width), VOID, dtype=np.int32)
    counts = np.zeros(len(categories.names), dtype=np.int64)

    def value(segment: Segment) -> int:
        if segment.iscrowd or not categories.isthing[segment.category]:
            return segment.category * LABEL_DIVISOR
        counts[segment.category] += 1
        if counts[segment.category] >= LABEL_DIVISOR:
            raise DatasetError(f"{record.image}: more than {LABEL_DIVISOR - 1} instances of one class")
        return segment.category * LABEL_DIVISOR + int(counts[segment.category])

    if record.mask is not None:
        ids = read_png_ids(record.mask)
        if ids.shape != target.shape:
            raise DatasetError(
                f"{record.mask}: {ids.shape[1]}x{ids.shape[0]} but its image is listed as "
                f"{record.width}x{record.height}"
            )
        listed = {s.png_id for s in record.segments}
        missing = sorted(set(np.unique(ids).tolist()) - listed - {0})
        if missing:
            raise DatasetError(
                f"{record.mask}: segment id(s) {missing[:5]} are in the PNG but not in its segments_info"
            )
        for segment in record.segments:
            target[ids == segment.png_id] = value(segment)
        return target
    # instances may overlap: crowds first, then the largest first, so smaller objects stay on top
    masks = [(s, decode_instance(s.geometry, record.height, record.width)) for s in record.segments]
    masks.sort(key=lambda item: (not item[0].iscrowd, -int(item[1].sum())))
    for segment, mask in masks:
        target[mask] = value(segment)
    return target


def check_records(records: list[ImageRecord], categories: Categories, where: str, threads: int = 2) -> int:
    """Decode every target and read every image's size (the same checks training's reader makes),
    before any training starts; returns the number of segments."""

    def check(record: ImageRecord) -> int:
        with Image.open(record.image) as image:
            size = image.size
        if size != (record.width, record.height):
            raise DatasetError(
                f"{record.image}: the image is {size[0]}x{size[1]} but the annotations describe it as "
                f"{record.width}x{record.height}"
            )
        encode_target(record, categories)
        return len(record.segments)

    with ThreadPoolExecutor(threads) as pool:
        segments = sum(pool.map(check, records))
    if not records:
        raise DatasetError(f"{where}: the split has no images")
    return segments


class CocoReader:
    """`PairedDataset`'s reader: (image, target) of a record, looked up by the image's path."""

    def __init__(self, records: list[ImageRecord], categories: Categories):
        self.records = {r.image: r for r in records}
        self.categories = categories

    def __call__(self, image_path: Path, _annotations: Path) -> tuple[np.ndarray, np.ndarray]:
        record = self.records[image_path]
        image = read_image(image_path)
        if image.shape[:2] != (record.height, record.width):
            raise DatasetError(f"{image_path}: the image's size changed since the annotations were checked")
        return image, encode_target(record, self.categories)


@dataclass
class Truth:
    """What scoring one image needs: its target map and, for mask AP, its instances as COCO gives
    them (overlaps and crowds kept): (class index, bool mask, iscrowd)."""

    target: np.ndarray
    instances: list[tuple[int, np.ndarray, bool]]
    image_id: int
    file_name: str


class TruthReader(CocoReader):
    """Full-resolution evaluation's reader: the image and its `Truth`."""

    def __call__(self, image_path: Path, annotations: Path) -> tuple[np.ndarray, Truth]:
        image, target = super().__call__(image_path, annotations)
        record = self.records[image_path]
        things = self.categories.isthing
        if record.mask is None:
            instances = [
                (s.category, decode_instance(s.geometry, record.height, record.width), s.iscrowd)
                for s in record.segments
            ]
        else:
            instances = [
                (int(v) // LABEL_DIVISOR, target == v, int(v) % LABEL_DIVISOR == 0)
                for v in np.unique(target)
                if v >= 0 and things[int(v) // LABEL_DIVISOR]
            ]
        return image, Truth(target, instances, record.image_id, record.image.name)
