"""Scoring a model the way papers report it: every image predicted at its original resolution
(by `Predictor.predict_prepared`, in any `InferenceMode`) and scored by its task's evaluator
(segmentation: one confusion matrix over the whole split, ignore pixels excluded; depth: the depth
errors of every image, averaged). Used by evaluate.py, train.py's final evaluation and the
notebooks; under torchrun each process scores its own shard and the counts are all-reduced, so N
processes report what one measures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import ShardSampler
from dinokit.prediction.pipeline import batched
from inference import Predictor
from utils import all_reduce_sum, distributed, is_main_process, rank, select_throughput, world_size


@dataclass
class Evaluation:
    """A split scored at full resolution: the task's result (segmentation: scores, confusion matrix
    and the article-style mIoU; depth: the errors), with what it took."""

    predictor: Predictor
    result: Any
    images: int
    ms_per_image: float  # prediction time (model + resizing + TTA), measured on this process
    processes: int

    def lines(self) -> list[str]:
        """The summary (and per-class table) that evaluate.py and train.py print."""
        return self.predictor.task.report_lines(self, self.predictor.info)

    def report(self, **extra: Any) -> dict[str, Any]:
        """The JSON report (eval_*.json, best_validation.json), `extra` first."""
        return self.predictor.task.report_json(self, self.predictor.info, **extra)

    def headline(self) -> str:
        """The one figure a title shows (mIoU, RMSE)."""
        return self.predictor.task.headline(self)


def predicted_pairs(predictor: Predictor, loader: DataLoader, desc: str | None) -> Iterator[tuple[Any, Any, float]]:
    """(prediction, truth, seconds of the prediction) of each (image, truth) pair, predicted the way
    infer_image.py predicts (`Predictor.predict_prepared`, batched on a GPU: the same masks). A
    progress bar named `desc` on stderr; None: none (a notebook's output stays clean)."""
    batch, _ = select_throughput(predictor.device)
    quiet = desc is None or not is_main_process()
    pairs = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=quiet)
    for group in batched(pairs, batch):
        started = time.perf_counter()
        predictions = predictor.predict_prepared([predictor.prepare(image.numpy()) for image, _ in group])
        seconds = (time.perf_counter() - started) / len(group)
        for (_, truth), prediction in zip(group, predictions):
            yield prediction, truth, seconds


def evaluate_pairs(
    predictor: Predictor,
    pairs: list[tuple[Path, Path]],
    data: Any = None,
    *,
    workers: int = 0,
    article_batch: int = 2,
    desc: str | None = "Evaluate",
) -> Evaluation:
    """Predict every pair's image at its own size and score it against its truth. `data`: what the
    task reads the truth with beyond the model's description (depth: the folder's depth.json)."""
    task, info = predictor.task, predictor.info
    dataset = task.truth(pairs, info, data)
    sampler = ShardSampler(len(dataset), rank(), world_size()) if distributed() else None
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers)
    device = predictor.device
    evaluator = task.evaluator(info, data, article_batch)
    seconds, count = 0.0, 0
    for prediction, truth, took in predicted_pairs(predictor, loader, desc):
        seconds, count = seconds + took, count + 1
        evaluator.update(*task.on_device(prediction, truth, device))
    images = torch.tensor(count, device=device)
    all_reduce_sum(images)
    return Evaluation(
        predictor,
        evaluator.result(device),
        images=int(images),
        ms_per_image=1000 * seconds / max(count, 1),
        processes=world_size(),
    )
