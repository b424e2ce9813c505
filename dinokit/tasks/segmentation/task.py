"""Segmentation as a task: the papers' linear head (BatchNorm + 1x1 conv over the patch tokens of
the last block or the last four) trained with cross-entropy on image/mask folders described by
classes.json (or VOC's), scored with one confusion matrix over the split, predicted as class
indices and drawn as overlays in the dataset's colours."""

from __future__ import annotations

import argparse
import functools
import html
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets import MaskReader, OriginalPairs, SegmentationDataset, build_datasets
from dinokit.backbones.choice import BackboneChoice
from dinokit.backbones.released_heads import SPEC_BY_CLASSES, HeadWeightsError, read_checked_head
from dinokit.data.data_check import check_dataset
from dinokit.data.file_kinds import FileKindError, read_torch_file, torch_contents
from dinokit.data.image_files import write_image
from dinokit.data.labels import ColorMap, DatasetSpec, load_dataset_spec
from dinokit.prediction.drawing import class_shares, indexed_png, overlay, render
from dinokit.prediction.scores import predicted_classes, upsampled_classes
from dinokit.runs.reports import save_confusion_matrix
from dinokit.tasks.panoptic.eomt import QUERIES, QUERY_BLOCKS
from dinokit.tasks.panoptic.released import load_released_eomt
from dinokit.tasks.registry import register_task
from dinokit.tasks.segmentation.eomt_head import EomtSegmentationScoring, SemanticEomt
from dinokit.tasks.segmentation.head import LinearHead
from dinokit.tasks.segmentation.scoring import SegmentationEvaluator, SegmentationScoring, report_json, report_lines
from dinokit.tasks.task import Best, OutputOptions, Task
from dinokit.writing import atomic_write
from model import DenseModel, Taps, check_head_layers
from model_config import get_backbone_spec


