"""Images + masks -> (normalised image tensor, class-index mask) pairs, with augmentation.

Layout of a dataset directory (Pascal VOC as distributed on Kaggle, or anything shaped like it):

    <data-dir>/train_images/*.jpg   <data-dir>/train_labels/*.png
    <data-dir>/valid_images/*.jpg   <data-dir>/valid_labels/*.png

Images and masks are paired by file stem (hidden files skipped, one file per stem). The classes
and their colours come from `<data-dir>/classes.json` (or `--classes FILE`), else the Pascal VOC
defaults of config.py:

    {"classes": [{"name": "sky", "color": [128, 128, 128]}, ...],
     "ignore_color": [0, 0, 0],         # or "ignore_colors": [[...], ...]; optional
     "ignore_index": 255,               # value of ignored pixels in index masks; optional
     "mask_format": "auto"}             # auto | color | index; optional

Images and masks are decoded by one rule: completely, with PIL, EXIF orientation applied. Masks
are read per file: RGB(A) colour PNGs and palette ('P') PNGs are mapped by colour through
`ColorMap`; single-channel PNGs (8 or 16 bit) are index masks, pixel value = class index, or gray
colours (0/255 binary masks) when `mask_format` says "color" or `resolve_mask_format` decides so
for the whole dataset. `check_dataset` decodes every pair before training.
"""
from __future__ import annotations

import difflib
import io
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import albumentations as A
import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

import config
from cli import UserError
from distributed import distributed, rank, world_size
from model_config import PATCH_SIZE

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

Color = Sequence[int]


class DatasetError(UserError, ValueError):
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

    def value_meanings(self, mask_format: str, size: int = 256) -> np.ndarray:
        """What single-channel values 0..size-1 mean under `mask_format`: "color" reads v as the gray
        colour (v, v, v), anything else as a class index. Entries are class indices, the ignore index,
        or -1 for values that are neither."""
        meanings = np.full(max(size, 256), -1, dtype=np.int32)
        if mask_format == "color":
            for value, colors in ((self.ignore_index, self.ignore_colors), *((c, self.colors[c:c + 1]) for c in range(self.num_classes))):
                for color in colors:
                    if color[0] == color[1] == color[2]:
                        meanings[color[0]] = value
        else:
            meanings[: self.num_classes] = np.arange(self.num_classes)
            meanings[self.ignore_index] = self.ignore_index
        return meanings

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
    if not (isinstance(value, list) and len(value) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"{where} must be [r, g, b] with integers 0-255, got {value!r}")
    return tuple(value)  # type: ignore[return-value]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the number 1


SPEC_KEYS = {"classes", "ignore_color", "ignore_colors", "ignore_index", "mask_format"}
CLASS_KEYS = {"name", "color"}
# Free-form documentation a description may carry; any other key (or one starting with "_") is a typo.
INFO_KEYS = {"description", "source", "license", "url", "citation", "counts", "notes", "version"}


def _unknown_keys(given, allowed: set[str], where: str) -> None:
    unknown = sorted(k for k in set(given) - allowed - INFO_KEYS if not k.startswith("_"))
    if unknown:
        guesses = [difflib.get_close_matches(k, sorted(allowed), n=1) for k in unknown]
        hints = "".join(f" ({k!r}: did you mean {g[0]!r}?)" for k, g in zip(unknown, guesses) if g)
        raise ValueError(f"{where}unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hints}; "
                         f"allowed: {', '.join(sorted(allowed))} (and documentation keys: {', '.join(sorted(INFO_KEYS))})")


