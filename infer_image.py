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
from functools import partial

from tqdm import tqdm

import config
from cli import ArgumentParser, add_inference_args, output_folder, output_options, run_cli
from dinokit.data.image_files import DatasetError, image_paths
from dinokit.prediction.pipeline import BackgroundWriter, predicted_folder
from dinokit.runs.run_folder import claim_output_folder
from inference import load_predictor, prepare
from utils import select_throughput


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="an image folder or a single image file")
    add_inference_args(parser, config.OUTPUT_DIR / "inference_results_image")
    parser.add_argument("--save-npy", action="store_true", help="depth models: also <stem>.npy in float32 metres")
    return parser


def main(args: argparse.Namespace) -> None:
    options = output_options(args)
    images = image_paths(args.input)
    out_dir = claim_output_folder(output_folder(args.out_dir), inputs=images)
    predictor = load_predictor(args)
    batch, workers = select_throughput(predictor.device, args.batch, args.workers)
    write_result = predictor.task.image_writer(predictor.info, out_dir, options)
    write = lambda item: write_result(item.path, item.image, item.prediction)  # noqa: E731
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
