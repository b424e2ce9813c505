"""Panoptic and instance segmentation as tasks: EoMT (eomt.py) on COCO panoptic / COCO instances
folders (coco.py), trained with the mask-classification loss (loss.py), predicted as a panoptic
map plus scored thing detections (predictions.py), scored with PQ / mask AP / mIoU (scoring.py),
drawn one colour per instance (drawing.py). `instance` is `panoptic` restricted to thing classes,
read from an instances file (or a panoptic one's things) and chosen on mask AP."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets import OriginalPairs, PairedDataset
from dinokit.backbones.choice import BackboneChoice
from dinokit.data.augmentations import train_transform
from dinokit.data.image_files import DatasetError, write_image
from dinokit.data.resize import eval_transform
from dinokit.errors import UserError
from dinokit.tasks.panoptic.coco import (
    VOID,
    Categories,
    CocoReader,
    ImageRecord,
    Truth,
    TruthReader,
    check_records,
    find_split,
    read_split,
    split_files,
)
from dinokit.tasks.panoptic.drawing import (
    SegmentColors,
    coco_panoptic,
    color_panoptic,
    draw_panoptic,
    legend_html,
)
from dinokit.tasks.panoptic.eomt import QUERIES, QUERY_BLOCKS, EomtModel, QueryOutputs
from dinokit.tasks.panoptic.predictions import ObjectPrediction, predict_objects
from dinokit.tasks.panoptic.released import load_released_eomt
from dinokit.tasks.panoptic.scoring import PanopticEvaluator, PanopticResult, PanopticScoring
from dinokit.tasks.registry import register_task
from dinokit.tasks.task import Best, OutputOptions, Task
from dinokit.writing import atomic_write, write_json


@dataclass
class CocoData:
    """A COCO folder's classes and the records of the images read so far (by image path)."""

    categories: Categories
    records: dict[Path, ImageRecord]


