"""DINOv2 / DINOv3 image embeddings for classification: preprocessing, extraction and the cache.

Stored per image: the class token of each of the last four blocks and the average of the last
block's patch tokens, all after the final LayerNorm — the inputs of the DINOv2 paper's linear
probe (dinov2/eval/linear.py, `create_linear_input`). Registers / DINOv3's storage tokens are in
neither. A ConvNeXt has no class token: its normalised mean over positions stands in, for its last
stage only (its stages differ in width). `--features` and `--layers` only choose among them
(`linear_input`), so changing them never extracts again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import config
from dinokit.data.file_kinds import fingerprint_files
from dinokit.data.image_files import read_image
from dinokit.writing import atomic_write

STORED_BLOCKS = 4
FEATURES = ("cls", "cls+avgpool")
LAYERS = (1, 4)
CACHE_FORMAT = 1


class ClassificationTransform:
    """DINOv2's / timm's evaluation preprocessing: resize the short side to imgsz / crop_pct
    (bicubic, PIL; 224 / 0.875 = 256 as in dinov2/data/transforms.py), centre crop imgsz x imgsz
    (torchvision's rounding), scale to [0, 1], normalise with ImageNet mean/std."""

    def __init__(
        self,
        imgsz: int = 224,
        crop_pct: float = 0.875,
        mean: Sequence[float] = config.MEAN,
        std: Sequence[float] = config.STD,
    ):
        self.imgsz, self.crop_pct = imgsz, crop_pct
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        height, width = image.shape[:2]
        short = int(self.imgsz / self.crop_pct)
        # torchvision's Resize(int): the long side is int(short * long / short_side)
        size = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        resized = Image.fromarray(image).resize(size, Image.BICUBIC)
        left = int(round((size[0] - self.imgsz) / 2.0))
        top = int(round((size[1] - self.imgsz) / 2.0))
        cropped = np.asarray(resized.crop((left, top, left + self.imgsz, top + self.imgsz)))
        tensor = torch.from_numpy(cropped.copy()).permute(2, 0, 1).float().div_(255)
        return (tensor - self.mean) / self.std


class ImageFiles(Dataset):
    """Preprocessed images of a list of files (read with the project's reading rule, EXIF applied)."""

    def __init__(self, files: Sequence[Path], transform: ClassificationTransform):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(read_image(self.files[index]))


@torch.inference_mode()
def extract(
    backbone: nn.Module,
    files: Sequence[Path],
    transform: ClassificationTransform,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    desc: str = "Embeddings",
    blocks: int = STORED_BLOCKS,
) -> dict[str, torch.Tensor]:
    """{"cls": [N, blocks, C], "avgpool": [N, C]} float32 on the CPU, for `files` in order. Mixed
    precision is the caller's: run it under `utils.autocast`."""
    workers = min(workers, os.cpu_count() or 1, -(-len(files) // batch_size))  # no idle decoding processes
    loader = DataLoader(
        ImageFiles(files, transform), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    backbone.eval()
    class_tokens, averages = [], []
    for images in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        outputs = backbone.get_intermediate_layers(
            images.to(device, non_blocking=True), n=blocks, return_class_token=True, norm=True
        )
        class_tokens.append(torch.stack([cls for _, cls in outputs], dim=1).float().cpu())
        averages.append(outputs[-1][0].float().mean(dim=1).cpu())
    return {"cls": torch.cat(class_tokens), "avgpool": torch.cat(averages)}


def linear_input(embeddings: dict[str, torch.Tensor], features: str = "cls", layers: int = 1) -> torch.Tensor:
    """The classifier input: class tokens of the last `layers` blocks, concatenated in block order,
    then (cls+avgpool) the last block's mean patch token, as `create_linear_input` builds it."""
    if features not in FEATURES or layers not in LAYERS:
        raise ValueError(
            f"--features {features} --layers {layers}: choose --features {'/'.join(FEATURES)}, --layers 1 or 4"
        )
    if layers > embeddings["cls"].shape[1]:
        raise ValueError(f"--layers {layers}: the backbone gives one class token (a ConvNeXt's last stage); use 1")
    parts = [embeddings["cls"][:, -layers:].flatten(1)]
    if features == "cls+avgpool":
        parts.append(embeddings["avgpool"])
    return torch.cat(parts, dim=1)


def cache_key(backbone: dict[str, Any], transform: ClassificationTransform, files: Sequence[Path]) -> dict[str, Any]:
    """Everything the stored embeddings depend on (`backbone`: the builder's settings, see
    classify.backbone_identity)."""
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "imgsz": transform.imgsz,
        "crop_pct": transform.crop_pct,
        "files": fingerprint_files(files),
        "count": len(files),
    }


class EmbeddingCache:
    """One split's embeddings in `folder`/embeddings_<split>.pt, valid while its key matches."""

    def __init__(self, folder: Path, split: str):
        self.path = Path(folder) / f"embeddings_{split}.pt"

    def load(self, key: dict[str, Any]) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The stored embeddings if stored under `key`, else None; and why not."""
        if not self.path.is_file():
            return None, "no cache yet"
        try:
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:
            return None, f"{self.path.name} is unreadable"
        changed = [name for name in key if stored.get("key", {}).get(name) != key[name]]
        if changed:
            reasons = {
                "files": "the files changed",
                "count": "the files changed",
                "backbone": "another backbone",
                "imgsz": "another --imgsz",
                "crop_pct": "another --crop-pct",
                "format": "an older cache format",
            }
            return None, ", ".join(dict.fromkeys(reasons[name] for name in changed))
        return {"cls": stored["cls"], "avgpool": stored["avgpool"]}, "cached"

    def save(self, key: dict[str, Any], embeddings: dict[str, torch.Tensor]) -> None:
        atomic_write(self.path, lambda tmp: torch.save({"key": key, **embeddings}, tmp))