def segmentation_model(
    num_classes: int,
    *,
    head_layers: int | None = None,
    dropout: float = 0.0,
    padding: str = "bottom_right",
    backbone: str = "small",
    registers: bool = False,
    **kwargs: Any,
) -> DenseModel:
    """DINOv2 / DINOv3 features from the last `head_layers` blocks (a ConvNeXt: its last stage),
    concatenated, classified per patch by `LinearHead`, upsampled to the image: `[B, num_classes, H, W]`
    for any input size. `kwargs`: `model.DenseModel`'s backbone keywords (source, weights, fine_tune, ...)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    spec = get_backbone_spec(backbone, registers)
    head_layers = max(spec.head_layers()) if head_layers is None else head_layers  # ViT: 4, ConvNeXt: 1
    check_head_layers(spec, head_layers)
    taps = Taps(tuple(spec.out_indices[-head_layers:]))
    head = functools.partial(LinearHead, taps.channels(spec.embed_dim), num_classes, dropout)
    arch = {"num_classes": num_classes, "head_layers": head_layers, "dropout": dropout}
    return DenseModel(head, taps, arch, backbone=backbone, registers=registers, padding=padding, **kwargs)


def dataset_spec(info: dict[str, Any], source: str = "model_info") -> DatasetSpec:
    """The dataset description a model was trained with (its classes, their colours, the ignore
    index, how its masks were read), typed, back from its `model_info`."""
    return DatasetSpec(
        info["classes"],
        [tuple(c) for c in info["colors"]],
        [tuple(c) for c in info["ignore_colors"]],
        info["ignore_index"],
        info["mask_format"],
        source=source,
    )


def palette(spec: DatasetSpec) -> ColorMap:
    """The colours predictions are drawn in (two classes may share one: a model's, not a file's)."""
    return ColorMap(spec.colors, spec.ignore_colors, spec.ignore_index, shared_colors=True)


@register_task
class SegmentationTask(Task):
    name = "segmentation"
    help = "class per pixel on image/mask folders ({train,valid}_{images,labels}/; any dataset via classes.json)"
    data_layout = "{train,valid}_{images,labels}/"
    best = Best("miou", "IoU", max)
    curves = (
        ("loss", "Loss", "loss.png"),
        ("pixacc", "Pixel accuracy", "accuracy.png"),
        ("miou", "mIoU", "miou.png"),
    )
    metric_names = {"pixacc": "PixAcc", "miou": "mIOU"}
    target_dtype = torch.uint8  # class indices

    # -- training -------------------------------------------------------------------------------

    def check_args(self, args: argparse.Namespace, backbone: BackboneChoice) -> None:
        if args.gradient_loss:
            raise ValueError("--gradient-loss weighs a depth loss: it needs --task depth")
        if args.head != "eomt":
            refuse_query_flags(args, "add --head eomt")
        elif args.train_views:
            raise ValueError("--train-views caches the linear head's features; --head eomt trains on images")

    def load_data(
        self, args: argparse.Namespace, imgsz: tuple[int, int], normalization: tuple
    ) -> tuple[SegmentationDataset, SegmentationDataset, DatasetSpec]:
        """The two splits of a segmentation folder (mask format decided by the full check) and its classes."""
        data_dir = Path(args.data_dir)
        if (data_dir / "depth.json").is_file() and not (data_dir / "train_labels").is_dir():
            raise ValueError(f"{args.data_dir}: an RGB-D folder (depth.json, no train_labels/): add --task depth")
        spec = load_dataset_spec(args.data_dir, args.classes)
        print(f"{len(spec.classes)} classes from {spec.source}: {', '.join(spec.classes)}")
        train_set, valid_set, check = build_datasets(
            args.data_dir,
            imgsz,
            spec,
            threads=min(8, os.cpu_count() or 1),
            seed=args.seed,
            recipe=args.recipe,
            normalization=normalization,
        )
        print(
            f"Checked {check.pairs} image/mask pairs in {check.seconds:.1f} s (every file decoded); labelled pixels: "
            + ", ".join(f"{split} {count:,}" for split, count in check.labelled.items())
        )
        for note in check.notes:
            print(f"Note: {note}")
        return train_set, valid_set, check.spec

    def build_model(
        self, args: argparse.Namespace, spec: DatasetSpec, backbone: BackboneChoice, resumed: dict[str, Any] | None
    ) -> DenseModel:
        """The linear head over the backbone's last blocks, started from Meta's released one with
        --head-weights. Meta's heads and the paper's recipe use their centred padding; a resumed run
        keeps whatever it had."""
        if (resumed or {}).get("head", args.head) == "eomt":
            return eomt_segmentation(args, spec, backbone, resumed)
        if resumed is not None:
            padding = resumed.get("padding", "bottom_right")
        else:
            padding = "center" if args.head_weights or args.recipe == "paper" else "bottom_right"
        model = segmentation_model(
            len(spec.classes),
            fine_tune=args.fine_tune,
            head_layers=args.head_layers,
            padding=padding,
            dropout=args.head_dropout,
            normalization=resumed.get("normalization") if resumed is not None else None,
            **backbone.kwargs(),
        )
        if args.head_weights and resumed is None:
            load_released_head(model, args, spec, backbone)
        return model

    def describe(self, model: DenseModel, spec: DatasetSpec, imgsz: tuple[int, int], **extra: Any) -> dict:
        """The segmentation half of a `model_info`: the classes, their colours and how masks were read."""
        return {
            "classes": list(spec.classes),
            "colors": [list(c) for c in spec.colors],
            "ignore_index": spec.ignore_index,
            "ignore_colors": [list(c) for c in spec.ignore_colors],
            "mask_format": spec.mask_format,
            **extra,
        }

    def scoring(self, spec: DatasetSpec, args: argparse.Namespace) -> Callable[[], SegmentationScoring]:
        kind = EomtSegmentationScoring if args.head == "eomt" else SegmentationScoring
        return functools.partial(kind, len(spec.classes), spec.ignore_index)

    def resume_fields(self, info: dict[str, Any], spec: DatasetSpec) -> list[tuple[str, Any, Any]]:
        return [("number of classes", info["arch"]["num_classes"], len(spec.classes))]

    def check_resume(self, info: dict[str, Any], spec: DatasetSpec, path: str) -> None:
        """A resumed run's classes, colours and ignore index are the checkpoint's."""
        saved = self.targets(info)
        for index, (name, color) in enumerate(zip(spec.classes, spec.colors)):
            saved_name, saved_color = saved.classes[index], tuple(saved.colors[index])
            if (saved_name, saved_color) != (name, tuple(color)):
                raise ValueError(
                    f"{path}: class {index} is {saved_name!r} {saved_color} in the checkpoint but {name!r} "
                    f"{tuple(color)} in {spec.source}; resume with the dataset description it was trained with"
                )
        if saved.ignore_index != spec.ignore_index:
            raise ValueError(
                f"{path}: checkpoint was trained with ignore index {saved.ignore_index} but {spec.source} "
                f"says {spec.ignore_index}"
            )

    def targets(self, info: dict[str, Any]) -> DatasetSpec:
        """What a model's outputs mean: its classes, their colours, the ignore index, its mask format."""
        return dataset_spec(info)

    def drawer(self, info: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        color_map = palette(self.targets(info))
        return lambda image, mask: overlay(image, mask, color_map)

    # -- rebuilding ---------------------------------------------------------------------------------

    def rebuild(self, info: dict[str, Any], **common: Any) -> DenseModel:
        """Older checkpoints: 4 blocks, no dropout."""
        arch = info["arch"]
        if arch.get("head") == "eomt":
            return SemanticEomt(
                arch["num_classes"],
                queries=arch["queries"],
                query_blocks=arch["query_blocks"],
                masked_attention=arch["masked_attention"],
                **common,
            )
        return segmentation_model(
            arch["num_classes"], head_layers=arch.get("head_layers", 4), dropout=arch.get("dropout", 0.0), **common
        )

    def claims_released_head(self, path_or_name: str | Path) -> bool:
        """Meta's VOC / ADE20K linear heads by name (voc2012_ms, ...), or a file holding one."""
        if not Path(path_or_name).is_file():
            return str(path_or_name).partition("_")[0] in ("voc2012", "ade20k")
        try:
            return torch_contents(read_torch_file(path_or_name, "segmentation head")) == "segmentation head"
        except FileKindError:
            return False

    def released_model(
        self,
        path_or_name: str | Path,
        *,
        backbone: str = "small",
        registers: bool = False,
        head_layers: int | None = None,
        **kwargs: Any,
    ) -> tuple[DenseModel, DatasetSpec, dict[str, Any]]:
        """A ready model (backbone + Meta's head, centred padding), the dataset its classes are:
        VOC 2012 (21 classes) or ADE20K (150), by the head's class count."""
        where = str(path_or_name)
        head, layers = read_checked_head(path_or_name, backbone, registers, head_layers)
        num_classes = head["classifier.weight"].shape[0]
        if num_classes not in SPEC_BY_CLASSES:
            raise HeadWeightsError(f"{where}: a head for {num_classes} classes, neither VOC 2012 (21) nor ADE20K (150)")
        model = segmentation_model(
            num_classes, backbone=backbone, registers=registers, head_layers=layers, padding="center", **kwargs
        )
        model.head.load_state_dict(head, strict=False)  # num_batches_tracked is optional
        return model.eval(), SPEC_BY_CLASSES[num_classes], {}

    # -- full-resolution evaluation -------------------------------------------------------------

    def evaluation_data(
        self, info: dict[str, Any], data_dir: str | Path, pairs: list[tuple[Path, Path]], label: str
    ) -> DatasetSpec:
        """The model's own dataset description; every pair decoded and checked against it."""
        check = check_dataset({label: pairs}, dataset_spec(info, f"{label} (model_info)"))
        print(f"Checked {check.pairs} pairs of the {label} in {check.seconds:.1f} s")
        return check.spec

    def describe_data(self, spec: DatasetSpec) -> str:
        return f"{len(spec.classes)} classes"

    def truth(self, pairs: list[tuple[Path, Path]], info: dict[str, Any], spec: Any) -> OriginalPairs:
        """`(image, mask [H, W] uint8 class indices)` at the files' own size, read as in training."""
        spec = self.targets(info)
        return OriginalPairs(pairs, MaskReader(palette(spec), spec.mask_format))

    def evaluator(self, info: dict[str, Any], spec: Any, article_batch: int = 2) -> SegmentationEvaluator:
        spec = self.targets(info)
        return SegmentationEvaluator(len(spec.classes), spec.ignore_index, article_batch)

    def report_lines(self, evaluation: Any, info: dict[str, Any]) -> list[str]:
        classes = self.targets(info).classes
        return report_lines(evaluation.result, classes, evaluation.images, evaluation.ms_per_image)

    def report_json(self, evaluation: Any, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            **extra,
            "images": evaluation.images,
            "ms_per_image": evaluation.ms_per_image,
            **report_json(evaluation.result, self.targets(info).classes),
            "processes": evaluation.processes,
        }

    def headline(self, evaluation: Any) -> str:
        return f"mIoU {evaluation.result.scores.miou:.3f}"

    def article_metric_line(self, evaluation: Any) -> str:
        """The reference article's per-batch mIoU beside the whole split's."""
        result = evaluation.result
        return (
            f"article-style mIoU (per batch of {result.article_batch}, absent classes as 0, mean over batches): "
            f"{result.article_miou:.4f}  vs  whole-split mIoU {result.scores.miou:.4f}"
        )

    def report_figures(self, evaluation: Any, out_dir: Path, name: str, title: str) -> list[Path]:
        """The confusion matrix beside the report: confusion_<name>.png."""
        path = out_dir / f"confusion_{name}.png"
        save_confusion_matrix(evaluation.result.confusion, evaluation.predictor.classes, path, title)
        return [path]

    # -- prediction -----------------------------------------------------------------------------

    def color_map(self, info: dict[str, Any]) -> ColorMap:
        return palette(self.targets(info))

    def combine_passes(self, logits: torch.Tensor) -> torch.Tensor:
        """Test-time passes average their softmax probabilities."""
        return logits.softmax(0)

    def reduce(self, outputs: torch.Tensor, size: tuple[int, int], info: dict[str, Any]) -> list[np.ndarray]:
        """Class indices at the image's size (upsampling only the classes that can win)."""
        return list(upsampled_classes(outputs, size).cpu().numpy())

    def from_scores(self, scores: torch.Tensor) -> np.ndarray:
        return predicted_classes(scores, 0).to(torch.uint8).cpu().numpy()

    # -- outputs --------------------------------------------------------------------------------

    def image_writer(
        self, info: dict[str, Any], out_dir: Path, options: OutputOptions
    ) -> Callable[[Path, np.ndarray, np.ndarray], None]:
        """`<stem>.jpg` (the classes blended in, named, with a legend) and `<stem>_mask.png` (a
        palette PNG whose pixel values are class indices)."""
        spec = self.targets(info)
        classes, color_map = spec.classes, palette(spec)

        def write(path: Path, image: np.ndarray, mask: np.ndarray) -> None:
            write_image(out_dir / f"{path.stem}.jpg", render(image, mask, classes, color_map, options.alpha))
            png = indexed_png(mask, color_map)
            atomic_write(out_dir / f"{path.stem}_mask.png", lambda tmp: png.save(tmp, format="PNG"))

        return write

    def frame_drawer(
        self, info: dict[str, Any], size: tuple[int, int], options: OutputOptions
    ) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], tuple[int, int]]:
        """The frame with its classes blended in, named, and a legend."""
        spec = self.targets(info)
        draw = functools.partial(render, classes=spec.classes, color_map=palette(spec), alpha=options.alpha)
        return draw, size

    def demo_outputs(
        self, info: dict[str, Any], stem: str, image: np.ndarray, mask: np.ndarray, write: Callable, alpha: float
    ) -> tuple[Any, ...]:
        """The page's panes: the overlay, the colour mask, the legend and the index-mask PNG
        (`write(name, save)` gives its path)."""
        spec = self.targets(info)
        color_map = palette(spec)
        png = write(f"{stem}_mask.png", lambda tmp: indexed_png(mask, color_map).save(tmp, format="PNG"))
        drawn = render(image, mask, spec.classes, color_map, alpha)
        return drawn, color_map.decode(mask), legend_html(mask, spec.classes, color_map), str(png)

    # -- export ---------------------------------------------------------------------------------

    def export_output(self, info: dict[str, Any], argmax: bool, where: str) -> str:
        return "classes" if argmax else "logits"

    def summary(self, info: dict[str, Any]) -> str:
        return f"segmentation ({len(self.targets(info).classes)} classes)"

    export_outputs = {"logits": "logits", "classes": "class indices"}  # what a file outputs, in words
    export_measure = "argmax agreement"
    export_quantity = "logit"

    def agreement(self, actual: torch.Tensor, expected: torch.Tensor) -> float:
        """Share of pixels with the same predicted class."""
        return (predicted_classes(actual, 1) == predicted_classes(expected, 1)).float().mean().item()


