"""RGB-D folders: `{train,valid}_images/` beside `{train,valid}_depth/`, paired by file stem, and
`depth.json` saying how to read the depth files.

    {"depth_scale": 1000, "min_depth": 0.001, "max_depth": 10, "eval_crop": "eigen"}

- depth files: 16-bit PNG (value / depth_scale = metres: 1000 for millimetres as NYU exports, 256
  for KITTI; 0 = no measurement) or `.npy` float metres (NaN or 0 = no measurement);
- `min_depth` / `max_depth`: the range a pixel must fall in to count, in the loss and the metrics;
- `eval_crop`: null, "eigen" (NYU, rows 45-470 and columns 41-600 of 480x640) or "garg" (KITTI,
  rows 40.8-99.2 % and columns 3.6-96.4 %), applied to the metrics only.

Every depth file is read and checked before the first epoch (`check_depth_pairs`): a file of
another size than its image, an 8-bit PNG, a map whose median is far outside the range (a unit
mistake: millimetres read as metres), an all-invalid split — one line each, naming the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dinokit.data.image_files import DatasetError, read_image

DEPTH_EXTENSIONS = (".png", ".npy")
EVAL_CROPS = (None, "eigen", "garg")
UNIT_SLACK = 10  # a median depth beyond 10x max_depth (or below min_depth / 10) is a unit mistake
SAMPLE_PER_FILE = 4096  # measured pixels per file kept for the split's scale check
SCALE_WARNING_SHARE = 0.8  # fewer measured pixels in range than this: a warning with the evidence
LIKELY_SCALES = (1, 10, 100, 256, 1000, 5000)  # PNG units per metre in common datasets (KITTI 256, NYU 1000, ...)


@dataclass(frozen=True)
class DepthSpec:
    """How a dataset's depth files read as metres, and which metres count."""

    depth_scale: float = 1000.0
    min_depth: float = 1e-3
    max_depth: float = 10.0
    eval_crop: str | None = None
    source: str = "defaults"


