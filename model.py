"""The model every dense task trains: a DINOv2 or DINOv3 backbone (dinokit/backbones/loading.py), the
tokens of its tapped blocks, and a task's head (dinokit/tasks/: segmentation's BatchNorm + 1x1 conv,
depth's bins or DPT), its output fitted to the image; and `PatchFeatures`, a backbone reduced to one
block's patch features (feature maps). Patch size and normalisation come from the backbone
(model_config.py); the tapped blocks and the head from the task.

`python bench.py --summary` prints a torchinfo summary of a segmentation model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dinokit.backbones.loading import backbone_blocks, exporting, load_backbone
from dinokit.data.resize import preprocess, round_to_patch
from dinokit.errors import UserError
from model_config import BackboneSpec, get_backbone_spec
from utils import autocast, select_device, select_precision

PADDINGS = ("bottom_right", "center")


def pad_to_patches(images: torch.Tensor, patch_size: int, padding: str) -> torch.Tensor:
    """Zero padding (after normalisation) up to multiples of the patch size: right and bottom, or
    centred as Meta's CenterPadding (the smaller half first)."""
    pad_h, pad_w = -images.shape[-2] % patch_size, -images.shape[-1] % patch_size
    if padding == "center":
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    else:
        pads = (0, pad_w, 0, pad_h)
    if exporting() or any(pads):  # exported: pads are computed in the graph for every size
        images = F.pad(images, pads)
    return images


def fit_to_image(
    maps: torch.Tensor,
    padded: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int] | None,
    padding: str,
) -> torch.Tensor:
    """A head's output over the padded input (`padded`: its (H, W)) -> the image: `bottom_right`
    upsamples to the padded size and crops the padding off; `center` (Meta's heads: mmseg's
    EncoderDecoder) resizes the whole map straight to the image. `output_size` (H, W): resized
    there instead, interpolating once more at most."""
    height, width = image_size
    padded = tuple(padded)
    # While exporting, sizes are symbolic: take the general path instead of branching on them.
    symbolic = exporting()
    if padding == "bottom_right" and (symbolic or padded != (height, width)):
        maps = F.interpolate(maps, size=padded, mode="bilinear", align_corners=False)
        maps = maps[..., :height, :width]
        if output_size is None:
            return maps
    target = tuple(output_size) if output_size is not None else (height, width)
    if symbolic or tuple(maps.shape[-2:]) != target:
        maps = F.interpolate(maps, size=target, mode="bilinear", align_corners=False)
    return maps


@dataclass(frozen=True)
class Taps:
    """Which backbone tokens a head reads: the patch maps of `blocks` (0-based), after the
    backbone's final norm or before it, each with its class token broadcast beside it or not."""

    blocks: tuple[int, ...]
    norm: bool = True
    class_token: bool = False

    def channels(self, embed_dim: int) -> int:
        """Width of the concatenated maps the head receives."""
        return embed_dim * len(self.blocks) * (2 if self.class_token else 1)


