"""See what the backbone sees: the first three principal components of DINOv2 / DINOv3 patch features as RGB.

    python visualize_features.py --input input/inference_data/images                 # a folder (or one image)
    python visualize_features.py --input clip.mp4 --side-by-side                      # a video
    python visualize_features.py --input photo.jpg --foreground 0.5                   # background masked out

One PCA for the whole input (all patches of every image or frame; a seeded sample of them when
they do not fit in --max-memory-gb), so a colour means the same thing in every image: parts of
objects get the same colour across images and frames with no training at all. Writes into
--out-dir (default outputs/feature_maps/): per image <stem>_pca.png (image | map) and
<stem>_overlay.jpg; for a video <stem>_pca.mp4 (same frame count and fps); with --save-features,
features.pt. Needs no labels and no trained head: a check of a backbone on your own data.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

import config
from cli import (
    ArgumentParser,
    add_backbone_args,
    add_device_args,
    at_least,
    backbone_kwargs,
    non_negative,
    output_folder,
    run_cli,
    unit_interval,
)
from dinokit.backbones.feature_pca import FeaturePca, fit_pca, foreground_split
from dinokit.data.image_files import DatasetError, image_paths, read_image, write_image
from dinokit.data.resize import check_imgsz
from dinokit.errors import UserError
from dinokit.prediction.drawing import blend
from dinokit.prediction.videos import open_video, read_frames, write_video
from dinokit.runs.reports import format_bytes
from dinokit.runs.run_folder import claim_output_folder
from dinokit.writing import atomic_write
from model import PatchFeatures
from utils import seed_everything

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="an image, a folder of images, or a video")
    add_backbone_args(parser)
    parser.add_argument(
        "--imgsz",
        type=int,
        nargs=2,
        default=(518, 518),
        metavar=("W", "H"),
        help="size images are resized to, rounded up to the patch size (default 518 518: 37x37 patches of 14, "
        "33x33 of 16)",
    )
    parser.add_argument(
        "--layer",
        type=at_least(1),
        default=None,
        metavar="N",
        help="the block whose patch tokens are shown, 1 = first (default: the last)",
    )
    parser.add_argument(
        "--foreground",
        type=float,
        default=None,
        metavar="T",
        help="mask patches whose first component (scaled 0..1) is <= T as background, "
        "then fit the PCA again on the foreground only (the official README uses about 0.5)",
    )
    parser.add_argument(
        "--upsample",
        default="nearest",
        choices=("nearest", "bilinear"),
        help="how the patch-grid map is enlarged to the image (nearest: one square per patch)",
    )
    parser.add_argument("--alpha", type=unit_interval, default=0.6, help="opacity of the map in <stem>_overlay.jpg")
    parser.add_argument("--side-by-side", action="store_true", help="video: each frame beside its map (twice as wide)")
    parser.add_argument(
        "--max-frames", type=at_least(0), default=0, help="video: stop after N frames (0: the whole clip)"
    )
    add_pca_flags(parser)
    add_device_args(parser)
    parser.add_argument("--out-dir", default=str(config.OUTPUT_DIR / "feature_maps"))
    return parser


def add_pca_flags(parser: argparse.ArgumentParser) -> None:
    """What the PCA is fitted on and how much memory it may take."""
    parser.add_argument(
        "--save-features",
        action="store_true",
        help="also write features.pt: the patch features [N, h, w, C] (float16), the grid size and names",
    )
    parser.add_argument(
        "--pca-sample",
        type=at_least(3),
        default=200_000,
        metavar="N",
        help="patches the PCA is fitted on when the input has more (a seeded sample; default 200000)",
    )
    parser.add_argument(
        "--max-memory-gb",
        type=non_negative,
        default=2.0,
        help="keep all features in RAM up to this size, else sample for the PCA and recompute (default 2)",
    )
    parser.add_argument("--batch", type=at_least(1), default=8, help="images or frames per backbone forward")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch sample")


@dataclass
class Source:
    """What --input is: image files, or a video (read again for each pass)."""

    path: Path
    images: list[Path] | None  # None: a video
    count: int  # images, or frames to process (0: unknown)
    fps: float = 0.0
    size: tuple[int, int] = (0, 0)  # video (W, H)

    def frames(self, max_frames: int = 0) -> Iterator[tuple[str, np.ndarray]]:
        """(name, RGB image) of every image or frame; unreadable images are skipped with a warning."""
        if self.images is not None:
            for path in self.images:
                try:
                    yield path.stem, read_image(path)
                except DatasetError as err:
                    tqdm.write(f"warning: skipped {err}")
            return
        capture, _ = open_video(self.path)
        try:
            for index, frame in enumerate(read_frames(capture, max_frames)):
                yield f"{self.path.stem}_{index:06d}", frame
        finally:
            capture.release()


def open_source(path: Path, max_frames: int) -> Source:
    if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS:
        capture, video = open_video(path)
        capture.release()
        return Source(path, None, video.frames_to_read(max_frames), video.fps, video.size)
    images = image_paths(path)  # a missing path or an empty folder is an error there
    return Source(path, images, len(images))


def batches(source: Source, batch: int, max_frames: int) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    names, images = [], []
    for name, image in source.frames(max_frames):
        names.append(name)
        images.append(image)
        if len(images) == batch:
            yield names, images
            names, images = [], []
    if images:
        yield names, images


def collect(
    source: Source, extract: PatchFeatures, args: argparse.Namespace, keep: bool
) -> tuple[list[torch.Tensor], torch.Tensor | None, list[str]]:
    """Pass 1: every image's features (float16, when `keep`), else a seeded sample of about
    --pca-sample patches spread over the images for the PCA; and the names read."""
    generator = torch.Generator().manual_seed(args.seed)
    per_image = math.ceil(args.pca_sample / max(source.count, 1))
    kept, sample, seen = [], [], []
    for names, images in tqdm(
        batches(source, args.batch, args.max_frames),
        desc="Features",
        unit="batch",
        total=math.ceil(source.count / args.batch) or None,
        dynamic_ncols=True,
    ):
        for grid in extract(images):
            if keep:
                kept.append(grid.half())
            else:
                patches = grid.reshape(-1, grid.shape[-1])
                sample.append(patches[torch.randperm(len(patches), generator=generator)[:per_image]])
        seen += names
    if not seen:
        raise DatasetError(f"{source.path}: no image or frame could be read")
    return kept, None if keep else torch.cat(sample), seen


def sampled(patches: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`patches`, or a seeded sample of `count` of them when there are more."""
    if len(patches) <= count:
        return patches
    return patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(seed))[:count]]


