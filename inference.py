"""The one prediction path: an RGB image of any size -> class scores at that size.

Used by evaluate.py, train.py's final evaluation, infer_image.py, infer_video.py, bench.py and the
notebook. `InferenceMode` says how:

- `whole`: one forward of the image resized to `imgsz` (by default the training size; None: the
  image's own size), logits upsampled to the original size;
- `slide` (the DINOv2/mmsegmentation evaluation protocol): the short side resized to
  `short_side`, `crop`-sized windows every `stride` pixels, overlapping logits averaged, the
  result upsampled to the original size;
- `scales` x `flip`: test-time augmentation with either mode, the softmax probabilities of every
  pass averaged at the original size (the DINOv2 paper's "+ms" evaluation).

Every pass produces logits at its own input size and is resized to the original size once, so a
single window covering the whole image is exactly `whole` at that size.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import build_model_from_checkpoint, load_checkpoint
from cli import UserError, add_backbone_args, add_device_args, at_least, backbone_kwargs, positive, unit_interval
from datasets import check_imgsz, eval_transform, round_to_patch
from deployment import OnnxNetwork
from file_kinds import sniff
from heads import model_with_head
from labels import ColorMap
from metrics import predicted_classes
from model import HEAD_LAYERS
from model_config import PATCH_SIZE
from runtime import autocast, select_device, select_precision

MODES = ("whole", "slide")


@dataclass(frozen=True)
class InferenceMode:
    """How a prediction is made (see the module docstring)."""

    mode: str = "whole"
    imgsz: tuple[int, int] | None = None  # whole: (W, H) every image is resized to (Predictor: the training size)
    native: bool = False  # whole: each image at its own size instead
    short_side: int = 512  # slide: the short side is resized to this
    crop: int = 518  # slide: window side
    stride: int = 341  # slide: window step
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode}: choose one of {', '.join(MODES)}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"--scales must be positive numbers, got {list(self.scales)}")
        if self.mode == "slide" and not 0 < self.stride <= self.crop:
            raise ValueError(f"--stride {self.stride} must be in [1, --crop {self.crop}] (windows must overlap or touch)")
        if self.mode == "slide" and min(self.crop, self.short_side) < PATCH_SIZE:
            raise ValueError(f"--crop and --short-side must be at least the patch size {PATCH_SIZE}")

    @property
    def passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def describe(self) -> str:
        if self.mode == "whole":
            base = "whole at each image's own size" if self.native or not self.imgsz else f"whole at {self.imgsz[0]}x{self.imgsz[1]}"
        else:
            base = f"slide (short side {self.short_side}, crop {self.crop}, stride {self.stride})"
        tta = f", scales {' '.join(f'{s:g}' for s in self.scales)}" if self.scales != (1.0,) else ""
        return base + tta + (", + flip" if self.flip else "")

    def tag(self) -> str:
        """The mode in a file name: whole-644x644, whole-native, slide-512-518-341, + _ms0.75-1-1.25, + _flip."""
        if self.mode == "whole":
            base = "whole-native" if self.native or not self.imgsz else f"whole-{self.imgsz[0]}x{self.imgsz[1]}"
        else:
            base = f"slide-{self.short_side}-{self.crop}-{self.stride}"
        scales = f"_ms{'-'.join(f'{s:g}' for s in self.scales)}" if self.scales != (1.0,) else ""
        return base + scales + ("_flip" if self.flip else "")

    def pass_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """(height, width) the image is resized to for one pass at `scale`."""
        if self.mode == "slide":
            factor = self.short_side * scale / min(height, width)
        elif self.imgsz is not None and not self.native:
            return max(PATCH_SIZE, round(self.imgsz[1] * scale)), max(PATCH_SIZE, round(self.imgsz[0] * scale))
        else:
            factor = scale
        return max(PATCH_SIZE, round(height * factor)), max(PATCH_SIZE, round(width * factor))


def window_grid(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of the sliding windows; the last row/column is flush with the edge,
    and an image smaller than a window is one window of its own size (as in mmsegmentation)."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            top, left = min(row * stride, max(height - crop, 0)), min(col * stride, max(width - crop, 0))
            windows.append((top, min(top + crop, height), left, min(left + crop, width)))
    return windows


def slide_logits(model: torch.nn.Module, images: torch.Tensor, crop: int, stride: int, batch: int = 4) -> torch.Tensor:
    """Logits of `images` [1, 3, H, W] from overlapping windows, averaged where they overlap."""
    height, width = images.shape[-2:]
    windows = window_grid(height, width, crop, stride)
    total, count = None, images.new_zeros((1, 1, height, width))
    for start in range(0, len(windows), batch):  # windows of one image share a size: batch them
        group = windows[start: start + batch]
        logits = model(torch.cat([images[..., t:b, l:r] for t, b, l, r in group]))
        if total is None:
            total = images.new_zeros((1, logits.shape[1], height, width), dtype=logits.dtype)
        for (top, bottom, left, right), window in zip(group, logits):
            total[0, :, top:bottom, left:right] += window
            count[..., top:bottom, left:right] += 1
    return total / count


def segment(model: torch.nn.Module, image: np.ndarray, mode: InferenceMode, *, mean: Sequence[float],
            std: Sequence[float], device: torch.device, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`[num_classes, H, W]` scores for an RGB uint8 image: logits for a single pass, else the mean
    softmax probability of all passes (either way, argmax is the prediction)."""
    height, width = image.shape[:2]
    total = None
    for scale in mode.scales:
        size = mode.pass_size(height, width, scale)
        images = preprocess(image, size, mean, std).to(device)
        for flipped in (False, True) if mode.flip else (False,):
            inputs = images.flip(-1) if flipped else images
            with autocast(device, amp_dtype):
                logits = model(inputs) if mode.mode == "whole" else slide_logits(model, inputs, mode.crop, mode.stride)
            logits = logits.float().flip(-1) if flipped else logits.float()
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]
            if mode.passes == 1:
                return logits
            probabilities = logits.softmax(0)
            total = probabilities if total is None else total.add_(probabilities)
    return total / mode.passes