class DenseModel(nn.Module):
    """A backbone (dinokit/backbones/loading.py), the tokens of its tapped blocks and a task's head
    (dinokit/tasks/): `[B, C, H, W]` out for images of any size (segmentation: class logits; depth:
    metres). `extract_features` -> `forward_head` is the split that lets a frozen backbone's
    features be cached.

    The image is zero-padded (after normalisation) to a multiple of the patch size, and the head's
    output fitted back to the image. Two paddings, stored with the model: `bottom_right` (this
    project's own models) pads right and bottom and crops the output back; `center` is Meta's
    evaluation code for its released heads (`CenterPadding` in dinov2/hub/utils.py; mmseg's
    EncoderDecoder then resizes the padded grid's output straight to the unpadded image size,
    bilinear, align_corners=False), which those heads were trained with.
    With `fine_tune=False` the backbone is frozen: no gradients, always in eval mode, and its
    forward builds no autograd graph. `arch` is what rebuilds it, stored in every checkpoint: the
    backbone's half and the head's (`head_arch`, the task's keywords). `make_head` builds the head
    once the backbone is there.
    """

    def __init__(
        self,
        make_head: Callable[[], nn.Module],
        taps: Taps,
        head_arch: dict,
        *,
        backbone: str = "small",
        registers: bool = False,
        source: str = "hub",
        hub_dir: str | Path | None = None,
        weights: str | Path | None = None,
        pretrained: bool = True,
        fine_tune: bool = False,
        padding: str = "bottom_right",
        normalization: str | None = None,
    ):
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        spec = get_backbone_spec(backbone, registers)
        self.source = "local" if hub_dir is not None else source  # a local clone of the hub repository
        # The weights' normalisation: SAT-493M files have their own (model_config.py); a rebuilt
        # model gets it from its checkpoint.
        self.normalization = normalization or ("sat493m" if "sat493m" in str(weights or "").lower() else "imagenet")
        self.mean, self.std = spec.normalization(self.normalization)
        self.spec, self.patch_size, self.padding = spec, spec.patch_size, padding
        self.hub_dir = str(hub_dir) if hub_dir is not None else None
        self.backbone = load_backbone(
            spec.hub_name, source=self.source, weights=weights, pretrained=pretrained, hub_dir=hub_dir
        )
        self.arch = {
            "backbone": spec.hub_name,
            "registers": spec.hub_name.endswith("_reg"),
            "source": self.source,
            "padding": padding,
            "normalization": self.normalization,
            **head_arch,
        }
        self.taps = taps
        self.head = make_head()  # after the backbone: a random-init head draws the same numbers as always
        self.fine_tune = fine_tune
        self.backbone_images = 0  # images the backbone has processed (a count for reports, not state)
        self.backbone.requires_grad_(fine_tune)
        if hasattr(self.backbone, "mask_token"):  # Meta's iBOT mask token: unused outside pretraining
            self.backbone.mask_token.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> DenseModel:
        super().train(mode)
        if not self.fine_tune:
            self.backbone.eval()
        return self

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The tapped blocks' `[B, C, h, w]` patch maps of padded, normalised images (with their
        class tokens beside them if the head reads those), concatenated."""
        taps = self.taps
        blocks = self.backbone.get_intermediate_layers(
            images, n=list(taps.blocks), reshape=True, return_class_token=taps.class_token, norm=taps.norm
        )
        return torch.cat(with_class_token(blocks) if taps.class_token else list(blocks), dim=1)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """`tokens` of normalised images of any size (padded to whole patches first), counted."""
        self.backbone_images += images.shape[0]
        images = pad_to_patches(images, self.patch_size, self.padding)
        with torch.set_grad_enabled(self.fine_tune and torch.is_grad_enabled()):
            return self.tokens(images)

    def forward_head(
        self, features: torch.Tensor, image_size: Sequence[int], output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """The output for images of `image_size` (H, W) from `extract_features` output: the head
        alone, which is all a frozen-backbone epoch needs once features are cached."""
        return fit_to_image(self.head(features), self.padded_size(features), image_size, output_size, self.padding)

    def feature_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape of one image's `extract_features` output at (height, width), without computing it."""
        return (self.taps.channels(self.spec.embed_dim), *self.grid(height, width))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid of an image of (height, width)."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def padded_size(self, features: torch.Tensor) -> tuple[int, int]:
        """The (H, W) of the padded input `features` came from."""
        return features.shape[-2] * self.patch_size, features.shape[-1] * self.patch_size

    def forward(
        self,
        images: torch.Tensor | None = None,
        output_size: Sequence[int] | None = None,
        *,
        features: torch.Tensor | None = None,
        image_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The output at the image's size, or at `output_size` (H, W): inference on a resized image
        resizes the head's output straight to the original size, interpolating once. `features=`
        (of images of `image_size`) runs the head alone; it is a forward argument rather than a
        separate method so that DistributedDataParallel sees the call."""
        if features is None:
            features, image_size = self.extract_features(images), images.shape[-2:]
        return self.forward_head(features, image_size, output_size)

    @property
    def head_blocks(self) -> int:
        """Backbone blocks the head works in (EoMT: its query blocks); layer-wise decay leaves them undecayed."""
        return 0

    def training_progress(self, step: int, total: int) -> None:
        """Told after every optimizer step (engine.py): a model whose forward changes over training
        follows its schedule here (EoMT's masked-attention annealing); this one does not."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass instead of storing
        them: fine-tuning memory drops to about one block's worth, for ~30% more compute."""
        for block in backbone_blocks(self.backbone):
            block.__dict__.pop("forward", None)  # back to the class's forward
            if enable:
                block.forward = _checkpointed(block.forward)

    def compile_backbone(self) -> None:
        """torch.compile the backbone's feature extraction (the parameters and state dict are unchanged)."""
        self.backbone.get_intermediate_layers = torch.compile(self.backbone.get_intermediate_layers)


def with_class_token(blocks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each block's `[B, C, h, w]` patch map with its class token broadcast beside it: `[B, 2C, h, w]`."""
    return [torch.cat([patches, cls[:, :, None, None].expand_as(patches)], dim=1) for patches, cls in blocks]


def check_head_layers(spec: BackboneSpec, head_layers: int) -> None:
    """The `--head-layers` values a backbone serves, with the fix in the error."""
    if head_layers not in spec.head_layers():
        if spec.is_convnext:
            raise UserError(
                f"--head-layers {head_layers}: {spec.hub_name}'s four stages differ in width and resolution; "
                "a ConvNeXt feeds the head from its last stage: use --head-layers 1"
            )
        raise UserError(f"--head-layers must be one of {spec.head_layers()}, got {head_layers}")


def _checkpointed(forward):
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


class PatchFeatures:
    """A backbone reduced to one block's patch tokens (after its final norm): RGB images resized to
    `imgsz` (W, H; rounded up to the patch size) -> `[B, h, w, C]` float32 on the CPU."""

    def __init__(
        self,
        backbone: str = "small",
        *,
        imgsz: Sequence[int] = (518, 518),
        layer: int | None = None,
        device: str = "auto",
        amp: str = "auto",
        registers: bool = False,
        source: str = "hub",
        hub_dir: str | Path | None = None,
        weights: str | Path | None = None,
        pretrained: bool = True,
    ):
        self.device = select_device(device)
        self.amp_dtype = select_precision(self.device, amp)
        self.backbone = (
            load_backbone(
                backbone, registers=registers, source=source, hub_dir=hub_dir, weights=weights, pretrained=pretrained
            )
            .to(self.device)
            .eval()
        )
        spec = get_backbone_spec(backbone, registers)
        depth = len(backbone_blocks(self.backbone))
        self.layer = depth if layer is None else layer
        if not 1 <= self.layer <= depth or (spec.is_convnext and self.layer != depth):
            allowed = f"only its last stage, {depth}" if spec.is_convnext else f"blocks 1 to {depth}"
            raise UserError(f"--layer {layer}: {spec.hub_name} has {allowed}")
        self.mean, self.std = spec.normalization(weights)
        patch = spec.patch_size
        self.size = tuple(reversed(round_to_patch(imgsz, patch)))  # (H, W)
        self.grid = (self.size[0] // patch, self.size[1] // patch)
        self.dim: int = self.backbone.embed_dim

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.cat([preprocess(image, self.size, self.mean, self.std) for image in images]).to(self.device)
        with autocast(self.device, self.amp_dtype):
            (maps,) = self.backbone.get_intermediate_layers(batch, n=[self.layer - 1], reshape=True)
        return maps.float().permute(0, 2, 3, 1).cpu()