def fit_maps(
    fitted: torch.Tensor, foreground: float | None, device: torch.device
) -> tuple[FeaturePca, FeaturePca | None, bool]:
    """The PCA of the input and, with --foreground, the PCA of its foreground patches only: fitted
    on `device`, returned on the CPU (where the maps are drawn)."""
    pca = fit_pca(fitted.to(device)).to("cpu")
    if foreground is None:
        return pca, None, False
    mask, flipped = foreground_split(pca.colors(fitted)[:, 0], foreground)
    if int(mask.sum()) < 3:
        raise UserError(f"--foreground {foreground}: fewer than 3 patches are foreground; lower the threshold")
    return pca, fit_pca(fitted[mask].to(device)).to("cpu"), flipped


def colour_grid(
    grid: torch.Tensor, pca: FeaturePca, foreground_pca: FeaturePca | None, threshold: float | None, flipped: bool
) -> np.ndarray:
    """`[h, w, C]` features -> `[h, w, 3]` uint8 colours (background black with --foreground)."""
    if foreground_pca is None:
        colours = pca.colors(grid)
    else:
        first = pca.colors(grid)[..., 0]
        mask = ((1 - first) if flipped else first) > threshold
        colours = foreground_pca.colors(grid) * mask.unsqueeze(-1)
    return (colours.numpy() * 255).round().astype(np.uint8)


def enlarge(colours: np.ndarray, size: tuple[int, int], how: str) -> np.ndarray:
    """The grid's colours at the image's (W, H)."""
    return cv2.resize(colours, size, interpolation=cv2.INTER_NEAREST if how == "nearest" else cv2.INTER_LINEAR)


