"""Image classification data in ImageFolder layout, the layout torchvision's `ImageFolder` and timm's
`ImageDataset` read:

    <data-dir>/train/<class>/**/*.jpg      <data-dir>/val/<class>/**/*.jpg

or one folder of class folders, `<data-dir>/<class>/**/*`, split per class by `--val-fraction`.
Class names are the folder names, in sorted order (their index is the label). Image files are
found at any depth, by extension in any case; hidden files and folders, and files that are not
images, are skipped and counted.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from dinokit.data.image_files import IMAGE_EXTENSIONS, DatasetError

SPLITS = ("train", "val")


@dataclass
class Split:
    """The files of one split and their class indices (into `ClassFolders.classes`)."""

    files: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


@dataclass
class ClassFolders:
    classes: list[str]
    train: Split
    val: Split
    skipped: int  # non-image and hidden files ignored
    made_split: bool  # True: val was drawn from one folder by --val-fraction

    def split_record(self, root: Path) -> dict[str, dict[str, list[str]]]:
        """The split as {split: {class: [file relative to root]}}, to reproduce it (split.json)."""
        record: dict[str, dict[str, list[str]]] = {}
        for name, split in (("train", self.train), ("val", self.val)):
            record[name] = {c: [] for c in self.classes}
            for path, label in zip(split.files, split.labels):
                record[name][self.classes[label]].append(path.relative_to(root).as_posix())
        return record


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def class_images(folder: Path) -> tuple[list[Path], int]:
    """A class folder's image files (any depth, sorted) and the number of other files skipped."""
    images, skipped = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if _visible(path, folder) and path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            skipped += 1
    return images, skipped


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_split(folder: Path, classes: list[str]) -> tuple[Split, int]:
    split, skipped = Split(), 0
    for label, name in enumerate(classes):
        images, ignored = class_images(folder / name)
        if not images:
            raise DatasetError(f"{folder / name}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        split.files += images
        split.labels += [label] * len(images)
        skipped += ignored
    return split, skipped


def read_class_folders(data_dir: str | Path, val_fraction: float | None = None, seed: int = 0) -> ClassFolders:
    """The classes and the train/val files of `data_dir` (module docstring). With train/ and val/,
    `val_fraction` must be None; without them it is required."""
    root = Path(data_dir)
    has_splits = (root / "train").is_dir() and (root / "val").is_dir()
    if has_splits and val_fraction is not None:
        raise DatasetError(f"{root}: has train/ and val/ already; drop --val-fraction")
    if not has_splits and val_fraction is None:
        raise DatasetError(
            f"{root}: no train/ and val/ class folders; for one folder of class folders add --val-fraction 0.2"
        )
    if has_splits:
        classes = [p.name for p in _class_folders(root / "train")]
        _check_class_count(root / "train", classes)
        val_classes = [p.name for p in _class_folders(root / "val")]
        unknown = [c for c in val_classes if c not in classes]
        if unknown:
            raise DatasetError(
                f"{root / 'val' / unknown[0]}: class not in {root / 'train'} (train has: {', '.join(classes)})"
            )
        train, skipped_train = _read_split(root / "train", classes)
        present = [c for c in classes if c in val_classes]  # val may lack a class; labels index `classes`
        val, skipped_val = _read_split(root / "val", present)
        val.labels = [classes.index(present[label]) for label in val.labels]
        return ClassFolders(classes, train, val, skipped_train + skipped_val, made_split=False)
    classes = [p.name for p in _class_folders(root)]
    _check_class_count(root, classes)
    everything, skipped = _read_split(root, classes)
    train, val = split_per_class(everything, len(classes), val_fraction, seed)
    return ClassFolders(classes, train, val, skipped, made_split=True)


def _check_class_count(folder: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        found = f" ({classes[0]})" if classes else ""
        raise DatasetError(f"{folder}: {len(classes)} class folder{found}; classification needs at least 2")


def split_per_class(split: Split, num_classes: int, val_fraction: float, seed: int = 0) -> tuple[Split, Split]:
    """Deterministic split of each class: its files in sorted order, permuted by `seed` (file names
    often follow acquisition order, which a plain cut would turn into a val set of one session),
    then ceil(n * fraction) to val and the rest to train, at least one in each."""
    if not 0 < val_fraction < 1:
        raise DatasetError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    train, val = Split(), Split()
    for label in range(num_classes):
        files = [file for file, of in zip(split.files, split.labels) if of == label]
        if len(files) < 2:
            raise DatasetError(f"{files[0].parent}: 1 image; a train/val split needs at least 2 per class")
        count = min(len(files) - 1, max(1, math.ceil(len(files) * val_fraction)))
        order = random.Random(f"{seed}:{label}").sample(range(len(files)), len(files))
        files = [files[i] for i in order]
        for target, chosen in ((train, sorted(files[count:])), (val, sorted(files[:count]))):
            target.files += chosen
            target.labels += [label] * len(chosen)
    return train, val