@register_task
class PanopticTask(Task):
    name = "panoptic"
    help = "things and stuff, one segment per object (EoMT; COCO panoptic folders)"
    data_layout = "{train,valid}_images/ + annotations/panoptic_{train,valid}.json and PNG folders"
    best = Best("pq", "PQ", max)
    curves = (
        ("loss", "Loss", "loss.png"),
        ("pq", "PQ", "pq.png"),
        ("mask_ap", "mask AP", "mask_ap.png"),
        ("miou", "mIoU", "miou.png"),
    )
    metric_names = {"pq": "PQ", "mask_ap": "mask AP", "miou": "mIoU"}
    target_dtype = torch.int32  # class * 1000 + instance
    folder_prefix = "panoptic_"
    target_noun = "annotation"
    formats: tuple[str, ...] = ("panoptic",)  # annotation files read, in order of preference
    things_only = False
    export_outputs = {"queries": "class logits [B, K, C+1] and mask logits [B, K, h, w] of the K queries"}
    export_measure = "panoptic agreement"
    export_quantity = "mask logit"

    # -- training -------------------------------------------------------------------------------

    def check_args(self, args: argparse.Namespace, backbone: BackboneChoice) -> None:
        if args.gradient_loss:
            raise UserError("--gradient-loss weighs a depth loss: it needs --task depth")
        if args.train_views:
            raise UserError(
                "--train-views caches augmented views of a frozen backbone's features: EoMT trains on images"
            )
        if args.head == "linear":
            raise UserError(f"--head linear: a {self.name} model is EoMT (queries and a mask module); drop --head")

    def load_data(
        self, args: argparse.Namespace, imgsz: tuple[int, int], normalization: tuple
    ) -> tuple[PairedDataset, PairedDataset, CocoData]:
        """Both splits, every image and annotation checked first (the PNGs decoded)."""
        splits, records, categories = {}, {}, None
        for split in ("train", "valid"):
            files = find_split(args.data_dir, split, self.formats)
            found, split_records = read_split(files, things_only=self.things_only)
            if categories is not None and found != categories:
                raise DatasetError(f"{files.annotations}: its categories differ from the train split's")
            categories = found
            count = check_records(
                split_records, categories, str(files.annotations), threads=min(8, os.cpu_count() or 1)
            )
            print(f"Checked {split}: {len(split_records)} images, {count} segments ({files.annotations})")
            splits[split] = [(r.image, files.annotations) for r in split_records]
            records.update({r.image: r for r in split_records})
        kinds = ", ".join(f"{n}{'' if t else ' (stuff)'}" for n, t in zip(categories.names, categories.isthing))
        print(f"{len(categories.names)} classes: {kinds}")
        reader = CocoReader(list(records.values()), categories)
        transforms = {
            "train": train_transform(args.recipe, imgsz, VOID, normalization),
            "valid": eval_transform(imgsz, *normalization),
        }
        train, valid = (
            PairedDataset(splits[s], reader, transforms[s], target_dtype=np.int32, seed=args.seed)
            for s in ("train", "valid")
        )
        return train, valid, CocoData(categories, records)

    def build_model(
        self, args: argparse.Namespace, spec: CocoData, backbone: BackboneChoice, resumed: dict[str, Any] | None
    ) -> EomtModel:
        arch = resumed or {}
        model = EomtModel(
            len(spec.categories.names),
            queries=arch.get("queries", args.queries or QUERIES),
            query_blocks=arch.get("query_blocks", args.query_blocks or QUERY_BLOCKS),
            masked_attention=arch.get("masked_attention", not args.no_masked_attention),
            fine_tune=args.fine_tune,
            normalization=arch.get("normalization"),
            **backbone.kwargs(),
        )
        if args.head_weights and resumed is None:
            print(
                f"Started from {args.head_weights}: " + load_released_eomt(model, args.head_weights, model.spec.family)
            )
        return model

    def describe(self, model: EomtModel, spec: CocoData, imgsz: tuple[int, int], **extra: Any) -> dict[str, Any]:
        categories = spec.categories
        return {
            "classes": list(categories.names),
            "category_ids": list(categories.ids),
            "isthing": list(categories.isthing),
            "colors": [list(c) for c in categories.colors],
            **extra,
        }

    def targets(self, info: dict[str, Any]) -> Categories:
        return Categories(
            tuple(info["classes"]),
            tuple(info["category_ids"]),
            tuple(bool(t) for t in info["isthing"]),
            tuple(tuple(c) for c in info["colors"]),
        )

    def scoring(self, spec: CocoData, args: argparse.Namespace) -> Callable[[], PanopticScoring]:
        categories = spec.categories
        return lambda: PanopticScoring(list(categories.names), list(categories.isthing))

    def resume_fields(self, info: dict[str, Any], spec: CocoData) -> list[tuple[str, Any, Any]]:
        return [("classes", info["classes"], list(spec.categories.names))]

    def drawer(self, info: dict[str, Any]) -> Callable[[np.ndarray, Any], np.ndarray]:
        categories = self.targets(info)

        def draw(image: np.ndarray, target: Any) -> np.ndarray:
            if isinstance(target, ObjectPrediction):
                panoptic = target.panoptic
            else:
                panoptic = target.target if isinstance(target, Truth) else np.asarray(target)
            return draw_panoptic(image, panoptic, categories, SegmentColors(categories)(panoptic))

        return draw

    # -- rebuilding -----------------------------------------------------------------------------

    def rebuild(self, info: dict[str, Any], **common: Any) -> EomtModel:
        arch = info["arch"]
        return EomtModel(
            arch["num_classes"],
            queries=arch["queries"],
            query_blocks=arch["query_blocks"],
            masked_attention=arch["masked_attention"],
            **common,
        )

    # -- full-resolution evaluation -------------------------------------------------------------

    def find_pairs(self, data_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
        files = find_split(data_dir, split, self.formats)
        _, records = read_split(files, things_only=self.things_only)
        return [(r.image, files.annotations) for r in records]

    def pair_folders(self, images: Path, targets: Path) -> list[tuple[Path, Path]]:
        raise UserError(
            f"--images/--labels pair masks by file name; a {self.name} model is scored on a COCO folder: "
            "--data-dir DIR --split NAME"
        )

    def evaluation_data(
        self, info: dict[str, Any], data_dir: str | Path, pairs: list[tuple[Path, Path]], label: str
    ) -> CocoData:
        """The split's records, its classes checked against the model's."""
        if not pairs:
            raise DatasetError(f"{data_dir}: the {label} has no images")
        files = split_files(pairs[0][1], pairs[0][0].parent)
        categories, records = read_split(files, things_only=self.things_only)
        model_classes = self.targets(info)
        if list(categories.names) != list(model_classes.names):
            raise DatasetError(
                f"{files.annotations}: classes {list(categories.names)} but the model predicts "
                f"{list(model_classes.names)}"
            )
        segments = check_records(records, categories, label)
        print(f"Checked {len(records)} images and {segments} segments of the {label}")
        return CocoData(categories, {r.image: r for r in records})

    def describe_data(self, data: CocoData) -> str:
        return f"{len(data.categories.names)} classes"

    def truth(self, pairs: list[tuple[Path, Path]], info: dict[str, Any], data: CocoData) -> OriginalPairs:
        """`(image, Truth)` at the files' own size."""
        known = dict(data.records)
        if pairs and any(image not in known for image, _ in pairs):  # another split than the one checked
            _, records = read_split(split_files(pairs[0][1], pairs[0][0].parent), things_only=self.things_only)
            known.update({r.image: r for r in records})
        return OriginalPairs(pairs, TruthReader([known[image] for image, _ in pairs], data.categories))

    def evaluator(self, info: dict[str, Any], data: Any, article_batch: int = 2) -> PanopticEvaluator:
        return PanopticEvaluator(self.targets(info))

    def on_device(self, prediction: Any, truth: Any, device: torch.device) -> tuple[Any, Any]:
        return prediction, truth

    def report_lines(self, evaluation: Any, info: dict[str, Any]) -> list[str]:
        """Each class's PQ, then the one summary line of fractions (with what it took, in brackets)."""
        result: PanopticResult = evaluation.result
        lines = [f"{'class':<20} {'PQ':>7}"]
        lines += [
            f"{name[:20]:<20} {v:7.4f}" if v == v else f"{name[:20]:<20} {'-':>7}"
            for name, v in result.per_class.items()
        ]
        return lines + [f"{result.line()}  ({evaluation.images} images, {evaluation.ms_per_image:.0f} ms/image)"]

    def report_json(self, evaluation: Any, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
        result: PanopticResult = evaluation.result
        return {
            **extra,
            "images": evaluation.images,
            "ms_per_image": evaluation.ms_per_image,
            **result.metrics(),
            "ap50": result.ap50,
            "ap75": result.ap75,
            "pq_per_class": result.per_class,
            "coco_eval_stats": result.coco_stats,
            "processes": evaluation.processes,
        }

    def headline(self, evaluation: Any) -> str:
        return f"PQ {evaluation.result.pq:.3f}"

    def write_predictions(self, evaluation: Any, info: dict[str, Any], out_dir: Path, split: str) -> list[Path]:
        """The split's predictions in COCO's formats, for any COCO tool to re-score:
        panoptic_{split}.json beside panoptic_{split}/ (PNGs), and instances_{split}_results.json (a
        results list of RLE masks with scores). The PNG folder is filled aside and moved in whole."""
        categories = self.targets(info)
        records = evaluation.result.records
        png_dir, staging = out_dir / f"panoptic_{split}", out_dir / f".panoptic_{split}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        annotations, results = [], []
        for record in records:
            name = Path(record.file_name).with_suffix(".png").name
            (staging / name).write_bytes(record.png)
            annotations.append({"image_id": record.image_id, "file_name": name, "segments_info": record.segments})
            for cls, rle, score in record.detections:
                counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
                segmentation = {"size": list(rle["size"]), "counts": counts}
                results.append(
                    {
                        "image_id": record.image_id,
                        "category_id": categories.ids[cls],
                        "segmentation": segmentation,
                        "score": round(score, 5),
                    }
                )
        shutil.rmtree(png_dir, ignore_errors=True)
        staging.rename(png_dir)
        images = [{"id": r.image_id, "file_name": r.file_name} for r in records]
        panoptic_json = out_dir / f"panoptic_{split}.json"
        write_json(panoptic_json, {"images": images, "annotations": annotations, "categories": categories.to_json()})
        results_json = out_dir / f"instances_{split}_results.json"
        write_json(results_json, results)
        return [panoptic_json, png_dir, results_json]

    # -- prediction -----------------------------------------------------------------------------

    def check_mode(self, mode: Any) -> None:
        if mode.mode != "whole" or mode.passes != 1:
            raise UserError(
                f"a {self.name} model predicts whole images in one pass: its queries are per image, so windows "
                "(--mode slide) and test-time passes (--scales, --flip) have nothing to average"
            )

    def color_map(self, info: dict[str, Any]) -> Any:
        return None

    def reduce(self, outputs: QueryOutputs, size: tuple[int, int], info: dict[str, Any]) -> list[ObjectPrediction]:
        """Each image's panoptic map and thing detections at its size."""
        isthing = list(self.targets(info).isthing)
        masks = outputs.image_masks(size)
        return [predict_objects(masks[i], outputs.classes[i], isthing) for i in range(len(masks))]

    # -- outputs --------------------------------------------------------------------------------

    def image_writer(
        self, info: dict[str, Any], out_dir: Path, options: OutputOptions
    ) -> Callable[[Path, np.ndarray, ObjectPrediction], None]:
        """`<stem>.jpg` (instances in their colours, outlined and named), `<stem>_panoptic.png` (COCO
        encoding) and `<stem>_segments.json` (its segments_info: class, score, area, box)."""
        categories = self.targets(info)

        def write(path: Path, image: np.ndarray, prediction: ObjectPrediction) -> None:
            colors = SegmentColors(categories)(prediction.panoptic)
            write_image(
                out_dir / f"{path.stem}.jpg",
                draw_panoptic(image, prediction.panoptic, categories, colors, options.alpha),
            )
            png, segments = coco_panoptic(prediction, categories)
            atomic_write(out_dir / f"{path.stem}_panoptic.png", lambda tmp: png.save(tmp, format="PNG"))
            write_json(out_dir / f"{path.stem}_segments.json", {"file_name": path.name, "segments_info": segments})

        return write

    def frame_drawer(
        self, info: dict[str, Any], size: tuple[int, int], options: OutputOptions
    ) -> tuple[Callable[[np.ndarray, ObjectPrediction], np.ndarray], tuple[int, int]]:
        """Each instance keeps its colour from frame to frame (mask IoU with the previous frame)."""
        categories = self.targets(info)
        colors = SegmentColors(categories, track=True)

        def draw(frame: np.ndarray, prediction: ObjectPrediction) -> np.ndarray:
            return draw_panoptic(frame, prediction.panoptic, categories, colors(prediction.panoptic), options.alpha)

        return draw, size

    def demo_outputs(
        self,
        info: dict[str, Any],
        stem: str,
        image: np.ndarray,
        prediction: ObjectPrediction,
        write: Callable,
        alpha: float,
    ) -> tuple[Any, ...]:
        """The page's panes: the drawn instances, the segments in colour, the segment table, the PNG."""
        categories = self.targets(info)
        colors = SegmentColors(categories)(prediction.panoptic)
        png, _ = coco_panoptic(prediction, categories)
        path = write(f"{stem}_panoptic.png", lambda tmp: png.save(tmp, format="PNG"))
        drawn = draw_panoptic(image, prediction.panoptic, categories, colors, alpha)
        return (
            drawn,
            color_panoptic(prediction.panoptic, colors),
            legend_html(prediction.panoptic, categories, colors, prediction.scores),
            str(path),
        )

    # -- export ---------------------------------------------------------------------------------

    def export_output(self, info: dict[str, Any], argmax: bool, where: str) -> str:
        if argmax:
            raise UserError(f"--argmax: {where} is a {self.name} model; its file outputs the queries' logits")
        return "queries"

    def summary(self, info: dict[str, Any]) -> str:
        categories = self.targets(info)
        return f"{self.name} ({len(categories.names)} classes, {info['arch']['queries']} queries)"

    def from_exported(
        self, outputs: tuple[torch.Tensor, ...], input_size: tuple[int, int], patch_size: int
    ) -> QueryOutputs:
        classes, masks = outputs
        padded = tuple((side + patch_size - 1) // patch_size * patch_size for side in input_size)
        return QueryOutputs(masks, classes, (), input_size, padded)

    def max_difference(self, actual: Any, expected: Any) -> float:
        """The largest logit difference, classes and masks."""
        actual_classes, actual_masks = actual
        return max(
            (actual_classes - expected.classes).abs().max().item(), (actual_masks - expected.masks).abs().max().item()
        )

    def agreement(self, actual: Any, expected: Any) -> float:
        """Share of (query, pixel) mask decisions (logit > 0) that agree."""
        _, actual_masks = actual
        return ((actual_masks > 0) == (expected.masks > 0)).float().mean().item()


@register_task
class InstanceTask(PanopticTask):
    name = "instance"
    help = "thing instances only (EoMT; COCO instances files, or a panoptic folder's things)"
    data_layout = "{train,valid}_images/ + annotations/instances_{train,valid}.json"
    best = Best("mask_ap", "AP", max)
    curves = (
        ("loss", "Loss", "loss.png"),
        ("mask_ap", "mask AP", "mask_ap.png"),
        ("pq", "PQ", "pq.png"),
    )
    folder_prefix = "instance_"
    formats = ("instances", "panoptic")
    things_only = True

    def headline(self, evaluation: Any) -> str:
        return f"mask AP {evaluation.result.mask_ap:.3f}"
