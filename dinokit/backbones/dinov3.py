"""DINOv3 backbones in timm's code, answering the torch.hub model's `get_intermediate_layers`, and
Meta's DINOv3 weight files read, checked and converted for them.

timm builds every DINOv3 ViT (RoPE, 4 storage tokens, LayerScale, SwiGLU for S+/H+/7B) and the
ConvNeXts offline; Meta's `.pth` files load through timm's key converters. Measured against Meta's
own code with the same random weights: the four tapped layers' patch tokens agree exactly (ViT-S/16,
ViT-B/16 at 224^2, 512^2, 480x640, 368x496; docs/backbones.md).
"""

from __future__ import annotations

import re
import types
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dinokit.backbones.hf_weights import is_hf_weights, read_hf_backbone
from dinokit.data.file_kinds import read_torch_file
from model_config import BACKBONES, BackboneSpec

# Meta's hub code reads LVD vs SAT from a ViT-L file's `-<8 hex>.pth` suffix and fails without it.
VITL_RELEASED_NAMES = "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth or dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
VITL_TAGS = {
    "lvd": "lvd1689m-8aa4cbdd",
    "sat": "sat493m-eadcf0ff",
}  # what Meta's hub code reads from a ViT-L file's name
REQUEST_ACCESS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


class TimmDinov3(nn.Module):
    """timm's DINOv3 ViT behind the hub model's `get_intermediate_layers`: `[B, C, H/16, W/16]` patch
    maps (storage tokens excluded), with `return_class_token` the class token beside each."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        if vit.rope is not None:  # an instance attribute: the state dict is unchanged
            vit.rope.get_embed = types.MethodType(rope_embed, vit.rope)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        outputs = self.vit.forward_intermediates(
            x,
            indices=n if isinstance(n, int) else list(n),
            return_prefix_tokens=return_class_token,
            norm=norm,
            output_fmt="NCHW" if reshape else "NLC",
            intermediates_only=True,
        )
        if return_class_token:  # prefix tokens are [class, 4 storage]: keep the class token
            return tuple((patches, prefix[:, 0]) for patches, prefix in outputs)
        return tuple(outputs)


def rope_embed(rope: nn.Module, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """timm's `RotaryEmbeddingDinoV3.get_embed`, except while exporting: timm builds the coordinate
    grid with `float(size)`, which fixes an exported graph to the traced token grid (it then failed at
    every other size). Here the same coordinates (Meta's: patch centres (i + 0.5) / size per axis,
    mapped to [-1, 1]) are tensor operations on the size, so the graph computes them for any input."""
    if shape is None or not exporting():
        return type(rope).get_embed(rope, shape, dtype)
    axes = [
        (torch.arange(size, dtype=torch.float32) + 0.5) / torch.full((), size, dtype=torch.float32) for size in shape
    ]
    grid = 2.0 * torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1) - 1.0
    sin, cos = rope._get_pos_embed_from_coords(grid.flatten(0, -2))
    embed = torch.cat([sin, cos], dim=-1)
    return embed if dtype is None else embed.to(dtype)


def exporting() -> bool:
    """True while torch.export traces the model (ONNX export): sizes are symbolic there."""
    return bool(getattr(torch.compiler, "is_exporting", lambda: False)())


class TimmConvNext(nn.Module):
    """timm's ConvNeXt as Meta's DINOv3 ConvNeXt answers `get_intermediate_layers`: each stage's map;
    the last stage normalised by the final LayerNorm (the others have none), its "class token" the
    normalised mean over positions."""

    def __init__(self, convnext: nn.Module):
        super().__init__()
        self.convnext = convnext
        self.embed_dim: int = convnext.num_features
        self.patch_size = 32  # the last stage's stride

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        stages = len(self.convnext.stages)
        indices = list(range(stages - n, stages)) if isinstance(n, int) else list(n)
        maps = self.convnext.forward_intermediates(x, indices=indices, intermediates_only=True)
        outputs = []
        for index, features in zip(indices, maps):
            pooled = features.mean((2, 3), keepdim=True)
            if norm and index == stages - 1:
                features, pooled = self.convnext.head.norm(features), self.convnext.head.norm(pooled)
            patches = features if reshape else features.flatten(2).transpose(1, 2)
            outputs.append((patches, pooled.flatten(1)) if return_class_token else patches)
        return tuple(outputs)


def build_timm(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    """A DINOv3 ViT or ConvNeXt from timm: random init, or timm's copy of Meta's weights."""
    import timm

    name = spec.timm_pretrained if pretrained else spec.timm_name
    if spec.is_convnext:
        return TimmConvNext(timm.create_model(name, pretrained=pretrained, num_classes=0))
    return TimmDinov3(timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True))


def read_dinov3_weights(path: str | Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """Meta's released DINOv3 backbone file, checked against `spec` (a clear error naming the field)."""
    if is_hf_weights(path):
        state = read_hf_backbone(path, "dinov3")
    else:
        state = read_torch_file(Path(path), "backbone weights")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    marker = "downsample_layers.0.0.weight" if spec.is_convnext else "storage_tokens"
    if not isinstance(state, dict) or marker not in state:
        what = "DINOv3 ConvNeXt" if spec.is_convnext else "DINOv3 ViT"
        found = " (a DINOv2 file: pass its dinov2_* name)" if isinstance(state, dict) and "pos_embed" in state else ""
        raise ValueError(f"{path}: not a {what} backbone state dict (no {marker}){found}")
    found_dim, found_depth = describe_dinov3_weights(state, spec)
    if (found_dim, found_depth) != (spec.embed_dim, spec.depth):
        fitting = [
            s.hub_name
            for s in BACKBONES.values()
            if (s.embed_dim, s.depth, s.family, s.is_convnext) == (found_dim, found_depth, "dinov3", spec.is_convnext)
            and fits(state, s)  # width and depth alone do not tell S from S+, ConvNeXt tiny from small
        ]
        fix = f"; pass --backbone {fitting[0]}" if fitting else ""
        raise ValueError(
            f"{path}: weights of a backbone with width {found_dim} and depth {found_depth}, "
            f"but the model is {spec.hub_name} (width {spec.embed_dim}, depth {spec.depth}){fix}"
        )
    check_architecture(state, spec, path)
    return state