def maps(
    source: Source,
    extract: PatchFeatures,
    kept: list[torch.Tensor],
    args: argparse.Namespace,
    colour: Callable[[torch.Tensor], np.ndarray],
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Pass 2: (name, image, map at the image's size) of every image or frame, from the kept
    features or recomputed."""
    index = 0
    for names, images in batches(source, args.batch, args.max_frames):
        grids = kept[index : index + len(images)] if kept else list(extract(images))
        index += len(images)
        for name, image, grid in zip(names, images, grids):
            yield name, image, enlarge(colour(grid.float()), (image.shape[1], image.shape[0]), args.upsample)


def write_results(
    source: Source, pairs: Iterator[tuple[str, np.ndarray, np.ndarray]], out_dir: Path, args: argparse.Namespace
) -> int:
    """Images: <stem>_pca.png and <stem>_overlay.jpg each; a video: <stem>_pca.mp4. Returns the count."""
    progress = tqdm(pairs, desc="Maps", total=source.count or None, dynamic_ncols=True)
    if source.images is None:
        frames = (
            np.concatenate([image, colours], 1) if args.side_by_side else colours for _, image, colours in progress
        )
        size = (source.size[0] * (2 if args.side_by_side else 1), source.size[1])
        return write_video(out_dir / f"{source.path.stem}_pca.mp4", frames, source.fps, size)
    written = 0
    for name, image, colours in progress:
        write_image(out_dir / f"{name}_pca.png", np.concatenate([image, colours], 1))
        write_image(out_dir / f"{name}_overlay.jpg", blend(image, colours, args.alpha))
        written += 1
    return written


def check_args(args: argparse.Namespace) -> None:
    check_imgsz(args.imgsz)
    if args.foreground is not None and not 0 <= args.foreground < 1:
        raise UserError(f"--foreground must be in [0, 1), got {args.foreground}")


def main(args: argparse.Namespace) -> None:
    check_args(args)
    source = open_source(Path(args.input), args.max_frames)
    out_dir = claim_output_folder(output_folder(args.out_dir), inputs=source.images or [source.path])
    seed_everything(args.seed)  # a random-init backbone (--no-pretrained) draws the same weights every run
    extract = PatchFeatures(
        imgsz=args.imgsz, layer=args.layer, device=args.device, amp=args.amp, **backbone_kwargs(args)
    )
    grid = extract.grid
    dim = extract.dim
    needed = (source.count or 1) * grid[0] * grid[1] * dim * 2
    keep = needed <= args.max_memory_gb * 1e9
    if args.save_features and not keep:
        raise UserError(
            f"--save-features: {source.count} images' features need {format_bytes(needed)}, more than "
            f"--max-memory-gb {args.max_memory_gb:g}; raise it or lower --max-frames"
        )
    started = time.perf_counter()
    kept, sample, names = collect(source, extract, args, keep)
    count = len(names)
    every = torch.cat(kept).reshape(-1, dim) if keep else None  # all patches, float16, concatenated once
    fitted = sampled(every, args.pca_sample, args.seed).float() if keep else sample
    pca, foreground_pca, flipped = fit_maps(fitted, args.foreground, extract.device)
    if keep:  # colours scaled over every patch of the input, not only the fitted sample
        pca = pca.scaled_to(every)
        if foreground_pca is not None:
            first = pca.colors(every)[:, 0]
            foreground_pca = foreground_pca.scaled_to(every[((1 - first) if flipped else first) > args.foreground])
    print(
        describe_pca(extract, count, len(fitted), keep, pca, source.images is None)
        + (
            ""
            if foreground_pca is None
            else f"; foreground = first component {'<' if flipped else '>'} "
            f"{args.foreground:g} after scaling ({'flipped: ' if flipped else ''}the larger side is background)"
        )
    )
    colour = lambda grid_: colour_grid(grid_, pca, foreground_pca, args.foreground, flipped)  # noqa: E731
    written = write_results(source, maps(source, extract, kept, args, colour), out_dir, args)
    if args.save_features:
        save_features(out_dir / "features.pt", kept, names, extract, args)
    seconds = time.perf_counter() - started
    print(
        f"{written} {'frames' if source.images is None else 'images'}, {1000 * seconds / max(written, 1):.0f} ms "
        f"per {'frame' if source.images is None else 'image'} in all (features, PCA, drawing, writing); "
        f"results in {out_dir}"
    )


def describe_pca(extract: PatchFeatures, count: int, fitted: int, kept: bool, pca: FeaturePca, video: bool) -> str:
    """What the PCA was fitted on, e.g. "PCA of block 12 over 8 images (37x37 patches each): all 10,952 patches"."""
    total = count * extract.grid[0] * extract.grid[1]
    what = (
        f"all {total:,} patches"
        if fitted == total
        else f"a seeded sample of {fitted:,} of the {total:,} patches (colours scaled over all)"
        if kept
        else f"a seeded sample of {fitted:,} patches (features recomputed for the maps; colours scaled over the sample)"
    )
    unit = "frame" if video else "image"
    return (
        f"PCA of block {extract.layer} over {count} {unit}{'s' * (count != 1)} ({extract.grid[1]}x{extract.grid[0]} "
        f"patches each): {what}; the 3 components explain "
        + " + ".join(f"{100 * share:.1f}" for share in pca.variance_shares())
        + " % of the features' variance"
    )


def save_features(
    path: Path, kept: list[torch.Tensor], names: list[str], extract: PatchFeatures, args: argparse.Namespace
) -> None:
    """features.pt: [N, h, w, C] float16 patch features (after the backbone's final norm) and what they are."""
    record = {
        "features": torch.stack(kept),
        "grid": tuple(kept[0].shape[:2]),
        "names": names,
        "layer": extract.layer,
        "imgsz": list(args.imgsz),
        "backbone": args.backbone,
        "source": args.source,
    }
    atomic_write(path, lambda tmp: torch.save(record, tmp))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
