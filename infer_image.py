"""Segment every image in a folder (or one image) with a trained checkpoint, or estimate its depth.

    python infer_image.py --input input/inference_data/images --model outputs/fine_tuning/best_model_iou.pth
    python infer_image.py --input photos/ --head-weights nyu_linear4 --save-npy     # Meta's NYU depth head

For each image writes, into --out-dir (default outputs/inference_results_image/):
  <stem>.jpg       the image with the predicted classes blended in, their names and a legend
  <stem>_mask.png  the raw prediction: a palette PNG whose pixel values are class indices
A depth model writes instead:
  <stem>_depth.png    the depth in colour (near bright, far dark) with a colour bar in metres
  <stem>_depth16.png  the depth in millimetres, 16-bit (clipped at 65.535 m)
  <stem>.npy          with --save-npy: the depth in metres, float32, at the image's size
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tqdm import tqdm

import config
from cli import ArgumentParser, add_inference_args, depth_range_from_args, output_folder, run_cli
from dinokit.data.image_files import DatasetError, image_paths, write_image
from dinokit.prediction.depth_maps import write_depth_outputs
from dinokit.prediction.drawing import indexed_png, render
from dinokit.prediction.pipeline import BackgroundWriter, FolderItem, predicted_folder
from dinokit.runs.run_folder import claim_output_folder
from dinokit.writing import atomic_write
from inference import Predictor, load_predictor, prepare
from utils import select_throughput


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="an image folder or a single image file")
    add_inference_args(parser, config.OUTPUT_DIR / "inference_results_image")
    parser.add_argument("--save-npy", action="store_true", help="depth models: also <stem>.npy in float32 metres")
    return parser


def output_names(image_path: Path) -> tuple[str, str]:
    """The overlay and the index-mask file names written for one image."""
    return f"{image_path.stem}.jpg", f"{image_path.stem}_mask.png"


def result_writer(predictor: Predictor, out_dir: Path, args: argparse.Namespace) -> Callable[[FolderItem], None]:
    """The function that draws and writes one image's results (run by the writer threads)."""
    if predictor.task == "depth":
        scale = depth_range_from_args(args, predictor.info)
        return lambda item: write_depth_outputs(out_dir, item.path.stem, item.prediction, scale, npy=args.save_npy)

    def write(item: FolderItem) -> None:
        drawn_name, mask_name = output_names(item.path)
        drawn = render(item.image, item.prediction, predictor.classes, predictor.color_map, args.alpha)
        write_image(out_dir / drawn_name, drawn)
        mask = indexed_png(item.prediction, predictor.color_map)
        atomic_write(out_dir / mask_name, lambda tmp: mask.save(tmp, format="PNG"))

    return write


def main(args: argparse.Namespace) -> None:
    images = image_paths(args.input)
    out_dir = claim_output_folder(output_folder(args.out_dir), inputs=images)
    predictor = load_predictor(args)
    batch, workers = select_throughput(predictor.device, args.batch, args.workers)
    write = result_writer(predictor, out_dir, args)
    timings: list[float] = []
    items = predicted_folder(
        images, predictor, partial(prepare, mode=predictor.mode), batch=batch, workers=workers, timings=timings
    )
    with BackgroundWriter(workers) as writer:
        for item in tqdm(items, total=len(images), desc="Images", dynamic_ncols=True):
            if item.error is not None:
                tqdm.write(f"warning: skipped {item.error}", file=sys.stderr)
            else:
                writer.submit(write, item)
    if not timings:
        raise DatasetError(f"{args.input}: none of the {len(images)} files could be read as an image")
    print(
        f"{len(timings)} images ({len(images) - len(timings)} skipped), {1000 * sum(timings) / len(timings):.1f} "
        f"ms/image ({predictor.mode.describe()}, batch {batch}), {predictor.engine}; results in {out_dir}"
    )


if __name__ == "__main__":
    run_cli(main, get_args_parser())
