"""Segment every frame of a video clip with a trained checkpoint, or estimate its depth.

    python infer_video.py --input input/inference_data/videos/video_1.mp4 --model outputs/fine_tuning/best_model_iou.pth

Writes outputs/inference_results_video/<name>.mp4 (or into --out-dir): the same size and frame rate
as the input, each frame overlaid with the predicted classes, their names, a legend and the FPS.
A depth model (--head-weights nyu_linear4, ...) writes each frame's depth in colour instead, on one
colour scale for the whole clip (--depth-range, default the model's), with a colour bar in metres
beside it (the video is that much wider).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

import config
from cli import ArgumentParser, add_inference_args, at_least, output_folder, output_options, run_cli
from dinokit.prediction.videos import open_video, predicted_frames, read_frames, write_video
from dinokit.runs.run_folder import claim_output_folder
from inference import load_predictor
from utils import select_throughput


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a video file OpenCV can read (mp4, avi, ...)")
    add_inference_args(parser, config.OUTPUT_DIR / "inference_results_video")
    parser.add_argument("--show", action="store_true", help="display frames while processing (needs a display)")
    parser.add_argument(
        "--max-frames", type=at_least(0), default=0, help="stop after N frames (0: the whole clip), for a quick preview"
    )
    return parser


def show_frame(frame_rgb: np.ndarray) -> bool:
    """Display a frame; False when there is no GUI (headless OpenCV, no display) or the user pressed q."""
    try:
        cv2.imshow("DINOv2 segmentation", cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))
        return cv2.waitKey(1) & 0xFF != ord("q")
    except cv2.error:
        tqdm.write(
            "warning: --show needs a display and the GUI build of OpenCV (pip install opencv-python); not showing",
            file=sys.stderr,
        )
        return False


def shown(frames: Iterable[np.ndarray], total: int, show: bool) -> Iterator[np.ndarray]:
    """The frames, passed on with a progress bar (and displayed with --show)."""
    with tqdm(total=total or None, desc="Frames", dynamic_ncols=True) as progress:
        try:
            for frame in frames:
                if show:
                    show = show_frame(frame)
                yield frame
                progress.update()
        finally:
            if show:
                try:
                    cv2.destroyAllWindows()
                except cv2.error:
                    pass


def main(args: argparse.Namespace) -> None:
    source = Path(args.input)
    options = output_options(args)
    capture, video = open_video(source)
    try:
        frame_count = video.frames_to_read(args.max_frames)
        out_path = claim_output_folder(output_folder(args.out_dir), inputs=[source]) / f"{source.stem}.mp4"
        predictor = load_predictor(args)
        batch, workers = select_throughput(predictor.device, args.batch, args.workers)
        timings: list[float] = []
        draw, size = predictor.task.frame_drawer(predictor.info, video.size, options)
        frames = predicted_frames(
            read_frames(capture, args.max_frames), predictor, draw, timings, batch=batch, workers=workers
        )
        try:
            written = write_video(out_path, shown(frames, frame_count, args.show), video.fps, size)
        finally:
            frames.close()  # stops the reader and predictor threads before the capture goes
    finally:
        capture.release()
    if written == 0:
        raise ValueError(f"{source}: no frame could be decoded")
    if frame_count and written < frame_count:
        print(
            f"warning: {source}: stopped at frame {written} of {frame_count} (a frame could not be decoded); "
            f"the output holds the frames before it",
            file=sys.stderr,
        )
    print(
        f"{written} frames, average {len(timings) / sum(timings):.2f} FPS ({predictor.mode.describe()}, "
        f"batch {batch}), {predictor.engine}; video saved to {out_path}"
    )


if __name__ == "__main__":
    run_cli(main, get_args_parser())