def load_depth_spec(data_dir: str | Path) -> DepthSpec:
    """`data_dir/depth.json`, checked field by field."""
    path = Path(data_dir) / "depth.json"
    if not path.is_file():
        raise DatasetError(
            f'{path}: not found; an RGB-D folder needs it, e.g. {{"depth_scale": 1000, "max_depth": 10}}'
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict) or set(raw) - {"depth_scale", "min_depth", "max_depth", "eval_crop"}:
        raise DatasetError(f"{path}: expected an object with depth_scale, min_depth, max_depth, eval_crop")
    spec = DepthSpec(**{**raw, "source": str(path)})
    for name in ("depth_scale", "min_depth", "max_depth"):
        value = getattr(spec, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise DatasetError(f"{path}: {name} must be a finite number, got {json.dumps(value)}")
    if spec.depth_scale <= 0 or not 0 <= spec.min_depth < spec.max_depth:
        raise DatasetError(f"{path}: need depth_scale > 0 and 0 <= min_depth < max_depth")
    if spec.eval_crop not in EVAL_CROPS:
        raise DatasetError(f'{path}: eval_crop must be null, "eigen" or "garg", got {spec.eval_crop!r}')
    return spec


def read_depth(path: str | Path, spec: DepthSpec) -> np.ndarray:
    """A depth file in float32 metres, NaN where there is no measurement (0 or NaN in the file);
    `valid_depth` says which metres count."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            depth = np.load(path, allow_pickle=False).astype(np.float32)
        except (ValueError, OSError) as err:
            raise DatasetError(f"{path}: not a readable .npy depth map ({err})") from err
        if depth.ndim != 2:
            raise DatasetError(f"{path}: a depth map must be 2-D (H, W), got shape {depth.shape}")
    else:
        try:
            with Image.open(path) as image:
                mode, values = image.mode, np.array(image)
        except OSError as err:
            raise DatasetError(f"{path}: not a readable PNG depth map ({err})") from err
        if mode not in ("I;16", "I;16B", "I"):
            raise DatasetError(
                f"{path}: an {mode}-mode image; depth PNGs are 16-bit (value / depth_scale = metres) and "
                "8 bits cannot hold depth: export 16-bit PNGs, or .npy float metres"
            )
        depth = values.astype(np.float32) / spec.depth_scale
    depth[~(depth > 0)] = np.nan  # 0 and NaN: no measurement
    return depth


def valid_depth(depth: np.ndarray, spec: DepthSpec) -> np.ndarray:
    """The pixels that count in the loss and the metrics: measured and within the range."""
    return np.isfinite(depth) & (depth >= spec.min_depth) & (depth <= spec.max_depth)


def check_depth_file(image_path: Path, depth_path: Path, spec: DepthSpec) -> tuple[int, np.ndarray]:
    """Read and check one depth file against its image (module docstring): its valid pixels, and a
    sample of its measured metres (for `scale_warning`)."""
    depth = read_depth(depth_path, spec)
    height, width = read_image(image_path).shape[:2]
    if depth.shape != (height, width):
        raise DatasetError(
            f"{depth_path}: depth is {depth.shape[1]}x{depth.shape[0]} but its image {image_path.name} "
            f"is {width}x{height}"
        )
    measured = depth[np.isfinite(depth)]
    if measured.size:
        median = float(np.median(measured))
        if median > UNIT_SLACK * spec.max_depth or median < spec.min_depth / UNIT_SLACK:
            raise DatasetError(
                f"{depth_path}: median depth {median:g} m with depth_scale {spec.depth_scale:g} ({spec.source}), "
                f"far outside {spec.min_depth:g}-{spec.max_depth:g} m: a unit mistake? (depth_scale 1000 reads "
                "millimetres, 256 KITTI's PNGs, 1 metres)"
            )
    sample = measured[:: max(1, measured.size // SAMPLE_PER_FILE)]
    return int(valid_depth(depth, spec).sum()), sample


def scale_warning(measured: np.ndarray, spec: DepthSpec, split: str) -> str | None:
    """A warning when few measured pixels fall in the range (a wrong depth_scale drops them
    silently from the loss and the metrics), with the evidence and the scale that fits best."""
    if not measured.size:
        return None

    def share(scale: float) -> float:
        """The share of measured pixels in range, had the files been read with `scale`."""
        metres = measured * spec.depth_scale / scale
        return float(np.mean((metres >= spec.min_depth) & (metres <= spec.max_depth)))

    now = share(spec.depth_scale)
    if now >= SCALE_WARNING_SHARE:
        return None
    message = (
        f"warning: {split}: only {100 * now:.0f} % of the measured depth pixels fall in {spec.min_depth:g}-"
        f"{spec.max_depth:g} m with depth_scale {spec.depth_scale:g} ({spec.source}); median "
        f"{np.median(measured):.3g} m. The rest are left out of the loss and the metrics"
    )
    best = max(LIKELY_SCALES, key=share)
    if best != spec.depth_scale and share(best) >= now + 0.2:
        message += (
            f"; depth_scale {best:g} would put {100 * share(best):.0f} % in range (median "
            f"{np.median(measured) * spec.depth_scale / best:.3g} m): check depth_scale"
        )
    return message


def check_depth_pairs(pairs: list[tuple[Path, Path]], spec: DepthSpec, split: str) -> int:
    """Every depth file of a split checked (`check_depth_file`); the split's valid pixels, which
    must not be none. A scale that leaves most measured pixels out of range is warned about."""
    checked = [check_depth_file(image, depth, spec) for image, depth in pairs]
    valid = sum(count for count, _ in checked)
    is_png = any(depth.suffix.lower() == ".png" for _, depth in pairs)
    warning = scale_warning(np.concatenate([sample for _, sample in checked]), spec, split) if is_png else None
    if warning:
        print(warning)
    if valid == 0:
        raise DatasetError(
            f"{split} split: no valid depth pixel in {len(pairs)} files (all 0, NaN or outside "
            f"{spec.min_depth:g}-{spec.max_depth:g} m of {spec.source})"
        )
    return valid


def list_depth_files(folder: str | Path) -> list[Path]:
    """The depth files (.png, .npy; hidden files skipped) of a folder, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in DEPTH_EXTENSIONS
    ]
    if not files:
        raise DatasetError(f"{folder}: no depth files ({', '.join(DEPTH_EXTENSIONS)})")
    return files


def eval_crop_mask(shape: tuple[int, int], crop: str | None) -> np.ndarray:
    """Boolean mask of the pixels the metrics read: all, NYU's Eigen crop, or KITTI's Garg crop."""
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    if crop is None:
        mask[:] = True
    elif crop == "eigen":  # defined on 480x640; scaled for other sizes
        mask[
            round(45 * height / 480) : round(471 * height / 480), round(41 * width / 640) : round(601 * width / 640)
        ] = True
    else:  # garg
        mask[int(0.40810811 * height) : int(0.99189189 * height), int(0.03594771 * width) : int(0.96405229 * width)] = (
            True
        )
    return mask