def refuse_query_flags(args: argparse.Namespace, fix: str) -> None:
    """EoMT's flags on a model without queries: refused with the fix."""
    for flag, value in (("--queries", args.queries), ("--query-blocks", args.query_blocks)):
        if value is not None:
            raise ValueError(f"{flag} sets EoMT's queries; this model has none: {fix}")
    if args.no_masked_attention:
        raise ValueError(f"--no-masked-attention is EoMT's; this model has no queries: {fix}")


def eomt_segmentation(
    args: argparse.Namespace, spec: DatasetSpec, backbone: BackboneChoice, resumed: dict[str, Any] | None
) -> SemanticEomt:
    """--head eomt: EoMT's queries read as per-pixel classes, from a released EoMT file with --head-weights."""
    arch = resumed or {}
    model = SemanticEomt(
        len(spec.classes),
        queries=arch.get("queries", args.queries or QUERIES),
        query_blocks=arch.get("query_blocks", args.query_blocks or QUERY_BLOCKS),
        masked_attention=arch.get("masked_attention", not args.no_masked_attention),
        fine_tune=args.fine_tune,
        normalization=arch.get("normalization"),
        **backbone.kwargs(),
    )
    if args.head_weights and resumed is None:
        print(f"Started from {args.head_weights}: " + load_released_eomt(model, args.head_weights, model.spec.family))
    return model


