"""One vector per image for retrieval, from the stored embeddings (dinokit/classification/embeddings.py).

- `cls`: the last block's class token; `avgpool`: its mean patch token; `gem`: the GeM of its patch
  tokens; `cls+avgpool`: both concatenated, as classify.py's kNN reads them (so that retrieval's
  recall@1 over a training split is classify.py's 1-NN accuracy).
- several `scales`: the image embedded at each (sizes rounded to the patch size), the normalised
  descriptors averaged and normalised again — the multi-scale descriptor of image retrieval.

Every descriptor is L2-normalised: inner product = cosine similarity in the index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dinokit.classification.embeddings import (
    ClassificationTransform,
    backbone_normalization,
    build_backbone,
    extract_readable,
    identity_spec,
    stored_blocks,
)
from dinokit.retrieval.vector_index import normalised

DESCRIPTORS = ("cls", "avgpool", "cls+avgpool", "gem")


def descriptor(embeddings: dict[str, torch.Tensor], kind: str) -> np.ndarray:
    """`[N, D]` normalised descriptors of `kind` from one extraction's embeddings."""
    if kind not in DESCRIPTORS:
        raise ValueError(f"--features must be one of {DESCRIPTORS}, got {kind!r}")
    parts = {"cls": embeddings["cls"][:, -1], "avgpool": embeddings["avgpool"], "gem": embeddings["gem"]}
    return normalised(np.concatenate([parts[name].numpy() for name in kind.split("+")], axis=1))


def scale_sizes(imgsz: int, scales: list[float], patch_size: int) -> list[int]:
    """The crop side of each scale, a multiple of the patch size (at least one patch)."""
    return [max(patch_size, round(imgsz * scale / patch_size) * patch_size) for scale in scales]


def averaged(per_scale: list[np.ndarray]) -> np.ndarray:
    """The multi-scale descriptor: the mean of the normalised per-scale descriptors, normalised."""
    return normalised(np.mean(per_scale, axis=0))


def embed_files(
    key: dict[str, Any],
    files: list[Path],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    batch: int = 32,
    workers: int = 0,
    backbone: nn.Module | None = None,
) -> tuple[np.ndarray, list[int], list[tuple[Path, str]]]:
    """Descriptors of the readable `files` as an index's `key` makes them (backbone, size, crop,
    descriptor, scales): normalised rows, their positions in `files`, and (file, why) of the
    unreadable ones. `amp_dtype`: the autocast dtype utils.select_precision chose (None: fp32)."""
    identity = key["backbone"]
    backbone = backbone or build_backbone(identity, device)
    per_scale, kept, failures = [], list(range(len(files))), []
    for size in scale_sizes(key["imgsz"], key["scales"], identity_spec(identity).patch_size):
        transform = ClassificationTransform(size, key["crop_pct"], *backbone_normalization(identity))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            embeddings, kept, failures = extract_readable(
                backbone,
                files,
                transform,
                device=device,
                batch_size=batch,
                workers=workers,
                desc=f"Embeddings at {size}",
                blocks=stored_blocks(identity),
                skip_unreadable=True,
            )
        per_scale.append(descriptor(embeddings, key["features"]))
    return averaged(per_scale), kept, failures
