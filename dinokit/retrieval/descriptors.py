"""One vector per image for retrieval, from the stored embeddings (dinokit/classification/embeddings.py).

- `cls`: the last block's class token; `avgpool`: its mean patch token; `gem`: the GeM of its patch
  tokens; `cls+avgpool`: both concatenated, as classify.py's kNN reads them (so that retrieval's
  recall@1 over a training split is classify.py's 1-NN accuracy).
- several `scales`: the image embedded at each (sizes rounded to the patch size), the normalised
  descriptors averaged and normalised again — the multi-scale descriptor of image retrieval.

Every descriptor is L2-normalised: inner product = cosine similarity in the index.
"""

from __future__ import annotations

import numpy as np
import torch

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
