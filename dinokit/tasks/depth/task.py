"""Depth as a task: a depth head (Meta's linear bins, or DPT for its released heads) on the backbone's
blocks with their class tokens, trained with SigLoss on RGB-D folders, scored with the depth errors
papers report, predicted in metres and drawn in colour on one scale."""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datasets import OriginalPairs, PairedDataset
from dinokit.backbones.choice import BackboneChoice
from dinokit.data.augmentations import CROPPED_RECIPES
from dinokit.data.file_kinds import FileKindError, read_torch_file, torch_contents
from dinokit.errors import UserError
from dinokit.tasks.depth.data import build_depth_datasets, truth_pairs
from dinokit.tasks.depth.files import DepthSpec, check_depth_pairs, list_depth_files, load_depth_spec
from dinokit.tasks.depth.heads import DEPTH_HEADS, BinsHead, DPTHead
from dinokit.tasks.depth.maps import PANEL_WIDTH, colorize, depth_png, with_colour_bar, write_depth_outputs
from dinokit.tasks.depth.released import depth_taps, is_depth_head_name, read_depth_head
from dinokit.tasks.depth.scoring import DepthEvaluator, DepthScoring, report_lines
from dinokit.tasks.registry import register_task
from dinokit.tasks.task import Best, OutputOptions, Task
from model import DenseModel, Taps
from model_config import get_backbone_spec

EXPORT_TOLERANCE = 1e-3  # an exported depth pixel agrees when within 0.1 % of PyTorch's metres


@dataclass(frozen=True)
class DepthRange:
    """What a depth model's outputs mean: metres, clamped to its range; for a model trained here, how
    its training files were read (depth.json's scale and evaluation crop; None for Meta's heads and
    for checkpoints from before they were recorded)."""

    min_depth: float
    max_depth: float
    depth_scale: float | None = None
    eval_crop: str | None = None

    @property
    def scale(self) -> tuple[float, float]:
        """The colour scale of its drawings, in metres."""
        return self.min_depth, self.max_depth


def depth_model(
    *,
    head: str = "linear",
    taps: list[int],
    min_depth: float,
    max_depth: float,
    batch_norm: bool = False,
    padding: str = "center",
    **backbone: Any,
) -> DenseModel:
    """Metric depth `[B, 1, H, W]` from a backbone's blocks `taps` and a depth head
    (dinokit/tasks/depth/heads.py): tokens without the final norm, each block's class token beside
    its patch tokens, as Meta's depth heads read them; the output clamped to the head's range and
    fitted to the image with `padding` (Meta's heads: centred). Meta's heads run on a frozen
    backbone; a head trained here (`batch_norm=True`, train.py --task depth) may fine-tune it."""
    spec = get_backbone_spec(backbone.get("backbone", "small"), backbone.get("registers", False))
    if head not in DEPTH_HEADS or spec.is_convnext:
        raise UserError(f"a {head!r} depth head on {spec.hub_name} is not supported (ViT backbones only)")
    if head == "dpt":
        module = functools.partial(DPTHead, spec.embed_dim, min_depth=min_depth, max_depth=max_depth)
    else:
        width = 2 * spec.embed_dim * len(taps)
        module = functools.partial(BinsHead, width, min_depth=min_depth, max_depth=max_depth, batch_norm=batch_norm)
    arch = {
        "head": head,
        "taps": list(taps),
        "min_depth": float(min_depth),
        "max_depth": float(max_depth),
        "batch_norm": batch_norm,
    }
    return DenseModel(module, Taps(tuple(taps), norm=False, class_token=True), arch, padding=padding, **backbone)


