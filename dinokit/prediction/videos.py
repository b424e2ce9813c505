"""Reading and safely writing video clips (infer_video.py, the web demo, feature maps).

A result video is written under a temporary name, then opened again and checked (frame count, the
last frame decodes) before it replaces an earlier result: OpenCV's writer drops frames silently on
a full disk and leaves a file no player can open.

Both codecs store colour at half resolution in 2x2 blocks (4:2:0), so their encoders need an even
width and height and would crop an odd one (a 161x119 clip became 160x118, its last column and row
lost). A frame of odd size is padded instead, by repeating its last column / row: no input pixel is
dropped, and the result is at most one pixel wider and taller than the input.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dinokit.prediction.pipeline import BatchPredictor, batched, in_background, ordered_map, timed_prediction
from dinokit.writing import temp_path


@dataclass(frozen=True)
class VideoInfo:
    fps: float  # 25 when the container does not say
    size: tuple[int, int]  # (width, height)
    frame_count: int  # 0 = unknown

    def frames_to_read(self, max_frames: int = 0) -> int:
        """Frames a pass will read: the clip's count, capped by `max_frames` (0: no cap); 0 = unknown."""
        if max_frames > 0:
            return min(self.frame_count, max_frames) if self.frame_count else max_frames
        return self.frame_count


