"""Prediction and drawing shared by infer_image.py, infer_video.py and the notebook.

`Predictor` rebuilds a trained model from its checkpoint alone (classes, colours, image size and
normalisation travel inside it) and turns an RGB image of any size into a class-index mask of the
same size. The drawing helpers render that mask for people: a colour overlay, class names at their
regions, a legend, and an indexed PNG with the dataset's palette.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from checkpoint import build_model_from_checkpoint, load_checkpoint
from cli import UserError
from datasets import check_imgsz, eval_transform, round_to_patch
from labels import ColorMap
from runtime import AMP_CHOICES, autocast, select_device, select_precision

FONT = cv2.FONT_HERSHEY_SIMPLEX


class Predictor:
    """Image (RGB uint8, any size) -> class indices (uint8, same size), with a model from a checkpoint."""

    def __init__(self, checkpoint_path: str | Path, device: str = "auto", imgsz: Sequence[int] | None = None, amp: str = "auto"):
        self.device = select_device(device)
        self.amp_dtype = select_precision(self.device, amp)
        checkpoint = load_checkpoint(checkpoint_path, map_location="cpu")
        info = checkpoint["model_info"]
        self.model = build_model_from_checkpoint(checkpoint, self.device)
        self.classes: list[str] = info["classes"]
        self.color_map = ColorMap(info["colors"], info["ignore_colors"], info["ignore_index"])
        self.mask_format: str = info.get("mask_format", "auto")  # how the training masks were read
        self.imgsz = round_to_patch(imgsz or info["imgsz"], self.model.patch_size)
        self.transform = eval_transform(self.imgsz, info["mean"], info["std"])  # exactly as validation

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        normalised = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1))).unsqueeze(0).to(self.device)

    @torch.inference_mode()
    def logits(self, image: np.ndarray) -> torch.Tensor:
        """`[num_classes, H, W]` logits at the image's own size."""
        with autocast(self.device, self.amp_dtype):
            return self.model(self.preprocess(image), output_size=image.shape[:2])[0].float()

    def predict(self, image: np.ndarray) -> np.ndarray:
        return self.logits(image).argmax(0).to(torch.uint8).cpu().numpy()


def refuse_overwriting_inputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Outputs never replace an input file (an --out-dir that holds the inputs, a.jpg -> a.jpg)."""
    sources = {Path(p).resolve() for p in inputs}
    clash = next((out for out in outputs if Path(out).resolve() in sources), None)
    if clash is not None:
        raise UserError(f"{clash}: is an input and would be replaced by a result; choose another --out-dir")


def overlay(image: np.ndarray, mask: np.ndarray, color_map: ColorMap, alpha: float = 0.5) -> np.ndarray:
    """Blend the class colours into the image; classes coloured black (VOC background) stay unblended."""
    colors = color_map.decode(mask)
    blended = cv2.addWeighted(image, 1 - alpha, colors, alpha, 0)
    keep = ~colors.any(axis=-1)
    blended[keep] = image[keep]
    return blended


def draw_class_names(image: np.ndarray, mask: np.ndarray, classes: Sequence[str], min_fraction: float = 0.005,
                     skip: Sequence[int] = ()) -> np.ndarray:
    """Write each class's name at the most interior point of its region (regions < min_fraction and
    classes in `skip` left out)."""
    out = image.copy()
    scale = max(0.4, min(out.shape[:2]) / 900)
    for cls in np.unique(mask):
        if cls in skip or cls >= len(classes) or (mask == cls).mean() < min_fraction:
            continue
        region = np.pad((mask == cls).astype(np.uint8), 1)  # pad: the image edge counts as a border
        distance = cv2.distanceTransform(region, cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(distance.argmax(), distance.shape)
        text = classes[cls]
        (w, h), _ = cv2.getTextSize(text, FONT, scale, 1)
        origin = (int(np.clip(x - w // 2, 0, max(0, out.shape[1] - w))), int(np.clip(y + h // 2, h, out.shape[0] - 1)))
        cv2.putText(out, text, origin, FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, text, origin, FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def draw_legend(image: np.ndarray, mask: np.ndarray, classes: Sequence[str], color_map: ColorMap) -> np.ndarray:
    """A small top-left legend: a swatch and the name of each class present in the mask."""
    out = image.copy()
    present = [int(c) for c in np.unique(mask) if c < len(classes)]
    if not present:
        return out
    scale = max(0.35, min(out.shape[:2]) / 1200)
    line = int(22 * scale / 0.5)
    width = max(cv2.getTextSize(classes[c], FONT, scale, 1)[0][0] for c in present) + line + 12
    height = line * len(present) + 8
    panel = out[:height, :width]
    panel[:] = (panel * 0.4).astype(np.uint8)  # darken behind the legend for contrast
    for row, cls in enumerate(present):
        top = 4 + row * line
        color = tuple(int(v) for v in color_map.colors[cls])
        cv2.rectangle(out, (4, top + 2), (4 + line - 6, top + line - 4), color, thickness=-1)
        cv2.rectangle(out, (4, top + 2), (4 + line - 6, top + line - 4), (255, 255, 255), thickness=1)
        cv2.putText(out, classes[cls], (line + 4, top + line - 6), FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def render(image: np.ndarray, mask: np.ndarray, classes: Sequence[str], color_map: ColorMap, alpha: float = 0.5) -> np.ndarray:
    """Overlay + class names + legend: what infer_image.py and infer_video.py write."""
    drawn = overlay(image, mask, color_map, alpha)
    unblended = [i for i, color in enumerate(color_map.colors) if not color.any()]  # e.g. VOC background
    drawn = draw_class_names(drawn, mask, classes, skip=unblended)
    return draw_legend(drawn, mask, classes, color_map)


def indexed_png(mask: np.ndarray, color_map: ColorMap) -> Image.Image:
    """The raw prediction as a palette PNG: pixel value = class index, shown in the dataset's colours."""
    image = Image.fromarray(mask.astype(np.uint8))  # mode "L"; putpalette makes it "P"
    image.putpalette(color_map.decode(np.arange(256, dtype=np.uint8)).flatten().tolist())
    return image


def add_inference_args(parser: argparse.ArgumentParser, default_out_dir: Path) -> None:
    """The flags infer_image.py and infer_video.py share."""
    parser.add_argument("--model", required=True, help="checkpoint written by train.py, e.g. best_model_iou.pth")
    parser.add_argument("--out-dir", default=str(default_out_dir))
    parser.add_argument("--imgsz", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="prediction size (default: the size the model was trained at)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours in the overlay, 0..1")
    parser.add_argument("--amp", default="auto", choices=AMP_CHOICES, help="mixed precision: auto = bf16/fp16 on CUDA, off on CPU")


def check_inference_args(args: argparse.Namespace) -> None:
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.imgsz is not None:
        check_imgsz(args.imgsz)
