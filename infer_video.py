"""Segment every frame of a video clip with a trained checkpoint.

    python infer_video.py --input input/inference_data/videos/video_1.mp4 --model outputs/fine_tuning/best_model_iou.pth

Writes outputs/inference_results_video/<name>.mp4 (or into --out-dir): the same size and frame rate
as the input, each frame overlaid with the predicted classes, their names, a legend and the FPS.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
from tqdm import tqdm

import config
from cli import run_cli
from drawing import render
from files import refuse_overwriting_inputs, remove_stale_temp_files, temp_path
from inference import Predictor, add_inference_args, check_inference_args, load_predictor


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a video file OpenCV can read (mp4, avi, ...)")
    add_inference_args(parser, config.OUTPUT_DIR / "inference_results_video")
    parser.add_argument("--show", action="store_true", help="display frames while processing (needs a display)")
    parser.add_argument("--max-frames", type=int, default=0, help="stop after N frames (0: the whole clip), for a quick preview")
    return parser


def open_video(path: Path) -> tuple[cv2.VideoCapture, float, tuple[int, int], int]:
    """The capture, its fps (25 when the container does not say), (width, height) and frame count (0 = unknown)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"{path}: cannot be opened as a video (corrupt or unsupported codec)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return capture, fps if fps and fps > 0 else 25.0, size, max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)


def show_frame(frame_bgr) -> bool:
    """Display a frame; False when there is no GUI (headless OpenCV, no display) or the user pressed q."""
    try:
        cv2.imshow("DINOv2 segmentation", frame_bgr)
        return cv2.waitKey(1) & 0xFF != ord("q")
    except cv2.error:
        tqdm.write("warning: --show needs a display and the GUI build of OpenCV (pip install opencv-python); not showing", file=sys.stderr)
        return False


def main(args: argparse.Namespace) -> None:
    check_inference_args(args)
    source = Path(args.input)
    capture, fps, size, frame_count = open_video(source)
    try:
        if args.max_frames > 0:
            frame_count = min(frame_count, args.max_frames) if frame_count else args.max_frames
        out_dir = Path(args.out_dir)
        out_path = out_dir / f"{source.stem}.mp4"
        refuse_overwriting_inputs([out_path], [source])
        predictor = load_predictor(args)
        remove_stale_temp_files(out_dir)
        tmp_path = temp_path(out_path, suffix=".mp4")  # the container format follows the extension
        try:
            written, seconds = segment_video(capture, predictor, tmp_path, fps, size, frame_count, args)
            verify_video(tmp_path, written, size)
            os.replace(tmp_path, out_path)  # only a complete, playable file replaces an earlier result
        except KeyboardInterrupt as err:
            raise KeyboardInterrupt("; ".join(filter(None, (str(err), f"{out_path} was left as it was")))) from None
        finally:
            tmp_path.unlink(missing_ok=True)
    finally:
        capture.release()
    if frame_count and written < frame_count:
        print(f"warning: {source}: stopped at frame {written} of {frame_count} (a frame could not be decoded); "
              f"the output holds the frames before it", file=sys.stderr)
    print(f"{written} frames, average {written / seconds:.2f} FPS ({predictor.mode.describe()}), "
          f"{predictor.engine}; video saved to {out_path}")


def segment_video(capture: cv2.VideoCapture, predictor: Predictor, path: Path, fps: float, size: tuple[int, int],
                  frame_count: int, args: argparse.Namespace) -> tuple[int, float]:
    """Predict, draw and write every frame into `path`: (frames written, seconds spent predicting)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write an mp4v video here")
    show, written, seconds = args.show, 0, 0.0
    progress = tqdm(total=frame_count or None, desc="Frames", dynamic_ncols=True)
    try:
        while not (args.max_frames > 0 and written >= args.max_frames):
            ok, frame = capture.read()
            if not ok:
                break
            image = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            started = time.perf_counter()
            mask = predictor.predict(image)
            elapsed = time.perf_counter() - started
            seconds += elapsed
            drawn = cv2.cvtColor(render(image, mask, predictor.classes, predictor.color_map, args.alpha), cv2.COLOR_RGB2BGR)
            label = f"{1 / max(elapsed, 1e-9):.1f} FPS"
            origin = (max(10, size[0] - 160), 30)
            cv2.putText(drawn, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 4, cv2.LINE_AA)
            cv2.putText(drawn, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
            writer.write(drawn)
            written += 1
            progress.update()
            if show:
                show = show_frame(drawn)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"stopped at frame {written + 1}") from None
    finally:
        progress.close()
        writer.release()  # finishes the container
        if args.show:
            try:
                cv2.destroyAllWindows()
            except cv2.error:
                pass
    if written == 0:
        raise ValueError(f"{args.input}: no frame could be decoded")
    return written, seconds


def verify_video(path: Path, frames: int, size: tuple[int, int]) -> None:
    """The written file must open, report `frames` frames and decode its last one: OpenCV's writer
    drops frames silently when the disk is full and leaves a file no player can open."""
    capture = cv2.VideoCapture(str(path))
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
        last_ok = False
        if count == frames:
            capture.set(cv2.CAP_PROP_POS_FRAMES, frames - 1)
            ok, frame = capture.read()
            last_ok = ok and frame.shape[1::-1] == tuple(size)
    finally:
        capture.release()
    if count != frames or not last_ok:
        found = f"{count} of {frames} frames" if count != frames else "its last frame cannot be decoded"
        raise OSError(f"{path.parent}: the video written there is incomplete ({found}; disk full?); "
                      "any earlier result was left as it was")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
