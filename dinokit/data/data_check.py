"""Checking a whole dataset before the first epoch: every image and mask decoded, sizes compared,
every mask value checked, the single-channel mask format decided, labelled pixels counted.
Everything found is reported at once, in one line, instead of one problem per run (or a
silently wrong run).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dinokit.data.image_files import ROTATED, DatasetError, mask_pixels, verify_image
from dinokit.data.labels import ColorMap, DatasetSpec, mask_to_indices, resolve_mask_format


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
        problem = (
            f"{mask_path}: mask is {pixels.shape[1]}x{pixels.shape[0]} but its image {image_path.name} "
            f"is {width}x{height}"
        )
        if rotated and pixels.shape[:2] == (width, height):
            problem += (
                " after its EXIF orientation is applied (images and masks are both read upright); the mask "
                "fits the unrotated pixels: rotate the mask, or save the image upright without the tag"
            )
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
        checks = {
            split: list(pool.map(lambda pair: _check_pair(*pair, color_map, spec.mask_format), pairs))
            for split, pairs in splits.items()
        }
    problems = [c.problem for split in checks.values() for c in split if c.problem]
    if problems:
        raise DatasetError(_summary(problems))
    grays = [c.gray[0] for split in checks.values() for c in split if c.gray is not None]
    mask_format, note = resolve_mask_format(spec, np.unique(np.concatenate(grays)) if grays else np.array([], int))
    labelled = {}
    for split, split_checks in checks.items():
        labelled[split] = 0
        for (_, mask_path), check in zip(splits[split], split_checks):
            labelled[split] += (
                check.labelled
                if check.gray is None
                else _count_gray(check.gray, color_map, mask_format, mask_path, problems)
            )
    if problems:
        raise DatasetError(_summary(problems))
    empty = [split for split, count in labelled.items() if count == 0]
    if empty:
        raise DatasetError(
            f"the {' and '.join(empty)} split{'s have' if len(empty) > 1 else ' has'} no labelled pixel: every "
            f"mask pixel is ignored ({_ignored_description(spec)}); check the masks and the dataset description"
        )
    pairs = sum(len(p) for p in splits.values())
    return DatasetCheck(
        replace(spec, mask_format=mask_format), [note] if note else [], labelled, pairs, time.perf_counter() - started
    )


def _count_gray(
    gray: tuple[np.ndarray, np.ndarray], color_map: ColorMap, mask_format: str, path: Path, problems: list[str]
) -> int:
    """Labelled pixels of a single-channel mask's value histogram; unknown values go to `problems`."""
    values, counts = gray
    meanings = color_map.value_meanings(mask_format, int(values.max()) + 1)[values]
    if (meanings < 0).any():
        listed = ", ".join(f"{v} x{n}" for v, n in list(zip(values[meanings < 0], counts[meanings < 0]))[:5])
        kind = "gray colours" if mask_format == "color" else "class indices"
        problems.append(
            f"{path}: mask values that are neither {kind} of the {color_map.num_classes} classes nor ignored "
            f"(pixel counts): {listed}"
        )
        return 0
    return int(counts[(meanings >= 0) & (meanings < color_map.num_classes)].sum())


def _ignored_description(spec: DatasetSpec) -> str:
    colors = ", ".join(str(tuple(c)) for c in spec.ignore_colors)
    return f"ignore index {spec.ignore_index}" + (f", ignore colours {colors}" if colors else "")
