"""Scoring a model the way papers report it: every image predicted at its original resolution
(by `Predictor.predict_prepared`, in any `InferenceMode`), one confusion matrix over the whole split,
ignore pixels excluded; for a depth model the depth errors of every image, averaged. Used by
evaluate.py and by train.py's final evaluation; under torchrun each process scores its own shard
and the counts are all-reduced, so N processes report what one measures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import DepthPairDataset, PairDataset, ShardSampler
from dinokit.data.depth_files import DepthSpec, eval_crop_mask, valid_depth
from dinokit.prediction.pipeline import batched
from inference import Predictor
from metrics import DEPTH_METRICS, ConfusionMatrix, DepthErrors, SeedStyleIoU, SegmentationScores
from utils import all_reduce_sum, distributed, is_main_process, rank, select_throughput, world_size


@dataclass
class Evaluation:
    scores: SegmentationScores
    confusion: torch.Tensor  # [num_classes, num_classes] pixel counts, row = true class
    seed_miou: float  # SeedStyleIoU over batches of `seed_batch` images, for comparison with seed-style loops
    images: int
    ms_per_image: float  # prediction time (model + resizing + TTA), measured on this process


def predicted_pairs(
    predictor: Predictor, loader: DataLoader, desc: str | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
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
            yield torch.from_numpy(prediction), truth, seconds


def evaluate_pairs(
    predictor: Predictor,
    pairs: list[tuple[Path, Path]],
    *,
    workers: int = 0,
    seed_batch: int = 2,
    desc: str | None = "Evaluate",
) -> Evaluation:
    """Predict every pair's image at its own size and score it against its mask."""
    dataset = PairDataset(pairs, predictor.color_map, predictor.mask_format)
    sampler = ShardSampler(len(dataset), rank(), world_size()) if distributed() else None
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers)
    device = predictor.device
    num_classes, ignore_index = len(predictor.classes), predictor.color_map.ignore_index
    confmat = ConfusionMatrix(num_classes, ignore_index)
    seed = SeedStyleIoU(num_classes, ignore_index, seed_batch)
    seconds, count = 0.0, 0
    for prediction, mask, took in predicted_pairs(predictor, loader, desc):
        seconds, count = seconds + took, count + 1
        target, prediction = mask.to(device), prediction.to(device)
        confmat.update(target, prediction)
        seed.update(target, prediction)
    confmat.reduce_from_all_processes(device)
    images = torch.tensor(count, device=device)
    all_reduce_sum(images)
    return Evaluation(
        scores=confmat.compute(),
        confusion=confmat.mat.cpu(),
        seed_miou=seed.compute(device),
        images=int(images),
        ms_per_image=1000 * seconds / max(count, 1),
    )


def evaluate_depth_pairs(
    predictor: Predictor,
    pairs: list[tuple[Path, Path]],
    spec: DepthSpec,
    *,
    workers: int = 0,
    desc: str | None = "Evaluate",
) -> dict[str, float]:
    """Predict every pair's image at its own size and score the depth (metrics.DepthErrors) on the
    pixels that count: measured, within the dataset's range, inside its evaluation crop."""
    dataset = DepthPairDataset(pairs, spec)
    sampler = ShardSampler(len(dataset), rank(), world_size()) if distributed() else None
    loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers)
    errors, seconds, count = DepthErrors(), 0.0, 0
    for prediction, truth, took in predicted_pairs(predictor, loader, desc):
        seconds, count = seconds + took, count + 1
        valid = valid_depth(truth.numpy(), spec) & eval_crop_mask(tuple(truth.shape), spec.eval_crop)
        errors.update(prediction, truth, torch.from_numpy(valid))
    return {**errors.compute(predictor.device), "ms_per_image": 1000 * seconds / max(count, 1)}


def depth_report_lines(result: dict[str, float]) -> list[str]:
    """The depth metrics as evaluate.py prints them (lower is better up to silog; deltas: higher)."""
    errors = " | ".join(f"{name} {result[name]:.4f}" for name in DEPTH_METRICS)
    return [f"{errors}  ({result['images']} images, {result['ms_per_image']:.0f} ms/image)"]


def report_lines(evaluation: Evaluation, classes: list[str]) -> list[str]:
    """The summary and the per-class table that evaluate.py and train.py print."""
    s = evaluation.scores
    lines = [
        f"pixel accuracy {s.pixel_accuracy:.4f} | mIoU {s.miou:.4f} | mean class accuracy {s.mean_class_accuracy:.4f}"
        f" | frequency-weighted IoU {s.fwiou:.4f}"
        f"  ({evaluation.images} images, {evaluation.ms_per_image:.0f} ms/image)",
        f"{'class':<20} {'IoU':>7} {'acc':>7} {'share':>7}",
    ]
    for name, iou, acc, share in zip(classes, s.iou, s.class_accuracy, s.pixel_share):
        shown = [f"{v:7.4f}" if v == v else f"{'-':>7}" for v in (iou, acc, share)]
        lines.append(f"{name[:20]:<20} {' '.join(shown)}")
    return lines


def report_json(evaluation: Evaluation, classes: list[str], **extra) -> dict:
    s = evaluation.scores
    return {
        **extra,
        "images": evaluation.images,
        "ms_per_image": evaluation.ms_per_image,
        "pixel_accuracy": s.pixel_accuracy,
        "miou": s.miou,
        "mean_class_accuracy": s.mean_class_accuracy,
        "fwiou": s.fwiou,
        "seed_style_miou": evaluation.seed_miou,
        "iou": dict(zip(classes, s.iou)),
        "class_accuracy": dict(zip(classes, s.class_accuracy)),
        "pixel_share": dict(zip(classes, s.pixel_share)),
        "processes": world_size(),
    }
