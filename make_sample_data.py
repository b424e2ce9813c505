"""Generate a small synthetic dataset in the VOC Kaggle layout (for `make demo` and the tests).

Each image is a noisy background with a few filled shapes; each shape's class decides its image
colour, so even a random-init backbone's features separate the classes and a short run learns.
Masks are RGB colour PNGs in the VOC palette with a void (224,224,192) outline, as in real VOC.

    python make_sample_data.py --out input/voc_2012_segmentation_data --train 24 --valid 8
"""

from __future__ import annotations

import argparse

import config
from cli import ArgumentParser, at_least, run_cli
from dinokit.data.synthetic import make_dataset


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(config.DATA_DIR))
    parser.add_argument("--train", type=at_least(1), default=24)
    parser.add_argument("--valid", type=at_least(1), default=8)
    parser.add_argument("--size", type=at_least(14), nargs=2, default=(160, 120), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> None:
    root = make_dataset(args.out, args.train, args.valid, tuple(args.size), seed=args.seed)
    print(f"Wrote {args.train} training and {args.valid} validation pairs to {root}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