def parse_dataset_spec(raw, source: str) -> DatasetSpec:
    """A dataset description from parsed JSON, validated strictly: a typo is an error, not a default."""
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list) or not raw["classes"]:
        raise ValueError('"classes" must be a non-empty list of {"name": ..., "color": [r, g, b]}')
    _unknown_keys(raw, SPEC_KEYS, "")
    names, colors = [], []
    for i, entry in enumerate(raw["classes"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "color" not in entry:
            raise ValueError(f'classes[{i}] must be {{"name": str, "color": [r, g, b]}}, got {entry!r}')
        _unknown_keys(entry, CLASS_KEYS, f"classes[{i}]: ")
        if not entry["name"].strip():
            raise ValueError(f"classes[{i}].name is empty")
        if entry["name"] in names:
            raise ValueError(f"classes[{i}].name {entry['name']!r} is already the name of classes[{names.index(entry['name'])}]")
        names.append(entry["name"])
        colors.append(_color(entry["color"], f"classes[{i}].color"))
    if "ignore_color" in raw and "ignore_colors" in raw:
        raise ValueError('give "ignore_color" or "ignore_colors", not both')
    ignore = [raw["ignore_color"]] if "ignore_color" in raw else raw.get("ignore_colors", [])
    if not isinstance(ignore, list):
        raise ValueError(f'"ignore_colors" must be a list of [r, g, b], got {ignore!r}')
    ignore_colors = [_color(c, "ignore colour") for c in ignore]
    ignore_index = raw.get("ignore_index", config.IGNORE_INDEX)
    if not _is_int(ignore_index) or not len(names) <= ignore_index <= 255:
        raise ValueError(f'"ignore_index" must be an integer in [{len(names)}, 255], got {ignore_index!r}')
    mask_format = raw.get("mask_format", "auto")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f'"mask_format" must be one of {", ".join(MASK_FORMATS)}, got {mask_format!r}')
    spec = DatasetSpec(names, colors, ignore_colors, ignore_index, mask_format, source)
    spec.color_map()  # duplicate colours, class count
    return spec


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
        return parse_dataset_spec(raw, str(path))
    except ValueError as err:
        raise DatasetError(f"{path}: {err}") from err


def _load(path: str | Path) -> Image.Image:
    """Decode the whole file now: a truncated or corrupt file fails here, with its name."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: file not found") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(_unreadable(path, err)) from err


def _unreadable(path: str | Path, err: BaseException) -> str:
    detail = str(err).splitlines()[0] if str(err) else ""
    return f"{path}: not a readable image ({err.__class__.__name__}{': ' + detail if detail else ''})"


def verify_image(path: str | Path) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of an image file whose every byte decodes cleanly.

    JPEGs go through libjpeg-turbo in strict mode (simplejpeg): PIL and OpenCV decode a file with
    corrupt entropy data or a missing end as grey or garbled pixels with at most a warning on stderr."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            size, orientation = image.size, _orientation(image)
            if data[:3] == b"\xff\xd8\xff":
                simplejpeg.decode_jpeg(data, strict=True)
            else:
                image.load()
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: file not found") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(_unreadable(path, err)) from err
    return size[0], size[1], orientation


ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(0x0112, 1)


def open_image(path: str | Path) -> Image.Image:
    """The one decoding rule for images and masks alike: fully decoded, EXIF orientation applied
    (as image viewers and annotation tools show the file)."""
    image = _load(path)
    return ImageOps.exif_transpose(image) if _orientation(image) != 1 else image


def read_image(path: str | Path) -> np.ndarray:
    """Read any image file as `[H, W, 3]` uint8 RGB (grayscale and RGBA are converted)."""
    image = open_image(path)
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as err:  # a mode PIL cannot convert, e.g. 32-bit float TIFF
        raise DatasetError(f"{path}: {image.mode} images cannot be converted to RGB ({err})") from err


COLOR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA")
GRAY_MODES = ("L", "LA", "1", "I;16", "I;16L", "I;16B", "I")


def mask_pixels(path: str | Path) -> np.ndarray:
    """A mask's raw pixels: `[H, W, 3]` uint8 colours (RGB, RGBA, palette) or `[H, W]` values (single channel)."""
    image = open_image(path)
    if image.mode in COLOR_MODES:
        return np.asarray(image.convert("RGB"))
    if image.mode in ("L", "LA", "1"):  # bilevel "1" masks become 0/255
        return np.asarray(image.convert("L"))
    if image.mode in GRAY_MODES:
        pixels = np.asarray(image)
        if pixels.min() < 0:
            raise DatasetError(f"{path}: negative mask values")
        return pixels
    raise DatasetError(f"{path}: {image.mode} masks are not supported (use RGB, palette or single-channel PNGs)")


def mask_to_indices(pixels: np.ndarray, color_map: ColorMap, mask_format: str, source: str | Path) -> np.ndarray:
    """`mask_pixels` output as `[H, W]` uint8 class indices, as `mask_format` says to read them."""
    if pixels.ndim == 2:
        if mask_format == "color":
            if pixels.max(initial=0) > 255:
                raise DatasetError(f"{source}: 16-bit values cannot be gray colours, but mask_format is \"color\"")
            return color_map.encode(np.repeat(pixels.astype(np.uint8)[..., None], 3, axis=2), source)
        return color_map.check_indices(pixels, source)
    if mask_format == "index":
        raise DatasetError(f"{source}: a colour mask, but the dataset description says mask_format \"index\"")
    return color_map.encode(pixels, source)


def read_mask(path: str | Path, color_map: ColorMap, mask_format: str = "auto") -> np.ndarray:
    """A mask file as `[H, W]` uint8 class indices, whatever its format (see the module docstring)."""
    return mask_to_indices(mask_pixels(path), color_map, mask_format, path)


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


def list_image_files(folder: str | Path) -> list[Path]:
    """A folder's image files sorted by name, one per stem (outputs and masks are named by stem).
    Hidden files (.DS_Store, macOS's ._photo.jpg) are skipped; two files of one stem are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files = [p for p in sorted(folder.iterdir())
             if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise DatasetError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    by_stem: dict[str, list[str]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path.name)
    clashes = [" and ".join(names) for names in by_stem.values() if len(names) > 1]
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise DatasetError(f"{folder}: files share a name, so one would shadow the other: {'; '.join(clashes[:3])}{more}; "
                           "keep one file per name")
    return files


def find_pairs(data_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
    """`(image, mask)` paths of one split, paired by stem; an image without a mask (or the reverse) is an error."""
    data_dir = Path(data_dir)
    images = {p.stem: p for p in list_image_files(data_dir / f"{split}_images")}
    masks = {p.stem: p for p in list_image_files(data_dir / f"{split}_labels")}
    problems = [f"no mask for {images[s].name}" for s in sorted(images.keys() - masks.keys())]
    problems += [f"no image for {masks[s].name}" for s in sorted(masks.keys() - images.keys())]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetError(f"{data_dir}: {split} split has unpaired files: {shown}")
    return [(images[s], masks[s]) for s in sorted(images)]


@dataclass
class _PairCheck:
    problem: str | None = None
    labelled: int = 0  # non-ignored pixels of a colour mask
    gray: tuple[np.ndarray, np.ndarray] | None = None  # a single-channel mask's (values, pixel counts)


def _check_pair(image_path: Path, mask_path: Path, color_map: ColorMap, mask_format: str) -> _PairCheck:
    """Decode both files completely; compare sizes; map a colour mask, count a single-channel one's values."""
    try:
        width, height, orientation = verify_image(image_path)
        pixels = mask_pixels(mask_path)
    except DatasetError as err:
        return _PairCheck(str(err))
    rotated = orientation in ROTATED
    if rotated:
        width, height = height, width
    if pixels.shape[:2] != (height, width):
        problem = (f"{mask_path}: mask is {pixels.shape[1]}x{pixels.shape[0]} but its image {image_path.name} "
                   f"is {width}x{height}")
        if rotated and pixels.shape[:2] == (width, height):
            problem += (" after its EXIF orientation is applied (images and masks are both read upright); the mask "
                        "fits the unrotated pixels: rotate the mask, or save the image upright without the tag")
        return _PairCheck(problem)
    if pixels.ndim == 2:
        return _PairCheck(gray=np.unique(pixels, return_counts=True))
    try:
        indices = mask_to_indices(pixels, color_map, mask_format, mask_path)
    except DatasetError as err:
        return _PairCheck(str(err))
    return _PairCheck(labelled=int((indices != color_map.ignore_index).sum()))


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def resolve_mask_format(spec: DatasetSpec, gray_values: np.ndarray) -> tuple[str, str | None]:
    """How to read the dataset's single-channel masks, decided once for the whole dataset from the
    union of their values: (mask_format, a note saying why, or None).

    Under "auto" they are class indices unless the description says otherwise: when every value is a
    gray colour of the classes but not every value is a class index, or when reading them as indices
    would turn a class colour into "ignore" (0/255 masks with white listed as a class). A dataset
    that fits both readings, differently, and neither of those, is refused: set mask_format."""
    if spec.mask_format != "auto" or not len(gray_values):
        return spec.mask_format, None
    color_map = spec.color_map()
    size = int(gray_values.max()) + 1
    as_index, as_color = color_map.value_meanings("index", size)[gray_values], color_map.value_meanings("color", size)[gray_values]
    index_ok, color_ok = bool((as_index >= 0).all()), bool((as_color >= 0).all())
    if not color_ok or (as_index == as_color).all():
        return "auto", None  # index masks; values that are not classes are reported per file
    listed = ", ".join(map(str, gray_values.tolist()[:8]))
    if not index_ok:
        why = f"values {listed} are all gray colours of the classes but not all class indices"
    else:
        ignored = gray_values[(as_index == color_map.ignore_index) & (as_color < color_map.num_classes)]
        if not len(ignored):
            raise DatasetError(f"{spec.source}: single-channel masks with values {listed} fit the classes both as "
                               "class indices and as gray colours, with different results; "
                               'set "mask_format": "index" or "color" in the dataset description')
        owners = ", ".join(repr(spec.classes[as_color[gray_values == v][0]]) for v in ignored)
        why = f"value {', '.join(map(str, ignored.tolist()))} is the ignore index but the description lists it as the colour of {owners}"
    return "color", (f"single-channel masks are read as gray colours: {why} (mask_format \"auto\"; "
                     'set "mask_format": "index" in the dataset description to read them as class indices)')


@dataclass
class DatasetCheck:
    spec: DatasetSpec  # with mask_format decided for single-channel masks
    notes: list[str]
    labelled: dict[str, int]  # non-ignored pixels per split
    pairs: int
    seconds: float


def check_dataset(splits: dict[str, list[tuple[Path, Path]]], spec: DatasetSpec, threads: int = 2) -> DatasetCheck:
    """Decode every image and mask completely before training and check what would otherwise fail
    (or silently mislead) later: unreadable or truncated files, image/mask size mismatches, mask
    values that are no class, a split without a labelled pixel. All problems found are reported
    together in one line."""
    started = time.perf_counter()
    color_map = spec.color_map()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        checks = {split: list(pool.map(lambda pair: _check_pair(*pair, color_map, spec.mask_format), pairs))
                  for split, pairs in splits.items()}
    problems = [c.problem for split in checks.values() for c in split if c.problem]
    if problems:
        raise DatasetError(_summary(problems))
    grays = [c.gray[0] for split in checks.values() for c in split if c.gray is not None]
    mask_format, note = resolve_mask_format(spec, np.unique(np.concatenate(grays)) if grays else np.array([], int))
    labelled = {}
    for split, split_checks in checks.items():
        labelled[split] = 0
        for (_, mask_path), check in zip(splits[split], split_checks):
            labelled[split] += check.labelled if check.gray is None else _count_gray(check.gray, color_map, mask_format, mask_path, problems)
    if problems:
        raise DatasetError(_summary(problems))
    empty = [split for split, count in labelled.items() if count == 0]
    if empty:
        raise DatasetError(f"the {' and '.join(empty)} split{'s have' if len(empty) > 1 else ' has'} no labelled pixel: every "
                           f"mask pixel is ignored ({_ignored_description(spec)}); check the masks and the dataset description")
    pairs = sum(len(p) for p in splits.values())
    return DatasetCheck(replace(spec, mask_format=mask_format), [note] if note else [], labelled, pairs, time.perf_counter() - started)


def _count_gray(gray: tuple[np.ndarray, np.ndarray], color_map: ColorMap, mask_format: str, path: Path, problems: list[str]) -> int:
    """Labelled pixels of a single-channel mask's value histogram; unknown values go to `problems`."""
    values, counts = gray
    meanings = color_map.value_meanings(mask_format, int(values.max()) + 1)[values]
    if (meanings < 0).any():
        listed = ", ".join(f"{v} x{n}" for v, n in list(zip(values[meanings < 0], counts[meanings < 0]))[:5])
        kind = "gray colours" if mask_format == "color" else "class indices"
        problems.append(f"{path}: mask values that are neither {kind} of the {color_map.num_classes} classes nor ignored "
                        f"(pixel counts): {listed}")
        return 0
    return int(counts[(meanings >= 0) & (meanings < color_map.num_classes)].sum())


def _ignored_description(spec: DatasetSpec) -> str:
    colors = ", ".join(str(tuple(c)) for c in spec.ignore_colors)
    return f"ignore index {spec.ignore_index}" + (f", ignore colours {colors}" if colors else "")


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

    def __init__(self, pairs: list[tuple[Path, Path]], color_map: ColorMap, transform: A.Compose,
                 mask_format: str = "auto", *, seed: int = config.SEED):
        self.pairs = pairs
        self.color_map = color_map
        self.transform = transform
        self.mask_format = mask_format
        # Sample i of epoch e is always augmented the same way, whichever worker loads it: runs
        # repeat exactly and a resumed run continues as if never stopped (`set_epoch` moves e).
        self.seed = seed
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
        seed_augmentation(self.transform, self.seed, self.epoch, index)
        out = self.transform(image=image, mask=mask)
        image_tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image_tensor, torch.from_numpy(out["mask"].astype(np.int64))


def build_datasets(data_dir: str | Path, imgsz: tuple[int, int], spec: DatasetSpec = VOC, *, threads: int = 2,
                   seed: int = config.SEED) -> tuple[SegmentationDataset, SegmentationDataset, DatasetCheck]:
    """Train (augmented) and validation (resize only) datasets of `data_dir`, after `check_dataset`
    has decoded every file; the check's spec (mask format decided) is the one the datasets use."""
    splits = {split: find_pairs(data_dir, split) for split in ("train", "valid")}
    check = check_dataset(splits, spec, threads)
    color_map, mask_format = check.spec.color_map(), check.spec.mask_format
    train = SegmentationDataset(splits["train"], color_map, train_transform(imgsz, color_map.ignore_index), mask_format, seed=seed)
    valid = SegmentationDataset(splits["valid"], color_map, eval_transform(imgsz), mask_format, seed=seed)
    return train, valid, check


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


def make_loader(dataset: SegmentationDataset, batch_size: int, *, shuffle: bool, workers: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader whose order and augmentation depend only on (dataset seed, epoch); call
    `set_epoch` per epoch.

    Shuffled (training) loaders restart their workers every epoch so that the dataset's epoch
    reaches them; validation loaders keep theirs. Under torchrun each process gets its share:
    training through DistributedSampler (equal counts, so every rank takes the same number of
    steps), evaluation through ShardSampler (exact counts)."""
    sampler = None
    if distributed():
        if shuffle:
            sampler = torch.utils.data.DistributedSampler(dataset, world_size(), rank(), shuffle=True, seed=dataset.seed)
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
        generator=torch.Generator().manual_seed(epoch_seed(dataset.seed, 0)),
    )


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Make the next pass over `loader` the `epoch`-th: its shuffling and augmentation."""
    loader.dataset.epoch = epoch
    loader.generator.manual_seed(epoch_seed(loader.dataset.seed, epoch))
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
