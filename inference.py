"""The one prediction path: an RGB image of any size -> class scores at that size.

Used by evaluate.py, train.py's final evaluation, infer_image.py, infer_video.py, bench.py and the
notebook. `InferenceMode` says how:

- `whole`: one forward of the image resized to `imgsz` (by default the training size; None: the
  image's own size), logits upsampled to the original size;
- `slide` (the DINOv2/mmsegmentation evaluation protocol): the short side resized to
  `short_side`, `crop`-sized windows every `stride` pixels, overlapping logits averaged, the
  result upsampled to the original size;
- `scales` x `flip`: test-time augmentation with either mode, the softmax probabilities of every
  pass averaged at the original size (the DINOv2 paper's "+ms" evaluation); for a depth model the
  depths themselves are averaged.

Every task goes through the same path; its task object (dinokit/tasks/) says what the passes
average (segmentation: softmax probabilities; depth: the metres) and what a prediction is (class
indices; metres).

Every pass produces logits at its own input size and is resized to the original size once, so a
single window covering the whole image is exactly `whole` at that size.

`predict` and `predict_prepared` are the same path, one image or a batch: in the default mode (one
whole pass) an image is resized on the CPU (`prepare`, which DataLoader workers and reader threads
run), uploaded as uint8, normalised on the device, batched with images of its input size, and its
logits are upsampled and reduced to class indices there; only the uint8 mask comes back. One image
at a time, the masks are `predict_scores`'s bit for bit; a batch changes only the shapes the network's
matrix products run at (on this CPU the masks stay bit-identical, a depth model moves by ~2e-6 m:
tests, docs/inference.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import build_model_from_checkpoint, load_checkpoint, model_with_head
from cli import backbone_kwargs, mode_from_args
from dinokit.data.file_kinds import sniff
from dinokit.data.labels import ColorMap
from dinokit.data.resize import normalisation_table, normalise, preprocess, resize_image
from dinokit.errors import UserError
from dinokit.prediction.deployment import OnnxNetwork
from dinokit.prediction.modes import InferenceMode
from dinokit.runs.checkpoint_format import ModelDescription
from dinokit.tasks import get_task
from dinokit.tasks.task import Task
from utils import autocast, select_device, select_precision


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
        group = windows[start : start + batch]
        logits = model(torch.cat([images[..., top:bottom, left:right] for top, bottom, left, right in group]))
        if total is None:
            total = images.new_zeros((1, logits.shape[1], height, width), dtype=logits.dtype)
        for (top, bottom, left, right), window in zip(group, logits):
            total[0, :, top:bottom, left:right] += window
            count[..., top:bottom, left:right] += 1
    return total / count


def predict_scores(
    model: torch.nn.Module,
    image: np.ndarray,
    mode: InferenceMode,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    combine: Callable[[torch.Tensor], torch.Tensor] = lambda scores: scores.softmax(0),
) -> torch.Tensor:
    """`[C, H, W]` scores for an RGB uint8 image: the output of a single pass, else the mean of
    `combine` of every pass (a segmentation model: softmax probabilities, whose argmax is the
    prediction either way; a depth model: the metres themselves)."""
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
            combined = combine(logits)
            total = combined if total is None else total.add_(combined)
    return total / mode.passes


UPSAMPLED_VALUES = 1 << 28  # at most 1 GiB of float32 logits upsampled at once (a batch of 12 MP photos)


@dataclass(frozen=True)
class Prepared:
    """An image as `Predictor.predict_prepared` takes it: `pixels` resized for the network on the
    CPU, still uint8 (the image itself when the mode makes several passes); `size` its own (H, W)."""

    pixels: np.ndarray
    size: tuple[int, int]


def batchable(mode: InferenceMode) -> bool:
    """One whole-image pass: images can be resized ahead and batched (other modes go image by image)."""
    return mode.mode == "whole" and mode.passes == 1


def prepare(image: np.ndarray, mode: InferenceMode) -> Prepared:
    """The CPU half of a prediction (a function of the mode alone, so DataLoader workers can run it)."""
    size = image.shape[:2]
    if not batchable(mode):
        return Prepared(image, size)
    return Prepared(np.ascontiguousarray(resize_image(image, mode.pass_size(*size, 1.0))), size)


def runs(keys: Sequence, limit: int) -> Iterator[slice]:
    """Slices of consecutive equal `keys`, at most `limit` long: the images that go through the
    network (equal input shapes) or are upsampled (equal sizes) as one batch."""
    start = 0
    while start < len(keys):
        stop = start + 1
        while stop < len(keys) and stop - start < limit and keys[stop] == keys[start]:
            stop += 1
        yield slice(start, stop)
        start = stop


class Predictor:
    """A model with what interpreting it needs (classes, colours, normalisation) and an `InferenceMode`."""

    def __init__(
        self,
        model: torch.nn.Module,
        info: dict[str, Any],
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        mode: InferenceMode | None = None,
    ):
        self.description = ModelDescription.from_info(info)  # an ONNX file of an older checkpoint: migrated
        info = self.description.to_info()
        self.model, self.info, self.device, self.amp_dtype = model, info, device, amp_dtype
        self.task: Task = get_task(self.description.task)
        self.classes: list[str] = info.get("classes", [])
        self.color_map: ColorMap | None = self.task.color_map(info)
        mode = mode or InferenceMode()
        if mode.imgsz is None:
            mode = replace(mode, imgsz=self.description.imgsz)  # default: the training size
        self.mode = mode.for_patch(self.description.backbone.patch_size)
        self.task.check_mode(self.mode)
        self._table: torch.Tensor | None = None  # normalisation_table on the device, made on first use

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", amp: str = "auto", mode: InferenceMode | None = None
    ) -> Predictor:
        """Rebuild the model from a checkpoint alone (classes, colours, size and normalisation travel in it)."""
        device = select_device(device)
        checkpoint = load_checkpoint(path, map_location="cpu")
        model = build_model_from_checkpoint(checkpoint, device)
        return cls(model, checkpoint["model_info"], device=device, amp_dtype=select_precision(device, amp), mode=mode)

    @classmethod
    def from_head(
        cls,
        path_or_name: str | Path,
        device: str = "auto",
        amp: str = "auto",
        mode: InferenceMode | None = None,
        *,
        head_layers: int | None = None,
        **backbone: Any,
    ) -> Predictor:
        """Meta's released head (a name such as voc2012_ms or nyu_linear4, or a file) on a DINOv2 backbone built from
        `backbone` (model.DenseModel's keywords: backbone, registers, source, weights, ...)."""
        device = select_device(device)
        model, info = model_with_head(path_or_name, head_layers=head_layers, **backbone)
        return cls(model.to(device), info, device=device, amp_dtype=select_precision(device, amp), mode=mode)

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "auto", mode: InferenceMode | None = None) -> Predictor:
        """A file written by export.py, run by onnxruntime (classes, colours, size and normalisation
        travel in its metadata). Pre- and post-processing are this class's own, as for a checkpoint."""
        network = OnnxNetwork(path, device=device)
        if network.static_size is not None:  # exported with --no-dynamic: the one size it takes
            size, mode = tuple(reversed(network.static_size)), mode or InferenceMode()
            if mode.mode != "whole" or mode.native or mode.scales != (1.0,) or mode.imgsz not in (None, size):
                raise UserError(
                    f"{path}: exported for {size[0]}x{size[1]} inputs only: it runs with --mode whole at that "
                    "size (no --imgsz, --native, --scales); export with --dynamic for the others"
                )
            mode = replace(mode, imgsz=size)
        return cls(network, network.info, device=torch.device("cpu"), mode=mode)

    def with_mode(self, mode: InferenceMode) -> Predictor:
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
        """`[C, H, W]` scores at the image's own size (see `predict_scores`)."""
        self.model.eval()
        return predict_scores(
            self.model,
            image,
            self.mode,
            mean=self.description.mean,
            std=self.description.std,
            device=self.device,
            amp_dtype=self.amp_dtype,
            combine=self.task.combine_passes,
        )

    def prepare(self, image: np.ndarray) -> Prepared:
        """The CPU half of `predict` (see `prepare`)."""
        return prepare(image, self.mode)

    @property
    def max_batch(self) -> int:
        """Images one forward may take: 1 for an ONNX file exported with a fixed shape."""
        return 1 if getattr(self.model, "static_size", None) is not None else 1 << 30

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class indices (uint8) of an RGB uint8 image, at its own size; a depth model: metres (float32)."""
        return self.predict_prepared([self.prepare(image)])[0]

    @torch.inference_mode()
    def predict_prepared(self, batch: Sequence[Prepared]) -> list[np.ndarray]:
        """`predict` of each prepared image, images of one input size through the network together."""
        if not batchable(self.mode):
            return [self.from_scores(self.scores(item.pixels)) for item in batch]
        self.model.eval()
        predictions: list[np.ndarray] = []
        for group in runs([item.pixels.shape for item in batch], self.max_batch):
            predictions += self.reduced(self.logits([item.pixels for item in batch[group]]), batch[group])
        return predictions

    def logits(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """Float32 logits `[B, C, h, w]` of resized uint8 images of one shape, normalised on the device."""
        images = torch.from_numpy(np.stack(pixels))
        if self.device.type == "cuda":
            images = images.pin_memory()
        if self._table is None:
            self._table = normalisation_table(self.description.mean, self.description.std).to(self.device)
        inputs = normalise(images.to(self.device, non_blocking=True), self._table)
        with autocast(self.device, self.amp_dtype):
            outputs = self.model(inputs)
        if isinstance(outputs, tuple):  # an exported file's several outputs
            outputs = self.task.from_exported(outputs, tuple(inputs.shape[-2:]), self.description.backbone.patch_size)
        return outputs.float()

    def reduced(self, logits: torch.Tensor, batch: Sequence[Prepared]) -> list[np.ndarray]:
        """Logits upsampled to each image's size and reduced there (class indices, or metres)."""
        predictions = []
        largest = max(height * width for height, width in (item.size for item in batch))
        per_group = max(1, UPSAMPLED_VALUES // (logits.shape[1] * largest))  # bounded memory for large photos
        for group in runs([item.size for item in batch], per_group):
            predictions += self.task.reduce(logits[group], batch[group][0].size, self.info)
        return predictions

    def from_scores(self, scores: torch.Tensor) -> np.ndarray:
        """`predict_scores`'s scores as `predict` returns them."""
        return self.task.from_scores(scores)


def load_predictor(args: argparse.Namespace, device: str | None = None, mode: InferenceMode | None = None) -> Predictor:
    """The `add_model_args` flags as a `Predictor`."""
    if (args.model is None) == (args.head_weights is None):
        raise ValueError("give --model CKPT (a model trained here) or --head-weights NAME|FILE (Meta's released head)")
    mode = mode or mode_from_args(args)
    if args.model is not None and Path(args.model).is_file() and sniff(args.model) == "onnx":  # by content, not name
        predictor = Predictor.from_onnx(args.model, args.device, mode)  # onnxruntime picks from --device itself
    elif args.model is not None:
        predictor = Predictor.from_checkpoint(args.model, device or args.device, args.amp, mode)
    else:
        predictor = Predictor.from_head(
            args.head_weights,
            device or args.device,
            args.amp,
            mode,
            head_layers=args.head_layers,
            **backbone_kwargs(args),
        )
    warn_if_slow(predictor)
    return predictor


def warn_if_slow(predictor: Predictor) -> None:
    """Say before the work that a many-pass mode on a CPU takes tens of seconds per image (the
    README's slide + 3 scales + flip: 27 s per VOC image with ViT-S on the 2-core development CPU)."""
    mode = predictor.mode
    if predictor.device.type != "cpu" or (mode.mode == "whole" and mode.passes == 1):
        return
    windows = " x the sliding windows of each scale" if mode.mode == "slide" else ""
    print(
        f"note: {mode.describe()}: {mode.passes} forward pass(es) per image{windows}, on the CPU: expect seconds to "
        "tens of seconds per image (a GPU, or --mode whole without --scales/--flip, is much faster)"
    )
