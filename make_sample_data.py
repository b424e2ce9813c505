"""Generate a small synthetic dataset in the VOC Kaggle layout (for `make demo` and the tests).

Each image is a noisy background with a few filled shapes; each shape's class decides its image
colour, so even a random-init backbone's features separate the classes and a short run learns.
Masks are RGB colour PNGs in the VOC palette with a void (224,224,192) outline, as in real VOC.

    python make_sample_data.py --out input/voc_2012_segmentation_data --train 24 --valid 8

With --depth, an RGB-D folder instead (docs/depth.md): a textured ground plane whose depth grows
with the image row and a box at 2 m, 16-bit millimetre PNGs and depth.json.

    python make_sample_data.py --depth --out input/sample_rgbd --train 16 --valid 4

With --panoptic, a COCO-format shapes set for --task panoptic / instance (docs/panoptic.md): a sky
band over a ground band (stuff) and discs, squares and triangles (things), some touching another of
their class; COCO panoptic PNGs + JSON and the same things as polygons in a COCO instances file.

    python make_sample_data.py --panoptic --out input/sample_coco --train 24 --valid 8

With --video FILE, also a short clip for infer_video.py and the demo's video tab: the validation
images one after the other, each panned across a few frames (what `make demo` writes as
input/sample_clip.mp4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import config
from cli import ArgumentParser, at_least, run_cli
from dinokit.data.image_files import list_image_files, read_image
from dinokit.data.synthetic import make_dataset, make_depth_dataset, make_panoptic_dataset
from dinokit.errors import UserError
from dinokit.prediction.videos import write_video


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(config.DATA_DIR))
    parser.add_argument("--train", type=at_least(1), default=24)
    parser.add_argument("--valid", type=at_least(1), default=8)
    parser.add_argument("--size", type=at_least(14), nargs=2, default=(160, 120), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--depth", action="store_true", help="an RGB-D folder (images + depth maps) instead")
    kind.add_argument("--panoptic", action="store_true", help="a COCO panoptic + instances shapes set instead")
    parser.add_argument("--video", default=None, metavar="FILE", help="also a clip of the validation images (.mp4)")
    return parser


def sample_clip(images: list[Path], path: Path, fps: float = 8.0, frames_per_image: int = 6) -> int:
    """A clip of `images` (of one size), each panned sideways over `frames_per_image` frames."""
    pictures = [read_image(image) for image in images]
    height, width = pictures[0].shape[:2]
    step = max(1, width // (4 * frames_per_image))
    frames = (np.roll(picture, shift * step, axis=1) for picture in pictures for shift in range(frames_per_image))
    return write_video(path, frames, fps, (width, height))


def main(args: argparse.Namespace) -> None:
    if args.video is not None and Path(args.video).suffix not in (".mp4", ".webm"):
        raise UserError(f"--video {args.video}: write the clip as .mp4 or .webm")
    make = make_depth_dataset if args.depth else make_panoptic_dataset if args.panoptic else make_dataset
    root = make(args.out, args.train, args.valid, tuple(args.size), seed=args.seed)
    what = "image/depth" if args.depth else "COCO-annotated" if args.panoptic else "image/mask"
    print(f"Wrote {args.train} training and {args.valid} validation {what} pairs to {root}")
    if args.video is not None:
        frames = sample_clip(list_image_files(Path(root) / "valid_images"), Path(args.video))
        print(f"Wrote {frames} frames to {args.video}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
