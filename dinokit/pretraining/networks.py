"""What a pretraining run trains: a backbone's class and patch tokens (with iBOT's masked patches
replaced by a learned mask token), and the projection heads on them.

`TokenBackbone` wraps a backbone of any source the toolkit loads (timm's DINOv2 / DINOv3 ViTs and
ConvNeXts, Meta's own modules from torch.hub or --hub-dir) behind one call,
`(images, masks) -> (class token [B, C], patch tokens [B, N, C])`, after the final norm as
every other script reads them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinokit.backbones.dinov3 import TimmConvNext, TimmDinov3
from dinokit.backbones.loading import TimmDinov2, backbone_blocks
from dinokit.backbones.meta_layout import meta_state


class TokenBackbone(nn.Module):
    """A backbone's normalised class token and patch tokens; `masks` ([B, H, W], True = hidden)
    swap those patches' embeddings for `mask_token` before the blocks, as Meta's
    `prepare_tokens_with_masks` does. A ConvNeXt (distillation students) takes no masks."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.embed_dim: int = backbone.embed_dim
        self.patch_size: int = backbone.patch_size
        self.is_convnext = isinstance(backbone, TimmConvNext) or hasattr(backbone, "downsample_layers")
        self.is_meta = not isinstance(backbone, (TimmDinov2, TimmDinov3, TimmConvNext))
        has_own_token = self.is_meta and hasattr(backbone, "mask_token")
        self.mask_token = None if self.is_convnext or has_own_token else nn.Parameter(torch.zeros(1, self.embed_dim))
        self.grad_checkpointing = False

    @property
    def blocks(self) -> nn.ModuleList:
        return backbone_blocks(self.backbone)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_convnext:
            ((patches, cls),) = self.backbone.get_intermediate_layers(
                images, n=1, return_class_token=True, reshape=True
            )
            return cls, patches.flatten(2).transpose(1, 2)
        if self.is_meta:  # Meta's code masks natively ([B, N] masks)
            out = self.backbone.forward_features(images, masks=None if masks is None else masks.flatten(1))
            return out["x_norm_clstoken"], out["x_norm_patchtokens"]
        vit = self.backbone.vit
        x = vit.patch_embed(images)  # [B, H, W, C] (dynamic image size)
        if masks is not None and masks.numel():
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).view(1, 1, 1, -1), x)
        rope = None
        if isinstance(self.backbone, TimmDinov3):
            x, rope = vit._pos_embed(x)
        else:
            x = vit._pos_embed(x)
        x = vit.norm_pre(x)
        for block in vit.blocks:
            call = (lambda b, t: b(t, rope=rope)) if rope is not None else (lambda b, t: b(t))
            if self.grad_checkpointing and self.training:
                x = checkpoint(call, block, x, use_reentrant=False)
            else:
                x = call(block, x)
        x = vit.norm(x)
        return x[:, 0], x[:, vit.num_prefix_tokens :]

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first block to `rate` at the last."""
        blocks = self.blocks
        if self.is_convnext:
            return
        for index, block in enumerate(blocks):
            block_rate = rate * index / max(1, len(blocks) - 1)
            for name in ("drop_path1", "drop_path2"):
                if hasattr(block, name):
                    setattr(block, name, DropPath(block_rate) if block_rate > 0 else nn.Identity())
            if hasattr(block, "sample_drop_ratio"):  # Meta's DINOv2 block
                block.sample_drop_ratio = block_rate

    @torch.no_grad()
    def set_layerscale(self, value: float) -> None:
        """Start every LayerScale factor at `value`: DINOv2's 1e-5 keeps a random-init ViT's residual
        branches silent (every image's class token alike) for longer than a short run has steps."""
        for name, param in self.backbone.named_parameters():
            if name.endswith(("gamma_1", "gamma_2", "ls1.gamma", "ls2.gamma")):
                param.fill_(value)

    def meta_state(self) -> dict[str, torch.Tensor]:
        """The backbone as Meta's released file (dinokit/backbones/meta_layout.py), with iBOT's mask token."""
        return meta_state(self.backbone, self.mask_token)


class ProjectionHead(nn.Module):
    """DINO / iBOT head (dinov2/layers/dino_head.py): a 3-layer MLP (GELU) to a `bottleneck`-wide
    unit vector, then cosine logits against `prototypes` unit prototypes. The prototypes are
    DINOv2's weight-normalised last layer with its norm fixed at 1, written as its normalisation.
    `batch_norm`: BatchNorm after each hidden layer (DINO's `use_bn_in_head`), which magnifies the
    small differences between a random-init backbone's outputs."""

    def __init__(
        self, in_dim: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256, batch_norm: bool = False
    ):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden)) if batch_norm else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            norm(),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            norm(),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        eps = 1e-6 if tokens.dtype == torch.float16 else 1e-12
        embedded = F.normalize(self.mlp(tokens), dim=-1, eps=eps)
        return F.linear(embedded, F.normalize(self.prototypes, dim=-1, eps=eps).to(embedded.dtype))


class FeatureProjection(nn.Module):
    """A distillation student's tokens mapped to its teacher's width: a 2-layer MLP (GELU), one for
    the class token and one for the patch tokens."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens)
