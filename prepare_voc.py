"""Convert the official Pascal VOC 2012 release into this repository's dataset layout.

    python prepare_voc.py --source VOCtrainval_11-May-2012.tar
    python prepare_voc.py --source ~/data/VOCdevkit                # an extracted copy
    python prepare_voc.py --download                               # fetch the tar from the official site first
    python prepare_voc.py --source VOCtrainval_11-May-2012.tar --aug-masks ~/data/SegmentationClassAug

Writes input/voc_2012_segmentation_data/{train,valid}_{images,labels}/ (or --out) from
ImageSets/Segmentation/{train,val}.txt: 1464 training and 1449 validation pairs, masks copied as
the official palette PNGs. With --aug-masks (the SBD "SegmentationClassAug" index PNGs), the
training split becomes every image with an augmented mask that is not in the validation list:
10,582 images, the set the DINOv2 paper trains on. The output folder is assembled under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import config
from cli import ArgumentParser
from dinokit.writing import remove_stale_temp_files, temp_path

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_ROOT = "VOCdevkit/VOC2012"


class VocSource:
    """Read access to a VOC2012 tree inside a tar archive or a folder, by path relative to VOC2012/."""

    def __init__(self, path: Path):
        self.path = path
        self.tar: tarfile.TarFile | None = None
        if path.is_file():
            try:
                self.tar = tarfile.open(path)
            except tarfile.TarError as err:
                raise ValueError(f"{path}: not a readable tar archive ({err})") from err
            names = {m.name.lstrip("./"): m for m in self.tar.getmembers() if m.isfile()}
            prefix = next(
                (n[: n.index("ImageSets/Segmentation/")] for n in names if "ImageSets/Segmentation/" in n), None
            )
            if prefix is None:
                raise ValueError(
                    f"{path}: no ImageSets/Segmentation in this archive; is it VOCtrainval_11-May-2012.tar?"
                )
            self.members = {n[len(prefix) :]: m for n, m in names.items() if n.startswith(prefix)}
        else:
            candidates = [path, path / "VOC2012", path / VOC_ROOT]
            root = next((c for c in candidates if (c / "ImageSets" / "Segmentation").is_dir()), None)
            if root is None:
                raise ValueError(f"{path}: no ImageSets/Segmentation below it; point --source at VOCdevkit or VOC2012")
            self.root = root

    def read_text(self, relative: str) -> str:
        if self.tar is not None:
            if relative not in self.members:
                raise ValueError(f"{self.path}: {relative} missing from the archive")
            return self.tar.extractfile(self.members[relative]).read().decode()
        file = self.root / relative
        if not file.is_file():
            raise ValueError(f"{file}: missing")
        return file.read_text()

    def has(self, relative: str) -> bool:
        return relative in self.members if self.tar is not None else (self.root / relative).is_file()

    def copy(self, relative: str, destination: Path) -> None:
        if not self.has(relative):
            raise ValueError(f"{self.path}: {relative} is listed but missing")
        if self.tar is not None:
            with self.tar.extractfile(self.members[relative]) as src, open(destination, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(self.root / relative, destination)


def read_list(source: VocSource, name: str) -> list[str]:
    return [
        line.split()[0] for line in source.read_text(f"ImageSets/Segmentation/{name}.txt").splitlines() if line.strip()
    ]


def prepare(
    source_path: Path, out: Path, aug_masks: Path | None = None, log: Callable[[str], None] = print
) -> dict[str, int]:
    """Write the train/valid layout to `out`; returns the number of pairs per split."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: already exists and is not empty; remove it or choose another --out")
    source = VocSource(source_path)
    valid = read_list(source, "val")
    train = read_list(source, "train")
    train_masks = {stem: ("voc", f"SegmentationClass/{stem}.png") for stem in train}
    if aug_masks is not None:
        if not aug_masks.is_dir():
            raise ValueError(f"{aug_masks}: --aug-masks folder not found")
        excluded = set(valid)
        augmented = sorted(p.stem for p in aug_masks.glob("*.png") if p.stem not in excluded)
        if not augmented:
            raise ValueError(f"{aug_masks}: no PNG masks outside the validation list")
        train_masks = {
            stem: ("aug", aug_masks / f"{stem}.png") for stem in augmented if source.has(f"JPEGImages/{stem}.jpg")
        }
    for stale in remove_stale_temp_files(out.parent):  # a conversion killed before: gigabytes of copies
        log(f"Removed {stale.name}: the staging folder of a conversion that was killed")
    staging = temp_path(out, directory=True)
    try:
        counts = {}
        for split, items in (
            ("train", train_masks),
            ("valid", {s: ("voc", f"SegmentationClass/{s}.png") for s in valid}),
        ):
            (staging / f"{split}_images").mkdir()
            (staging / f"{split}_labels").mkdir()
            for stem, (kind, mask) in items.items():
                source.copy(f"JPEGImages/{stem}.jpg", staging / f"{split}_images" / f"{stem}.jpg")
                if kind == "voc":
                    source.copy(mask, staging / f"{split}_labels" / f"{stem}.png")
                else:
                    shutil.copyfile(mask, staging / f"{split}_labels" / f"{stem}.png")
            counts[split] = len(items)
            log(f"{split}: {len(items)} pairs")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts


def download(destination: Path) -> Path:
    """Fetch the official VOC2012 trainval tar (2 GB) unless it is already there."""
    if destination.is_file():
        return destination
    from torch.hub import download_url_to_file

    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(VOC_URL, str(destination), progress=True)  # writes a temp file, then renames
    except OSError as err:
        raise OSError(f"could not download {VOC_URL} ({err}); download it by hand and pass --source") from err
    return destination


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", default=None, help="VOCtrainval_11-May-2012.tar, or an extracted VOCdevkit / VOC2012 folder"
    )
    parser.add_argument("--download", action="store_true", help="download the official tar into input/ first")
    parser.add_argument(
        "--aug-masks", default=None, help="SBD SegmentationClassAug folder: train on the 10,582-image set"
    )
    parser.add_argument("--out", default=str(config.DATA_DIR))
    return parser


def main(args: argparse.Namespace) -> None:
    if args.download:
        source = download(config.ROOT / "input" / Path(VOC_URL).name)
    elif args.source:
        source = Path(args.source)
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such file or folder")
    else:
        raise ValueError("give --source PATH (the VOC tar or an extracted VOCdevkit) or --download")
    counts = prepare(source, Path(args.out), Path(args.aug_masks) if args.aug_masks else None)
    print(f"Wrote {counts['train']} training and {counts['valid']} validation pairs to {args.out}")


if __name__ == "__main__":
    from cli import run_cli

    run_cli(main, get_args_parser())
