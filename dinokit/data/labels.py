"""What the pixel values of masks mean: the dataset description (classes.json), the one
colour <-> class-index mapping, and how single-channel masks are read.

    {"classes": [{"name": "sky", "color": [128, 128, 128]}, ...],
     "ignore_color": [0, 0, 0],         # or "ignore_colors": [[...], ...]; optional
     "ignore_index": 255,               # value of ignored pixels in index masks; optional
     "mask_format": "auto"}             # auto | color | index; optional

RGB(A) colour masks and palette ('P') masks are mapped by colour through `ColorMap`;
single-channel masks (8 or 16 bit) are class indices, or gray colours (0/255 binary masks) when
`mask_format` says "color" or `resolve_mask_format` decides so for the whole dataset.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import config
from dinokit.data.image_files import DatasetError, mask_pixels

Color = Sequence[int]


def _color_code(rgb: np.ndarray) -> np.ndarray:
    """Pack `[..., 3]` uint8 RGB into one int32 per pixel so colours compare as integers."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class ColorMap:
    """The one colour <-> class-index mapping used by training, inference and the notebook."""

    def __init__(
        self,
        colors: Sequence[Color],
        ignore_colors: Sequence[Color] = (),
        ignore_index: int = config.IGNORE_INDEX,
        *,
        shared_colors: bool = False,
    ):
        if not 0 < len(colors) <= 254 or not len(colors) <= ignore_index <= 255:
            raise ValueError(
                f"need 1..254 classes and an ignore index in [num_classes, 255]; got {len(colors)}, {ignore_index}"
            )
        self.colors = np.array(colors, dtype=np.uint8).reshape(-1, 3)
        self.ignore_colors = np.array(ignore_colors, dtype=np.uint8).reshape(-1, 3)
        self.ignore_index = ignore_index
        codes = _color_code(np.concatenate([self.colors, self.ignore_colors]))
        values = np.concatenate([np.arange(len(self.colors)), np.full(len(self.ignore_colors), ignore_index)])
        unique, first, counts = np.unique(codes, return_index=True, return_counts=True)
        if (counts > 1).any() and not shared_colors:
            raise ValueError("the same colour is listed twice among the class and ignore colours")
        # shared_colors (a palette only drawn, e.g. ADE20K's): a colour of two classes cannot be decoded
        self._shared = set(unique[counts > 1].tolist())
        self._codes, self._values = unique, values[first].astype(np.uint8)

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
        if self._shared and np.isin(codes, list(self._shared)).any():
            raise DatasetError(f"{source}: a colour shared by two classes of the palette; use index masks")
        return self._values[slot]

    def check_indices(self, index: np.ndarray, source: str | Path = "mask") -> np.ndarray:
        """An index mask as uint8 class indices; values that are neither a class nor the ignore index are an error."""
        bad = (index >= self.num_classes) & (index != self.ignore_index)
        if bad.any():
            values, counts = np.unique(index[bad], return_counts=True)
            listed = ", ".join(f"{v} x{n}" for v, n in list(zip(values, counts))[:5])
            raise DatasetError(
                f"{source}: index mask values outside the {self.num_classes} classes and ignore index "
                f"{self.ignore_index} (pixel counts): {listed}"
            )
        return index.astype(np.uint8)

    def value_meanings(self, mask_format: str, size: int = 256) -> np.ndarray:
        """What single-channel values 0..size-1 mean under `mask_format`: "color" reads v as the gray
        colour (v, v, v), anything else as a class index. Entries are class indices, the ignore index,
        or -1 for values that are neither."""
        meanings = np.full(max(size, 256), -1, dtype=np.int32)
        if mask_format == "color":
            for value, colors in (
                (self.ignore_index, self.ignore_colors),
                *((c, self.colors[c : c + 1]) for c in range(self.num_classes)),
            ):
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
        raise ValueError(
            f"{where}unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hints}; "
            f"allowed: {', '.join(sorted(allowed))} (and documentation keys: {', '.join(sorted(INFO_KEYS))})"
        )


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
            raise ValueError(
                f"classes[{i}].name {entry['name']!r} is already the name of classes[{names.index(entry['name'])}]"
            )
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


def mask_to_indices(pixels: np.ndarray, color_map: ColorMap, mask_format: str, source: str | Path) -> np.ndarray:
    """`mask_pixels` output as `[H, W]` uint8 class indices, as `mask_format` says to read them."""
    if pixels.ndim == 2:
        if mask_format == "color":
            if pixels.max(initial=0) > 255:
                raise DatasetError(f'{source}: 16-bit values cannot be gray colours, but mask_format is "color"')
            return color_map.encode(np.repeat(pixels.astype(np.uint8)[..., None], 3, axis=2), source)
        return color_map.check_indices(pixels, source)
    if mask_format == "index":
        raise DatasetError(f'{source}: a colour mask, but the dataset description says mask_format "index"')
    return color_map.encode(pixels, source)


def read_mask(path: str | Path, color_map: ColorMap, mask_format: str = "auto") -> np.ndarray:
    """A mask file as `[H, W]` uint8 class indices, whatever its format (see the module docstring)."""
    return mask_to_indices(mask_pixels(path), color_map, mask_format, path)


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
    as_index, as_color = (
        color_map.value_meanings("index", size)[gray_values],
        color_map.value_meanings("color", size)[gray_values],
    )
    index_ok, color_ok = bool((as_index >= 0).all()), bool((as_color >= 0).all())
    if not color_ok or (as_index == as_color).all():
        return "auto", None  # index masks; values that are not classes are reported per file
    listed = ", ".join(map(str, gray_values.tolist()[:8]))
    if not index_ok:
        why = f"values {listed} are all gray colours of the classes but not all class indices"
    else:
        ignored = gray_values[(as_index == color_map.ignore_index) & (as_color < color_map.num_classes)]
        if not len(ignored):
            raise DatasetError(
                f"{spec.source}: single-channel masks with values {listed} fit the classes both as "
                "class indices and as gray colours, with different results; "
                'set "mask_format": "index" or "color" in the dataset description'
            )
        owners = ", ".join(repr(spec.classes[as_color[gray_values == v][0]]) for v in ignored)
        values = ", ".join(map(str, ignored.tolist()))
        why = f"value {values} is the ignore index but the description lists it as the colour of {owners}"
    return "color", (
        f'single-channel masks are read as gray colours: {why} (mask_format "auto"; '
        'set "mask_format": "index" in the dataset description to read them as class indices)'
    )