def open_video(path: str | Path) -> tuple[cv2.VideoCapture, VideoInfo]:
    """The capture and what its container says; a missing or undecodable file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: video file not found")
    capture = cv2.VideoCapture(str(path))
    # OpenCV "opens" some non-videos (a text file named .jpg, as a one-image sequence) with no frame size.
    if not capture.isOpened() or capture.get(cv2.CAP_PROP_FRAME_WIDTH) <= 0:
        capture.release()
        raise ValueError(f"{path}: cannot be opened as a video (corrupt or unsupported codec)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return capture, VideoInfo(
        fps if fps and fps > 0 else 25.0, size, max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    )


def read_frames(capture: cv2.VideoCapture, max_frames: int = 0) -> Iterator[np.ndarray]:
    """RGB frames until the clip ends, a frame cannot be decoded, or `max_frames` (0: no limit)."""
    read = 0
    while not (max_frames > 0 and read >= max_frames):
        ok, frame = capture.read()
        if not ok:
            return
        read += 1
        yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


# Container -> codec OpenCV's pip wheels can write: MPEG-4 Part 2 in .mp4 (what players expect; the
# H.264 encoder is not in the wheels), VP8 in .webm (what browsers play, for the web demo).
CODECS = {".mp4": "mp4v", ".webm": "VP80"}


def encoded_size(size: tuple[int, int]) -> tuple[int, int]:
    """The (W, H) a clip of `size` is stored at: rounded up to even sides (see the module docstring)."""
    return size[0] + size[0] % 2, size[1] + size[1] % 2


def padded_to_even(frame: np.ndarray) -> np.ndarray:
    """`frame` with its last column / row repeated where its width / height is odd."""
    height, width = frame.shape[:2]
    if width % 2 == 0 and height % 2 == 0:
        return frame
    return cv2.copyMakeBorder(frame, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float, size: tuple[int, int]) -> int:
    """Write RGB `frames` of `size` (W, H) at `path` (.mp4 or .webm; temporary name, checked,
    renamed); returns the frame count. Nothing replaces `path` unless the whole clip was written.
    Odd sides are padded to even ones (`encoded_size`)."""
    path = Path(path)
    if path.suffix not in CODECS:
        raise ValueError(f"{path}: write videos as {' or '.join(CODECS)}")
    tmp = temp_path(path, suffix=path.suffix)  # the container format follows the extension
    stored = encoded_size(size)
    written = 0
    try:
        writer = open_writer(tmp, CODECS[path.suffix], fps, stored)
        if not writer.isOpened():
            raise OSError(f"{path}: OpenCV cannot write {CODECS[path.suffix]} video here")
        try:
            for frame in frames:
                writer.write(cv2.cvtColor(padded_to_even(frame), cv2.COLOR_RGB2BGR))
                written += 1
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"stopped at frame {written + 1}; {path} was left as it was") from None
        finally:
            writer.release()  # finishes the container
        if written:
            verify_video(tmp, written, stored)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return written


# What OpenCV's FFmpeg writer prints for every WebM file (the container stores no codec tag, and
# the file is right): not a message for the user.
_HARMLESS = ("is not supported with codec id 139 and format 'webm / WebM'",)


def open_writer(path: Path, codec: str, fps: float, size: tuple[int, int]) -> cv2.VideoWriter:
    """cv2.VideoWriter, with OpenCV's note about the WebM codec tag (printed by its C code on
    stderr) held back; anything else it prints is passed on."""
    with _stderr_filtered(_HARMLESS):
        return cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, size)


@contextlib.contextmanager
def _stderr_filtered(harmless: tuple[str, ...]):
    """Capture what C code writes to file descriptor 2 during the block; re-emit all but `harmless` lines."""
    fd = 2  # where C code writes, whatever sys.stderr is now
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                if not any(text in line for text in harmless)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def verify_video(path: Path, frames: int, size: tuple[int, int]) -> None:
    """The written file must open, report `frames` frames and decode its last one."""
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
        raise OSError(
            f"{path.parent}: the video written there is incomplete ({found}; disk full?); "
            "any earlier result was left as it was"
        )


def draw_fps(frame: np.ndarray, seconds: float) -> np.ndarray:
    """The frame with "N.N FPS" (one prediction's rate) in its top-right corner, outlined to read on any colour."""
    label, width = f"{1 / max(seconds, 1e-9):.1f} FPS", frame.shape[1]
    origin = (max(10, width - 160), 30)
    cv2.putText(frame, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 4, cv2.LINE_AA)
    cv2.putText(frame, label, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2, cv2.LINE_AA)
    return frame


def frame_predictions(
    frames: Iterable[np.ndarray], predictor: BatchPredictor, timings: list[float], *, batch: int = 1, ahead: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
    """(frame, prediction, seconds of its prediction) for each RGB frame, in order, predicted `batch`
    frames at a time (each frame's share of the batch's time, also appended to `timings`). `ahead`
    > 0: decoded and prepared by a reader thread up to `ahead` frames in advance."""
    prepared: Iterable = ((frame, predictor.prepare(frame)) for frame in frames)
    if ahead > 0:
        prepared = in_background(prepared, ahead)
    for group in batched(prepared, batch):
        predictions, seconds = timed_prediction(predictor, [item for _, item in group])
        for (frame, _), prediction in zip(group, predictions):
            timings.append(seconds)
            yield frame, prediction, seconds


def predicted_frames(
    frames: Iterable[np.ndarray],
    predictor: BatchPredictor,
    draw: Callable[[np.ndarray, np.ndarray], np.ndarray],
    timings: list[float],
    *,
    batch: int = 1,
    workers: int = 0,
) -> Iterator[np.ndarray]:
    """The frames drawn with their predictions by `draw` (the task's: segmentation overlays, depth in
    colour with its bar), each with its prediction's FPS. `workers` > 0: frames are decoded ahead by
    a reader thread, predicted `batch` at a time by a second and drawn by `workers` more while the
    caller encodes (close the iterator before releasing the capture). The frames are the same
    either way."""
    ahead = 2 * batch if workers > 0 else 0
    predicted = frame_predictions(frames, predictor, timings, batch=batch, ahead=ahead)
    if workers > 0:
        predicted = in_background(predicted, ahead)
    return drawn_frames(predicted, draw, workers)


def drawn_frames(
    predicted: Iterator[tuple[np.ndarray, np.ndarray, float]],
    draw: Callable[[np.ndarray, np.ndarray], np.ndarray],
    threads: int = 0,
) -> Iterator[np.ndarray]:
    """Each frame drawn with its prediction and its FPS, in order, by `threads` threads (0: here);
    closing this closes `predicted` (and its threads)."""
    try:
        yield from ordered_map(lambda item: draw_fps(draw(item[0], item[1]), item[2]), predicted, threads)
    finally:
        predicted.close()
