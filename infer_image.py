"""Segment every image in a folder (or one image) with a trained checkpoint.

    python infer_image.py --input input/inference_data/images --model outputs/fine_tuning/best_model_iou.pth

For each image writes, into --out-dir (default outputs/inference_results_image/):
  <stem>.jpg       the image with the predicted classes blended in, their names and a legend
  <stem>_mask.png  the raw prediction: a palette PNG whose pixel values are class indices
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

import config
from cli import ArgumentParser, add_inference_args, run_cli
from dinokit.data.image_files import DatasetError, image_paths, read_image, write_image
from dinokit.prediction.drawing import indexed_png, render
from dinokit.runs.run_folder import claim_output_folder
from dinokit.writing import atomic_write
from inference import load_predictor


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="an image folder or a single image file")
    add_inference_args(parser, config.OUTPUT_DIR / "inference_results_image")
    return parser


def output_names(image_path: Path) -> tuple[str, str]:
    """The overlay and the index-mask file names written for one image."""
    return f"{image_path.stem}.jpg", f"{image_path.stem}_mask.png"


def main(args: argparse.Namespace) -> None:
    images = image_paths(args.input)
    out_dir = claim_output_folder(args.out_dir, inputs=images)
    predictor = load_predictor(args)
    seconds, done = 0.0, 0
    for path in tqdm(images, desc="Images", dynamic_ncols=True):
        try:
            image = read_image(path)
        except DatasetError as err:
            tqdm.write(f"warning: skipped {err}", file=sys.stderr)
            continue
        started = time.perf_counter()
        mask = predictor.predict(image)
        seconds += time.perf_counter() - started
        done += 1
        drawn_name, mask_name = output_names(path)
        write_image(out_dir / drawn_name, render(image, mask, predictor.classes, predictor.color_map, args.alpha))
        atomic_write(out_dir / mask_name, lambda tmp: indexed_png(mask, predictor.color_map).save(tmp, format="PNG"))
    if done == 0:
        raise DatasetError(f"{args.input}: none of the {len(images)} files could be read as an image")
    print(
        f"{done} images ({len(images) - done} skipped), {1000 * seconds / done:.1f} ms/image "
        f"({predictor.mode.describe()}), {predictor.engine}; results in {out_dir}"
    )


if __name__ == "__main__":
    run_cli(main, get_args_parser())