def preprocess(image: np.ndarray, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB uint8 image resized to `size` (H, W) and normalised, as validation does: `[1, 3, H, W]`."""
    normalised = eval_transform((size[1], size[0]), mean, std)(image=image)["image"]
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1))).unsqueeze(0)


class Predictor:
    """A model with what interpreting it needs (classes, colours, normalisation) and an `InferenceMode`."""

    def __init__(self, model: torch.nn.Module, info: dict[str, Any], *, device: torch.device,
                 amp_dtype: torch.dtype | None = None, mode: InferenceMode | None = None):
        self.model, self.info, self.device, self.amp_dtype = model, info, device, amp_dtype
        self.classes: list[str] = info["classes"]
        self.color_map = ColorMap(info["colors"], info["ignore_colors"], info["ignore_index"], shared_colors=True)
        self.mask_format: str = info.get("mask_format", "auto")  # how the training masks were read
        mode = mode or InferenceMode()
        if mode.imgsz is None:
            mode = replace(mode, imgsz=round_to_patch(info["imgsz"]))  # default: the training size
        self.mode = mode

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", amp: str = "auto",
                        mode: InferenceMode | None = None) -> "Predictor":
        """Rebuild the model from a checkpoint alone (classes, colours, size and normalisation travel in it)."""
        device = select_device(device)
        checkpoint = load_checkpoint(path, map_location="cpu")
        model = build_model_from_checkpoint(checkpoint, device)
        return cls(model, checkpoint["model_info"], device=device, amp_dtype=select_precision(device, amp), mode=mode)

    @classmethod
    def from_head(cls, path_or_name: str | Path, device: str = "auto", amp: str = "auto", mode: InferenceMode | None = None,
                  *, head_layers: int | None = None, **backbone: Any) -> "Predictor":
        """Meta's released head (a name such as voc2012_ms, or a file) on a DINOv2 backbone built from
        `backbone` (Dinov2Segmentation's keywords: backbone, registers, source, weights, ...)."""
        device = select_device(device)
        model, info = model_with_head(path_or_name, head_layers=head_layers, **backbone)
        return cls(model.to(device), info, device=device, amp_dtype=select_precision(device, amp), mode=mode)

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "auto", mode: InferenceMode | None = None) -> "Predictor":
        """A file written by export.py, run by onnxruntime (classes, colours, size and normalisation
        travel in its metadata). Pre- and post-processing are this class's own, as for a checkpoint."""
        network = OnnxNetwork(path, device=device)
        if network.static_size is not None:  # exported with --no-dynamic: the one size it takes
            size, mode = tuple(reversed(network.static_size)), mode or InferenceMode()
            if mode.mode != "whole" or mode.native or mode.scales != (1.0,) or mode.imgsz not in (None, size):
                raise UserError(f"{path}: exported for {size[0]}x{size[1]} inputs only: it runs with --mode whole at that "
                                "size (no --imgsz, --native, --scales); export with --dynamic for the others")
            mode = replace(mode, imgsz=size)
        return cls(network, network.info, device=torch.device("cpu"), mode=mode)

    def with_mode(self, mode: InferenceMode) -> "Predictor":
        """The same network (shared, not copied) predicting in another mode."""
        return Predictor(self.model, self.info, device=self.device, amp_dtype=self.amp_dtype, mode=mode)

    @property
    def engine(self) -> str:
        """What runs the network, for reports: "PyTorch on cuda (bfloat16)", "onnxruntime CPU (int8)"."""
        if isinstance(self.model, OnnxNetwork):
            return f"onnxruntime {self.model.provider.removesuffix('ExecutionProvider')} ({self.info['precision']})"
        precision = str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else "float32"
        return f"PyTorch on {self.device} ({precision})"

    @property
    def imgsz(self) -> tuple[int, int]:
        return self.mode.imgsz

    @torch.inference_mode()
    def scores(self, image: np.ndarray) -> torch.Tensor:
        """`[num_classes, H, W]` scores at the image's own size (see `segment`)."""
        self.model.eval()
        return segment(self.model, image, self.mode, mean=self.info["mean"], std=self.info["std"],
                       device=self.device, amp_dtype=self.amp_dtype)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class indices (uint8) of an RGB uint8 image, at its own size."""
        return predicted_classes(self.scores(image), 0).to(torch.uint8).cpu().numpy()


def add_mode_args(parser: argparse.ArgumentParser, flag: str = "--mode", sizes: bool = True,
                  default: str | None = "whole") -> None:
    """The flags that choose an `InferenceMode`. train.py names the first one --eval-mode, leaves
    its default to the recipe and has no --imgsz/--native here: its final evaluation predicts at
    the training size."""
    group = parser.add_argument_group("inference mode")
    group.add_argument(flag, dest="mode", default=default, choices=MODES,
                       help="whole: one forward per image; slide: sliding windows (the paper's evaluation protocol)")
    if sizes:
        group.add_argument("--imgsz", type=int, nargs=2, default=None, metavar=("W", "H"),
                           help="whole: the size images are resized to (default: the size the model was trained at)")
        group.add_argument("--native", action="store_true",
                           help="whole: one forward at each image's own size (rounded up to 14)")
    group.add_argument("--short-side", type=int, default=512, help="slide: resize the short side to this (default 512)")
    group.add_argument("--crop", type=int, default=518, help="slide: window side (default 518)")
    group.add_argument("--stride", type=at_least(1), default=341, help="slide: window step (default 341)")
    group.add_argument("--scales", type=positive, nargs="+", default=[1.0], metavar="S",
                       help="test-time scales, e.g. 0.75 1.0 1.25 (softmax-averaged)")
    group.add_argument("--flip", action="store_true", help="test-time horizontal flip (softmax-averaged)")


def mode_from_args(args: argparse.Namespace, *, sizes: bool = True) -> InferenceMode:
    """The `add_mode_args` flags as an `InferenceMode` (with `sizes=False`: whole mode at the training size)."""
    imgsz, native = (args.imgsz, args.native) if sizes else (None, False)
    if imgsz is not None:
        check_imgsz(imgsz)
        if native:
            raise ValueError("--imgsz and --native exclude each other")
        imgsz = tuple(round_to_patch(imgsz))
    return InferenceMode(args.mode, imgsz, native, args.short_side, args.crop, args.stride, tuple(args.scales), args.flip)


def add_model_args(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """Where the model comes from: a checkpoint of ours (with `several`, --model may be repeated:
    a list), or Meta's released head on a backbone."""
    parser.add_argument("--model", default=None, action="append" if several else "store",
                        help="checkpoint written by train.py, e.g. best_model_iou.pth, or a model.onnx written by export.py "
                             "(run by onnxruntime)" + ("; repeat to offer several" if several else ""))
    parser.add_argument("--head-weights", default=None, metavar="NAME|FILE",
                        help="instead of --model: Meta's released head, voc2012_linear, voc2012_ms, ade20k_linear, "
                             "ade20k_ms (downloaded once into the torch.hub cache) or such a file; with the backbone flags")
    parser.add_argument("--head-layers", type=int, default=None, choices=HEAD_LAYERS,
                        help="with --head-weights: check the head reads this many blocks (default: what the file says)")
    add_backbone_args(parser)


def load_predictor(args: argparse.Namespace, device: str | None = None, mode: InferenceMode | None = None) -> Predictor:
    """The `add_model_args` flags as a `Predictor`."""
    if (args.model is None) == (args.head_weights is None):
        raise ValueError("give --model CKPT (a model trained here) or --head-weights NAME|FILE (Meta's released head)")
    mode = mode or mode_from_args(args)
    if args.model is not None and Path(args.model).is_file() and sniff(args.model) == "onnx":  # by content, not name
        return Predictor.from_onnx(args.model, args.device, mode)  # onnxruntime picks from --device itself
    if args.model is not None:
        return Predictor.from_checkpoint(args.model, device or args.device, args.amp, mode)
    return Predictor.from_head(args.head_weights, device or args.device, args.amp, mode, head_layers=args.head_layers,
                               **backbone_kwargs(args))


def add_inference_args(parser: argparse.ArgumentParser, default_out_dir: Path) -> None:
    """The flags infer_image.py and infer_video.py share."""
    add_model_args(parser)
    parser.add_argument("--out-dir", default=str(default_out_dir))
    add_device_args(parser)
    parser.add_argument("--alpha", type=unit_interval, default=0.5, help="opacity of the class colours in the overlay, 0..1")
    add_mode_args(parser)

