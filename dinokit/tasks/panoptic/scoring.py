"""Panoptic and instance scores: PQ / SQ / RQ exactly as panopticapi computes them (pq_compute.py:
segments matched at IoU > 0.5 within a class, VOID pixels of a prediction out of its union, a
prediction lying over more than half VOID or crowd of its class not counted as a false positive,
classes averaged over those that occur), mask AP / AP50 / AP75 by pycocotools' COCOeval on RLE
masks, and mIoU of the panoptic prediction's classes (pixels it leaves without a segment count as
wrong). The same `ObjectScores` serves the per-epoch scores (at the training size) and the
full-resolution evaluation.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dinokit.tasks.panoptic.coco import LABEL_DIVISOR, Categories, Truth
from dinokit.tasks.panoptic.drawing import coco_panoptic
from dinokit.tasks.panoptic.loss import MaskClassificationLoss
from dinokit.tasks.panoptic.predictions import ObjectPrediction, predict_objects
from utils import all_reduce_sum

OFFSET = 1 << 20  # pairs (truth value, predicted value) as one integer; values are below LABEL_DIVISOR * classes


def pq_counts(truth: np.ndarray, prediction: np.ndarray, isthing: list[bool]) -> np.ndarray:
    """`[classes, 4]` (IoU sum, TP, FP, FN) of one image, panopticapi's rules, from two encoded maps."""
    counts = np.zeros((len(isthing), 4))
    t_values, t_areas = np.unique(truth, return_counts=True)
    p_values, p_areas = np.unique(prediction, return_counts=True)
    t_area = dict(zip(t_values.tolist(), t_areas.tolist()))
    p_area = dict(zip(p_values.tolist(), p_areas.tolist()))
    pairs, overlaps = np.unique(
        (truth.astype(np.int64) + 1) * OFFSET + (prediction.astype(np.int64) + 1), return_counts=True
    )
    overlap = {(int(k // OFFSET) - 1, int(k % OFFSET) - 1): int(n) for k, n in zip(pairs, overlaps)}

    def crowd(value: int) -> bool:
        return isthing[value // LABEL_DIVISOR] and value % LABEL_DIVISOR == 0

    matched_truth, matched_prediction = set(), set()
    for (t, p), intersection in overlap.items():
        if t < 0 or p < 0 or crowd(t) or t // LABEL_DIVISOR != p // LABEL_DIVISOR:
            continue
        union = t_area[t] + p_area[p] - intersection - overlap.get((-1, p), 0)
        iou = intersection / union
        if iou > 0.5:
            counts[t // LABEL_DIVISOR, 0] += iou
            counts[t // LABEL_DIVISOR, 1] += 1
            matched_truth.add(t)
            matched_prediction.add(p)
    for t in t_area:
        if t >= 0 and not crowd(t) and t not in matched_truth:
            counts[t // LABEL_DIVISOR, 3] += 1
    for p in p_area:
        if p < 0 or p in matched_prediction:
            continue
        cls = p // LABEL_DIVISOR
        ignored = overlap.get((-1, p), 0) + (overlap.get((cls * LABEL_DIVISOR, p), 0) if isthing[cls] else 0)
        if ignored / p_area[p] > 0.5:
            continue
        counts[cls, 2] += 1
    return counts


@dataclass
class PanopticResult:
    """A split's scores (fractions), each class's PQ, and COCOeval's twelve numbers."""

    pq: float
    sq: float
    rq: float
    pq_things: float
    pq_stuff: float
    mask_ap: float
    ap50: float
    ap75: float
    miou: float
    per_class: dict[str, float] = field(default_factory=dict)
    coco_stats: list[float] = field(default_factory=list)
    records: list = field(default_factory=list, repr=False)  # full-resolution evaluation: each image's prediction

    def metrics(self) -> dict[str, float]:
        return {
            "pq": self.pq,
            "sq": self.sq,
            "rq": self.rq,
            "pq_things": self.pq_things,
            "pq_stuff": self.pq_stuff,
            "mask_ap": self.mask_ap,
            "miou": self.miou,
        }

    def line(self) -> str:
        return (
            f"PQ {self.pq:.4f} | SQ {self.sq:.4f} | RQ {self.rq:.4f} | PQ things {self.pq_things:.4f} | "
            f"PQ stuff {self.pq_stuff:.4f} | mask AP {self.mask_ap:.4f} | AP50 {self.ap50:.4f} | AP75 {self.ap75:.4f} "
            f"| mIoU {self.miou:.4f}"
        )


def summarise_pq(counts: np.ndarray, isthing: list[bool]) -> tuple[dict[str, tuple[float, float, float]], list[float]]:
    """panopticapi's averages: over the classes with any TP, FP or FN (all, things, stuff), and each class's PQ."""
    iou, tp, fp, fn = counts.T
    seen = (tp + fp + fn) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        pq = iou / (tp + 0.5 * fp + 0.5 * fn)
        sq = np.where(tp > 0, iou / np.maximum(tp, 1), 0.0)
        rq = tp / (tp + 0.5 * fp + 0.5 * fn)
    things = np.array(isthing, dtype=bool)
    out = {}
    for name, chosen in (("all", seen), ("things", seen & things), ("stuff", seen & ~things)):
        out[name] = tuple(float(v[chosen].mean()) if chosen.any() else 0.0 for v in (pq, sq, rq))
    return out, [float(v) if s else float("nan") for v, s in zip(pq, seen)]


def mask_ap(truths: list[dict], detections: list[dict], images: list[dict[str, int]], num_classes: int) -> list[float]:
    """COCOeval (iouType segm) of RLE ground truth and detections: its 12 summary numbers (-1: undefined)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not any(not t["iscrowd"] for t in truths):
        return [-1.0] * 12
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": truths,
        "categories": [{"id": c} for c in range(num_classes)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(detections) if detections else COCO()
        if not detections:
            return [0.0] * 12
        evaluator = COCOeval(gt, dt, iouType="segm")
        evaluator.params.imgIds = [image["id"] for image in images]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


class ObjectScores:
    """Accumulates PQ counts, the class confusion and COCO's annotations over a split."""

    def __init__(self, classes: list[str], isthing: list[bool]):
        self.classes, self.isthing = classes, isthing
        n = len(classes)
        self.counts = np.zeros((n, 4))
        self.confusion = torch.zeros((n + 1) * (n + 1), dtype=torch.int64)
        self.truths: list[dict] = []
        self.detections: list[dict] = []
        self.images: list[dict[str, int]] = []

    def update(
        self, truth: np.ndarray, prediction: ObjectPrediction, instances: list[tuple[int, Any, bool]], image_id: int
    ) -> None:
        """One image: its target map, its prediction, its true instances (class, bool mask or RLE, crowd)."""
        from pycocotools import mask as coco_mask

        n = len(self.classes)
        self.counts += pq_counts(truth, prediction.panoptic, self.isthing)
        t = np.where(truth >= 0, truth // LABEL_DIVISOR, -1).ravel()
        p = np.where(prediction.panoptic >= 0, prediction.panoptic // LABEL_DIVISOR, n).ravel()
        labelled = t >= 0
        self.confusion += torch.from_numpy(np.bincount(t[labelled] * (n + 1) + p[labelled], minlength=(n + 1) ** 2))
        self.images.append({"id": image_id, "height": truth.shape[0], "width": truth.shape[1]})
        for cls, mask, crowd in instances:
            rle = mask if isinstance(mask, dict) else coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            self.truths.append(
                {
                    "id": len(self.truths) + 1,
                    "image_id": image_id,
                    "category_id": int(cls),
                    "segmentation": rle,
                    "area": float(coco_mask.area(rle)),
                    "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                    "iscrowd": int(crowd),
                }
            )
        for cls, rle, score in prediction.instances:
            self.detections.append({"image_id": image_id, "category_id": int(cls), "segmentation": rle, "score": score})

    def result(self) -> PanopticResult:
        n = len(self.classes)
        averages, per_class = summarise_pq(self.counts, self.isthing)
        mat = self.confusion.reshape(n + 1, n + 1).double()
        correct = mat.diag()[:n]
        union = mat[:n].sum(1) + mat[:, :n].sum(0) - correct
        present = union > 0
        miou = float((correct[present] / union[present]).mean()) if present.any() else 0.0
        stats = mask_ap(self.truths, self.detections, self.images, n)
        ap, ap50, ap75 = (max(v, 0.0) for v in stats[:3])
        return PanopticResult(
            *averages["all"],
            averages["things"][0],
            averages["stuff"][0],
            ap,
            ap50,
            ap75,
            miou,
            dict(zip(self.classes, per_class)),
            stats,
        )


class PanopticScoring:
    """The training loop's `Scoring`: the mask-classification loss and, per pass, the split's PQ,
    mask AP and mIoU at the training size."""

    def __init__(self, classes: list[str], isthing: list[bool]):
        self.loss_fn = MaskClassificationLoss(len(classes), isthing)
        self.scores = ObjectScores(classes, isthing)
        self.isthing = isthing

    def loss(self, outputs: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(outputs, targets)

    def update(self, outputs: Any, targets: torch.Tensor) -> None:
        masks = outputs.image_masks(targets.shape[-2:])
        for index, target in enumerate(targets):
            prediction = predict_objects(masks[index], outputs.classes[index], self.isthing)
            truth = target.cpu().numpy()
            self.scores.update(truth, prediction, truth_instances(truth, self.isthing), len(self.scores.images) + 1)

    def result(self, device: torch.device) -> tuple[dict[str, float], list[float]]:
        counts = torch.from_numpy(self.scores.counts).to(device)
        all_reduce_sum(counts)  # under torchrun: PQ from every rank's counts (AP and mIoU: this rank's share)
        self.scores.counts = counts.cpu().numpy()
        result = self.scores.result()
        return result.metrics(), list(result.per_class.values())


def truth_instances(target: np.ndarray, isthing: list[bool]) -> list[tuple[int, np.ndarray, bool]]:
    """A target map's thing segments as instances (crowd regions flagged), for mask AP."""
    return [
        (int(v) // LABEL_DIVISOR, target == v, int(v) % LABEL_DIVISOR == 0)
        for v in np.unique(target)
        if v >= 0 and isthing[int(v) // LABEL_DIVISOR]
    ]


@dataclass
class PredictionRecord:
    """One image's prediction in COCO's terms, compact (a PNG's bytes) until evaluate.py writes it."""

    image_id: int
    file_name: str
    png: bytes
    segments: list[dict]
    detections: list[tuple[int, dict, float]]


class PanopticEvaluator:
    """Full-resolution evaluation (evaluation.py): each prediction against its `Truth`, each kept as a
    `PredictionRecord` for the COCO files evaluate.py writes."""

    def __init__(self, categories: Categories):
        self.categories = categories
        self.scores = ObjectScores(list(categories.names), list(categories.isthing))
        self.records: list[PredictionRecord] = []

    def update(self, prediction: ObjectPrediction, truth: Truth) -> None:
        self.scores.update(truth.target, prediction, truth.instances, truth.image_id)
        png, segments = coco_panoptic(prediction, self.categories)
        buffer = io.BytesIO()
        png.save(buffer, format="PNG")
        record = PredictionRecord(truth.image_id, truth.file_name, buffer.getvalue(), segments, prediction.instances)
        self.records.append(record)

    def result(self, device: torch.device) -> PanopticResult:
        result = self.scores.result()
        result.records = self.records
        return result
