"""A backbone of any source written as Meta's released `.pth` (the layout `--weights` reads
everywhere): the inverse of the key converters in loading.py / dinov3.py, checked by loading the
written state back through them (tests/test_pretrain_units.py).

timm names the same tensors differently: DINOv2 registers as `reg_token` with class and
registers outside the position embedding (Meta: `register_tokens`, a class position); DINOv3
storage tokens as `reg_token`, LayerScale as `gamma_1/2`, SwiGLU as `fc1_g/fc1_x`, q and v biases
apart (Meta: one `qkv.bias` with a zero key part and its `bias_mask`) and no RoPE periods; a
ConvNeXt's stem and downsampling layers inside its stages. `mask_token` (iBOT's, absent in timm)
is written when the pretraining gave one, else zeros, as Meta's code expects one.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dinokit.backbones.dinov3 import TimmConvNext, TimmDinov3
from dinokit.backbones.hf_weights import rope_periods
from dinokit.backbones.loading import TimmDinov2

DINOV3_ROPE_BASE = 100.0  # Meta's RopePositionEmbedding base for every released DINOv3 ViT


def meta_state(backbone: nn.Module, mask_token: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights in Meta's layout, on the CPU (Meta's own modules: as they are)."""
    if isinstance(backbone, TimmDinov2):
        state = dinov2_meta_state(backbone.vit)
    elif isinstance(backbone, TimmDinov3):
        state = dinov3_meta_state(backbone.vit)
    elif isinstance(backbone, TimmConvNext):
        state = convnext_meta_state(backbone.convnext)
    else:  # torch.hub / --hub-dir modules are Meta's code: their state dict is the layout
        state = dict(backbone.state_dict())
    if "mask_token" in state or isinstance(backbone, (TimmDinov2, TimmDinov3)):
        width = state["cls_token"].shape[-1]
        token = mask_token if mask_token is not None else state.get("mask_token", torch.zeros(1, width))
        state["mask_token"] = token.detach().reshape(1, width)
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in state.items()}


def dinov2_meta_state(vit: nn.Module) -> dict[str, torch.Tensor]:
    """timm's DINOv2 ViT -> Meta's DinoVisionTransformer (inverse of timm's `_convert_dinov2`)."""
    state = dict(vit.state_dict())
    out: dict[str, torch.Tensor] = {}
    if "reg_token" in state:  # class token outside the position embedding: give Meta's a zero class position
        patches = state.pop("pos_embed")
        out["register_tokens"] = state.pop("reg_token")
        out["pos_embed"] = torch.cat([torch.zeros_like(patches[:, :1]), patches], dim=1)
    swiglu = "SwiGLU" in type(vit.blocks[0].mlp).__name__  # ViT-g: Meta's w12 / w3
    for name, tensor in state.items():
        if swiglu:
            name = name.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[name] = tensor
    return out


def dinov3_meta_state(vit: nn.Module) -> dict[str, torch.Tensor]:
    """timm's DINOv3 ViT (Eva) -> Meta's DINOv3 ViT (inverse of timm's eva `checkpoint_filter_fn`)."""
    state = dict(vit.state_dict())
    out: dict[str, torch.Tensor] = {"storage_tokens": state.pop("reg_token")}
    for name, tensor in state.items():
        if name.startswith("rope.") or name.endswith(("q_bias", "v_bias")):
            continue
        name = name.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        name = name.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2")
        if ".mlp.fc2." in name and any(k.endswith("fc1_g.weight") for k in state):
            name = name.replace("mlp.fc2", "mlp.w3")
        out[name] = tensor
    for index, block in enumerate(vit.blocks):
        attn = block.attn
        if getattr(attn, "q_bias", None) is not None:
            q_bias, v_bias = attn.q_bias.detach(), attn.v_bias.detach()
            ones = torch.ones_like(q_bias)
            out[f"blocks.{index}.attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
            out[f"blocks.{index}.attn.qkv.bias_mask"] = torch.cat([ones, torch.zeros_like(ones), ones])
    head_dim = vit.embed_dim // vit.blocks[0].attn.num_heads
    out["rope_embed.periods"] = rope_periods(head_dim, DINOV3_ROPE_BASE)
    return out


def convnext_meta_state(convnext: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ConvNeXt -> Meta's DINOv3 ConvNeXt (inverse of timm's convnext `checkpoint_filter_fn`)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in convnext.state_dict().items():
        if name.startswith("head.") and not name.startswith("head.norm."):
            continue
        name = name.replace("stem.", "downsample_layers.0.")
        name = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", name)
        name = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", name)
        name = name.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm.", "norm.")
        out[name] = tensor
    return out
