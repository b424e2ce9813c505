"""Keeping the device busy: images decoded and resized ahead (DataLoader workers, a reader thread),
predicted in batches, drawn and written behind (a writer thread pool), in the order they came.

On a GPU everything around the network (decoding, resizing, drawing, encoding) costs as much as the
network itself; run in series with it, the device waits half the time. The predictions themselves
are `Predictor.predict_prepared`'s, in the order the inputs came: the threads change no result
(tests), the batch only what its matrix products' shapes change (see inference.py).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from torch.utils.data import DataLoader, Dataset

from dinokit.data.image_files import DatasetError, read_image

T = TypeVar("T")


class BatchPredictor(Protocol):
    """What the pipeline needs of a predictor (inference.Predictor is one)."""

    def prepare(self, image: np.ndarray) -> Any: ...

    def predict_prepared(self, batch: Sequence[Any]) -> list[np.ndarray]: ...


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def timed_prediction(predictor: BatchPredictor, prepared: Sequence[Any]) -> tuple[list[np.ndarray], float]:
    """`predictor.predict_prepared(prepared)` and each image's share of the seconds it took."""
    if not prepared:
        return [], 0.0
    started = time.perf_counter()
    predictions = predictor.predict_prepared(prepared)
    return predictions, (time.perf_counter() - started) / len(prepared)


_DONE = object()


def in_background(items: Iterable[T], ahead: int) -> Iterator[T]:
    """`items`, produced by a thread at most `ahead` in advance, in order. An exception there is
    raised here at its place in the sequence; closing this iterator stops the thread (and closes
    `items`) before it returns, so what the thread reads can be released after it."""
    handoff: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def offer(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not offer((True, item)):
                    return
            offer((True, _DONE))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            offer((False, err))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="dinokit-background", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = handoff.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def ordered_map(function: Callable[[T], Any], items: Iterable[T], threads: int) -> Iterator[Any]:
    """`function` of each item, in order, computed by `threads` threads at most twice as many items
    ahead (0: in the caller, one at a time). For drawing video frames: OpenCV and NumPy release the
    GIL, so a GPU's frames are drawn on several cores while the encoder takes them in order."""
    if threads <= 0:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="dinokit-draw") as pool:
        pending: deque[Future] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) > 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for job in pending:
                job.cancel()


class BackgroundWriter:
    """Runs writing jobs (drawing, encoding, saving) in `threads` threads, at most twice as many
    waiting, so the device never waits for the disk; 0 threads: each job at once, in the caller.
    The first error of any job is raised in the caller (at the next `submit` or on leaving)."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dinokit-writer") if threads > 0 else None
        self.limit = 2 * max(threads, 1)
        self.pending: list[Future] = []

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        if self.pool is None:
            job(*args)
            return
        self.pending.append(self.pool.submit(job, *args))
        while len(self.pending) > self.limit or (self.pending and self.pending[0].done()):
            self.pending.pop(0).result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.pool is None:
            return
        try:
            if exc_info[0] is None:
                for job in self.pending:
                    job.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class FolderItem:
    """One file of a folder: the image and its prediction, or why it was skipped."""

    path: Path
    image: np.ndarray | None = None
    prediction: np.ndarray | None = None
    error: str | None = None


class PreparedFolder(Dataset):
    """Files read and prepared by DataLoader workers; an unreadable one carries its error instead."""

    def __init__(self, paths: Sequence[Path], prepare: Callable[[np.ndarray], Any]):
        self.paths, self.prepare = list(paths), prepare

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[FolderItem, Any]:
        path = self.paths[index]
        try:
            image = read_image(path)
        except DatasetError as err:
            return FolderItem(path, error=str(err)), None
        return FolderItem(path, image), self.prepare(image)


def predicted_folder(
    paths: Sequence[Path],
    predictor: BatchPredictor,
    prepare: Callable[[np.ndarray], Any],
    *,
    batch: int = 1,
    workers: int = 0,
    timings: list[float] | None = None,
) -> Iterator[FolderItem]:
    """Each file with its prediction (or its error), in order: read and prepared by `workers`
    DataLoader workers (`prepare`: a picklable function of the image), predicted `batch` at a time.
    The seconds each prediction took (its share of the batch) are appended to `timings`."""
    dataset = PreparedFolder(paths, prepare)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=list)
    for group in loader:
        readable = [(item, prepared) for item, prepared in group if item.error is None]
        predictions, seconds = timed_prediction(predictor, [prepared for _, prepared in readable])
        for (item, _), prediction in zip(readable, predictions):
            item.prediction = prediction
            if timings is not None:
                timings.append(seconds)
        yield from (item for item, _ in group)