@register_task
class DepthTask(Task):
    name = "depth"
    help = (
        "a depth head on an RGB-D folder ({train,valid}_images/ + {train,valid}_depth/ + depth.json; "
        "docs/depth.md), SigLoss, best checkpoint on RMSE"
    )
    data_layout = "{train,valid}_{images,depth}/ + depth.json"
    best = Best("rmse", "RMSE", min)
    curves = (
        ("loss", "Loss (SigLoss)", "loss.png"),
        ("rmse", "RMSE (m)", "rmse.png"),
        ("abs_rel", "AbsRel", "abs_rel.png"),
        ("delta1", "δ < 1.25", "delta1.png"),
    )
    target_dtype = torch.float32  # metres
    folder_prefix = "depth_"
    target_folder, target_noun = "depth", "depth map"

    # -- training -------------------------------------------------------------------------------

    def check_args(self, args: argparse.Namespace, backbone: BackboneChoice) -> None:
        """What a depth run cannot take, each refusal with its reason."""
        if args.recipe in CROPPED_RECIPES:
            raise ValueError(
                f"--recipe {args.recipe} with --task depth: its random rescale and crops change how near things "
                "look while their metres stay the same; depth trains with --recipe article (depth-safe augmentation)"
            )
        if args.head_weights:
            raise ValueError(
                "--head-weights with --task depth: Meta's depth heads run as released (infer_image.py / evaluate.py "
                "--head-weights nyu_linear4); a depth run trains a head of its own"
            )
        if args.classes:
            raise ValueError("--classes with --task depth: an RGB-D folder is described by its depth.json")
        if args.head_dropout:
            raise ValueError("--head-dropout applies to segmentation heads; a depth head has none")
        if backbone.spec.is_convnext:
            raise ValueError(f"--task depth on {args.backbone}: depth heads read ViT blocks with their class token")
        if args.head not in (None, "linear") or args.queries or args.query_blocks or args.no_masked_attention:
            raise ValueError(
                "--head / --queries / --query-blocks / --no-masked-attention are EoMT's: depth has its own heads"
            )

    def load_data(
        self, args: argparse.Namespace, imgsz: tuple[int, int], normalization: tuple
    ) -> tuple[PairedDataset, PairedDataset, DepthSpec]:
        """The two splits of an RGB-D folder (every depth file read and checked) and its depth.json."""
        started = time.perf_counter()
        train_set, valid_set, spec, valid_pixels = build_depth_datasets(
            args.data_dir, imgsz, seed=args.seed, normalization=normalization
        )
        crop = f", evaluation crop {spec.eval_crop}" if spec.eval_crop else ""
        print(
            f"Depth from {spec.source}: {spec.min_depth:g}-{spec.max_depth:g} m, PNG units per metre "
            f"{spec.depth_scale:g}{crop}"
        )
        print(
            f"Checked {len(train_set) + len(valid_set)} image/depth pairs in {time.perf_counter() - started:.1f} s; "
            "valid depth pixels: " + ", ".join(f"{split} {count:,}" for split, count in valid_pixels.items())
        )
        return train_set, valid_set, spec

    def build_model(
        self, args: argparse.Namespace, spec: DepthSpec, backbone: BackboneChoice, resumed: dict[str, Any] | None
    ) -> DenseModel:
        """Meta's linear depth head over the backbone's blocks, with BatchNorm, centred padding."""
        return depth_model(
            head="linear",
            taps=depth_taps(backbone.name, args.head_layers),
            min_depth=spec.min_depth,
            max_depth=spec.max_depth,
            fine_tune=args.fine_tune,
            batch_norm=True,
            normalization=resumed.get("normalization") if resumed is not None else None,
            **backbone.kwargs(),
        )

    def describe(self, model: DenseModel, spec: DepthSpec | None, imgsz: tuple[int, int], **extra: Any) -> dict:
        """The depth half of a `model_info` (checkpoint.describe_model adds the backbone's)."""
        described = {"min_depth": model.head.min_depth, "max_depth": model.head.max_depth}
        if spec is not None:  # how the training files were read: a resumed run must read them the same way
            described.update(depth_scale=spec.depth_scale, eval_crop=spec.eval_crop)
        return {**described, **extra}

    def scoring(self, spec: DepthSpec, args: argparse.Namespace) -> Callable[[], DepthScoring]:
        return functools.partial(DepthScoring, spec.min_depth, spec.max_depth, args.gradient_loss)

    def resume_fields(self, info: dict[str, Any], spec: DepthSpec) -> list[tuple[str, Any, Any]]:
        """What must not change on resume (older depth checkpoints did not record how their files were
        read: nothing to compare there)."""
        saved = self.targets(info)
        scale = spec.depth_scale if saved.depth_scale is None else saved.depth_scale
        crop = spec.eval_crop if saved.depth_scale is None else saved.eval_crop
        return [
            ("depth range", list(saved.scale), [spec.min_depth, spec.max_depth]),
            ("depth.json depth_scale", scale, spec.depth_scale),
            ("depth.json eval_crop", crop, spec.eval_crop),
        ]

    def check_resume(self, info: dict[str, Any], spec: DepthSpec, path: str) -> None:
        """Nothing beyond `resume_fields`."""

    def targets(self, info: dict[str, Any]) -> DepthRange:
        """What a model's outputs mean: metres in its range, and how its training files were read."""
        return DepthRange(info["min_depth"], info["max_depth"], info.get("depth_scale"), info.get("eval_crop"))

    def drawer(self, info: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """Depth in colour on the model's range (the image itself is not shown)."""
        scale = self.targets(info).scale
        return lambda image, depth: colorize(depth, scale)

    # -- rebuilding ---------------------------------------------------------------------------------

    def rebuild(self, info: dict[str, Any], **common: Any) -> DenseModel:
        arch = info["arch"]
        keys = ("head", "taps", "min_depth", "max_depth", "batch_norm")
        return depth_model(**common, **{key: arch[key] for key in keys})

    def claims_released_head(self, path_or_name: str | Path) -> bool:
        """Whether --head-weights names one of Meta's depth heads or holds one (by content)."""
        if not Path(path_or_name).is_file():
            return is_depth_head_name(str(path_or_name))
        try:
            value = read_torch_file(path_or_name, "depth head")
        except FileKindError:  # another kind of file: the segmentation path names it
            return False
        return torch_contents(value) == "depth head"

    def released_model(
        self, path_or_name: str | Path, *, backbone: str = "small", registers: bool = False, **kwargs: Any
    ) -> tuple[DenseModel, None, dict[str, Any]]:
        """Meta's depth head on its backbone, as dinov2/hub/depthers.py builds it
        (dinokit/tasks/depth/released.py), no dataset description, and the dataset it was trained on."""
        kwargs.pop("head_layers", None)  # the head file says which blocks it reads
        state, released = read_depth_head(path_or_name, backbone, registers)
        model = depth_model(
            head=released.head,
            taps=list(released.taps),
            min_depth=released.min_depth,
            max_depth=released.max_depth,
            backbone=backbone,
            registers=registers,
            padding="center",
            **kwargs,
        )
        missing, _ = model.head.load_state_dict(state, strict=False)  # extra tensors (none known) are ignored
        if missing:
            raise UserError(f"{path_or_name}: the head file lacks {', '.join(missing[:3])} (a damaged file?)")
        return model.eval(), None, {"dataset": released.dataset}

    # -- full-resolution evaluation -------------------------------------------------------------

    def list_targets(self, folder: Path) -> list[Path]:
        """Depth files: 16-bit PNG or .npy (dinokit/tasks/depth/files.py)."""
        return list_depth_files(folder)

    def evaluation_data(
        self, info: dict[str, Any], data_dir: str | Path, pairs: list[tuple[Path, Path]], label: str
    ) -> DepthSpec:
        """The folder's depth.json (scale, range, evaluation crop), every depth file checked."""
        spec = load_depth_spec(data_dir)
        check_depth_pairs(pairs, spec, label)
        return spec

    def describe_data(self, spec: DepthSpec) -> str:
        return f"{spec.min_depth:g}-{spec.max_depth:g} m, crop {spec.eval_crop}"

    def truth(self, pairs: list[tuple[Path, Path]], info: dict[str, Any], spec: DepthSpec) -> OriginalPairs:
        return truth_pairs(pairs, spec)

    def evaluator(self, info: dict[str, Any], spec: DepthSpec, article_batch: int = 2) -> DepthEvaluator:
        return DepthEvaluator(spec)

    def report_lines(self, evaluation: Any, info: dict[str, Any]) -> list[str]:
        return report_lines(evaluation.result, evaluation.ms_per_image)

    def report_json(self, evaluation: Any, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {**extra, **evaluation.result, "ms_per_image": evaluation.ms_per_image}

    def headline(self, evaluation: Any) -> str:
        return f"RMSE {evaluation.result['rmse']:.3f} m"

    # -- prediction -----------------------------------------------------------------------------

    def reduce(self, outputs: torch.Tensor, size: tuple[int, int], info: dict[str, Any]) -> list[np.ndarray]:
        """Metres at the image's size."""
        return list(F.interpolate(outputs, size=size, mode="bilinear", align_corners=False)[:, 0].cpu().numpy())

    def from_scores(self, scores: torch.Tensor) -> np.ndarray:
        return scores[0].float().cpu().numpy()

    # -- outputs --------------------------------------------------------------------------------

    def colour_scale(self, info: dict[str, Any], options: OutputOptions) -> tuple[float, float]:
        """The metres of the colour scale: the option's, else the model's range."""
        return options.depth_range or self.targets(info).scale

    def image_writer(
        self, info: dict[str, Any], out_dir: Path, options: OutputOptions
    ) -> Callable[[Path, np.ndarray, np.ndarray], None]:
        """`<stem>_depth.png` (colours + bar), `<stem>_depth16.png` (mm), with save_npy `<stem>.npy` (m)."""
        scale = self.colour_scale(info, options)
        return lambda path, image, depth: write_depth_outputs(out_dir, path.stem, depth, scale, npy=options.save_npy)

    def frame_drawer(
        self, info: dict[str, Any], size: tuple[int, int], options: OutputOptions
    ) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], tuple[int, int]]:
        """Depth in colour on the clip's one scale with its bar, `PANEL_WIDTH` wider than the frame."""
        scale = self.colour_scale(info, options)
        return lambda image, depth: with_colour_bar(colorize(depth, scale), scale), (size[0] + PANEL_WIDTH, size[1])

    def demo_outputs(
        self, info: dict[str, Any], stem: str, image: np.ndarray, depth: np.ndarray, write: Callable, alpha: float
    ) -> tuple[Any, ...]:
        """The page's panes: the depth in colour with its bar (both image panes), a summary in metres,
        and the 16-bit millimetre PNG to download (`write(name, save)` gives its path)."""
        scale = self.targets(info).scale
        png = write(f"{stem}_depth16.png", lambda tmp: depth_png(depth).save(tmp, format="PNG"))
        coloured = with_colour_bar(colorize(depth, scale), scale)
        near, median, far = np.percentile(depth, [2, 50, 98])
        summary = (
            f"<p>depth (metres): nearest 2 % {near:.2f}, median {median:.2f}, farthest 2 % {far:.2f}; "
            f"colour scale {scale[0]:g}-{scale[1]:g} m</p>"
        )
        return coloured, coloured, summary, str(png)

    # -- export ---------------------------------------------------------------------------------

    def export_output(self, info: dict[str, Any], argmax: bool, where: str) -> str:
        if argmax:
            raise UserError(f"--argmax: {where} is a depth model (one channel of metres, no classes); drop --argmax")
        return "depth"

    def summary(self, info: dict[str, Any]) -> str:
        near, far = self.targets(info).scale
        return f"depth ({near:g}-{far:g} m)"

    export_outputs = {"depth": "depth in metres"}
    export_measure = f"within {100 * EXPORT_TOLERANCE:g} %"
    export_quantity = "depth (m)"

    def agreement(self, actual: torch.Tensor, expected: torch.Tensor) -> float:
        """Share of pixels within EXPORT_TOLERANCE of PyTorch's metres."""
        return ((actual - expected).abs() <= EXPORT_TOLERANCE * expected.abs()).float().mean().item()