def fits(state: dict[str, torch.Tensor], spec: BackboneSpec) -> bool:
    """Whether a Meta-format state dict has exactly the tensors (names and shapes) of `spec`'s model,
    built without memory on the meta device."""
    with torch.device("meta"):
        wrapper = build_timm(spec, pretrained=False)
    target = (wrapper.convnext if spec.is_convnext else wrapper.vit).state_dict()
    try:
        converted = to_timm_state(state, wrapper)
    except (ValueError, RuntimeError, KeyError):
        return False
    return converted.keys() == target.keys() and all(converted[k].shape == target[k].shape for k in target)


def check_architecture(state: dict[str, torch.Tensor], spec: BackboneSpec, path: str | Path) -> None:
    """Name the sibling a file belongs to when width and depth agree but the rest does not (ViT-S
    and S+: S+ has a SwiGLU MLP; ConvNeXt tiny and small: 9 or 27 blocks in the third stage)."""
    if fits(state, spec):
        return
    siblings = [
        other.hub_name
        for other in BACKBONES.values()
        if other.family == "dinov3"
        and other.is_convnext == spec.is_convnext
        and other.embed_dim == spec.embed_dim
        and other.hub_name != spec.hub_name
        and fits(state, other)
    ]
    if siblings:
        raise ValueError(f"{path}: the weights of {siblings[0]}, not {spec.hub_name}; pass --backbone {siblings[0]}")
    raise ValueError(f"{path}: does not match {spec.hub_name}'s architecture (tensor names or shapes differ)")


def describe_dinov3_weights(state: dict[str, torch.Tensor], spec: BackboneSpec) -> tuple[int, int]:
    """(width of the tapped features, depth) of a Meta-format DINOv3 state dict."""
    if spec.is_convnext:
        stages = {int(k.split(".")[1]) for k in state if k.startswith("stages.")}
        return state["norm.weight"].shape[0], len(stages)
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    return state["storage_tokens"].shape[-1], len(blocks)


def to_timm_state(state: dict[str, torch.Tensor], wrapper: nn.Module) -> dict[str, torch.Tensor]:
    """Meta-format DINOv3 keys -> the timm model's, refusing to drop a non-zero query/value bias
    (timm's converter discards qkv biases silently when the target model has none)."""
    if isinstance(wrapper, TimmConvNext):
        from timm.models.convnext import checkpoint_filter_fn

        return checkpoint_filter_fn(state, wrapper.convnext)
    from timm.models.eva import checkpoint_filter_fn

    vit = wrapper.vit
    has_bias = any(name.endswith("q_bias") for name, _ in vit.named_parameters())
    biases = [v for k, v in state.items() if k.endswith("qkv.bias")]
    if biases and not has_bias and any(bool(b.abs().max() > 0) for b in biases):
        raise ValueError("the weights have non-zero qkv biases, which this timm architecture cannot hold")
    state = {k: v for k, v in state.items() if has_bias or not k.endswith("qkv.bias")}
    return checkpoint_filter_fn(state, vit)


def check_hub_weights_name(spec: BackboneSpec, weights: str) -> None:
    """Meta's dinov3_vitl16 needs the released file name's hash suffix; say how to fix it before its
    code fails with "Unexpected weights specification"."""
    if spec.hub_name == "dinov3_vitl16" and len(re.findall(r"-(.{8}).pth", str(weights))) != 1:
        raise ValueError(
            f"{weights}: Meta's dinov3_vitl16 tells LVD from SAT weights by the file name's -<hash>.pth suffix; "
            f"rename the file back to {VITL_RELEASED_NAMES}, or load it with --source timm"
        )