def load_released_head(
    model: DenseModel, args: argparse.Namespace, spec: DatasetSpec, backbone: BackboneChoice
) -> None:
    """Initialise the head from Meta's released one (dinokit/backbones/released_heads.py): same blocks, same classes."""
    head, _ = read_checked_head(args.head_weights, backbone.name, False, args.head_layers)
    classes = head["classifier.weight"].shape[0]
    if classes != len(spec.classes):
        raise ValueError(
            f"--head-weights {args.head_weights}: the head predicts {classes} classes but {spec.source} has "
            f"{len(spec.classes)}; it can only start a run on data with its classes, in its order"
        )
    model.head.load_state_dict(head, strict=False)  # num_batches_tracked is optional
    print(
        f"Head initialised from {args.head_weights} ({classes} classes, {args.head_layers} block(s), centred padding)"
    )


def legend_html(mask: np.ndarray, classes: list[str], color_map: ColorMap) -> str:
    """The classes present, largest first: colour swatch, name, share of the image."""
    rows = "".join(
        f'<tr><td><span style="display:inline-block;width:1em;height:1em;border:1px solid #888;'
        f'background:rgb{tuple(int(v) for v in color_map.colors[index])}"></span></td>'
        f"<td>{html.escape(classes[index])}</td><td style='text-align:right'>{100 * share:.1f} %</td></tr>"
        for index, share in class_shares(mask, len(classes))
    )
    return f'<table class="legend"><tr><th></th><th>class</th><th>share of the image</th></tr>{rows}</table>'
