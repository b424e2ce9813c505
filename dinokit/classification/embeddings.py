"""DINOv2 / DINOv3 image embeddings for classification and retrieval: the backbone an identity
describes, preprocessing, extraction and the cache.

Stored per image: the class token of each of the last four blocks, the average of the last
block's patch tokens and their GeM (generalised mean, p = 3, of the activations clamped at 0 as
Radenović et al. define it for retrieval), all after the final LayerNorm — the inputs of the DINOv2 paper's linear
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
from dinokit.backbones.loading import load_backbone
from dinokit.backbones.weights_file import check_weights_unchanged
from dinokit.data.file_kinds import fingerprint_files
from dinokit.data.image_files import read_image
from dinokit.errors import UserError
from dinokit.writing import atomic_write
from model_config import BackboneSpec, get_backbone_spec

STORED_BLOCKS = 4
FEATURES = ("cls", "cls+avgpool")
LAYERS = (1, 4)
CACHE_FORMAT = 1
GEM_POWER = 3.0


def identity_spec(identity: dict[str, Any]) -> BackboneSpec:
    """The backbone an identity (cli.backbone_identity) names."""
    return get_backbone_spec(identity["backbone"], identity.get("registers", False))


def backbone_normalization(identity: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the backbone's weights expect (DINOv3's satellite weights have their own)."""
    return identity_spec(identity).normalization(identity.get("weights"))


def stored_blocks(identity: dict[str, Any]) -> int:
    """Class tokens kept per image: a ViT's last four blocks; a ConvNeXt's last stage."""
    return max(identity_spec(identity).head_layers())


def build_backbone(
    identity: dict[str, Any],
    device: torch.device,
    *,
    made: str = "the stored embeddings were made",
    fix: str = "re-embed with the weights you have now",
) -> nn.Module:
    """The frozen backbone `identity` describes (a random-init one drawn from its seed). A weights
    file recorded by content must still hold it: `made` and `fix` say in the refusal what the file
    made and how to make it again."""
    file = identity.get("weights_file") or {}
    if "sha256" in file:
        check_weights_unchanged(file, made, fix)
    kwargs = {k: identity[k] for k in ("registers", "source", "hub_dir", "weights", "pretrained")}
    if "seed" in identity:
        torch.manual_seed(identity["seed"])
    backbone = load_backbone(identity["backbone"], **kwargs).to(device).eval()
    return backbone.requires_grad_(False)


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
    """Preprocessed images of a list of files (read with the project's reading rule, EXIF applied),
    with their position; with `skip_unreadable` an unreadable file gives None and why instead."""

    def __init__(self, files: Sequence[Path], transform: ClassificationTransform, *, skip_unreadable: bool = False):
        self.files, self.transform, self.skip_unreadable = list(files), transform, skip_unreadable

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.transform(read_image(self.files[index])), ""
        except (UserError, OSError) as err:
            if not self.skip_unreadable:
                raise
            return index, None, str(err).splitlines()[0] if str(err) else type(err).__name__


def _readable_batch(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    """(positions, images) of the readable items of a batch, and (position, reason) of the others."""
    readable = [(index, image) for index, image, _ in items if image is not None]
    failed = [(index, reason) for index, image, reason in items if image is None]
    images = torch.stack([image for _, image in readable]) if readable else None
    return [index for index, _ in readable], images, failed


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
    """{"cls": [N, blocks, C], "avgpool": [N, C], "gem": [N, C]} float32 on the CPU, for `files` in
    order (an unreadable file is an error). Mixed precision is the caller's: run it under `utils.autocast`."""
    embeddings, _, _ = extract_readable(
        backbone, files, transform, device=device, batch_size=batch_size, workers=workers, desc=desc, blocks=blocks
    )
    return embeddings


@torch.inference_mode()
def extract_readable(
    backbone: nn.Module,
    files: Sequence[Path],
    transform: ClassificationTransform,
    *,
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    desc: str = "Embeddings",
    blocks: int = STORED_BLOCKS,
    skip_unreadable: bool = False,
) -> tuple[dict[str, torch.Tensor], list[int], list[tuple[Path, str]]]:
    """`extract`, and with `skip_unreadable` the files that cannot be read left out: (embeddings of
    the readable files, their positions in `files`, (file, why) of the others)."""
    workers = min(workers, os.cpu_count() or 1, -(-len(files) // batch_size))  # no idle decoding processes
    dataset = ImageFiles(files, transform, skip_unreadable=skip_unreadable)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_readable_batch,
        pin_memory=device.type == "cuda",
    )
    backbone.eval()
    parts: dict[str, list[torch.Tensor]] = {"cls": [], "avgpool": [], "gem": []}
    kept, failures = [], []
    for positions, images, failed in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        failures += [(Path(files[index]), reason) for index, reason in failed]
        if images is None:
            continue
        kept += positions
        outputs = backbone.get_intermediate_layers(
            images.to(device, non_blocking=True), n=blocks, return_class_token=True, norm=True
        )
        patches = outputs[-1][0].float()
        parts["cls"].append(torch.stack([cls for _, cls in outputs], dim=1).float().cpu())
        parts["avgpool"].append(patches.mean(dim=1).cpu())
        parts["gem"].append(patches.clamp(min=1e-6).pow(GEM_POWER).mean(dim=1).pow(1 / GEM_POWER).cpu())
    width = backbone.embed_dim
    empty = {"cls": torch.zeros(0, blocks, width), "avgpool": torch.zeros(0, width), "gem": torch.zeros(0, width)}
    embeddings = {name: torch.cat(values) if values else empty[name] for name, values in parts.items()}
    return embeddings, kept, failures


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
    cli.backbone_identity)."""
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
