"""EoMT (Kerssies et al., "Your ViT is Secretly an Image Segmentation Model", CVPR 2025; MIT,
github.com/tue-mps/eomt) on the toolkit's DINOv2 / DINOv3 backbones.

K learnable queries join the tokens before the last L blocks; after every one of those blocks' inputs
and after the last block, the (final-norm'ed) tokens are read by a small mask module: the queries
through a 3-layer MLP, the patch tokens upscaled by transposed convolutions (2x each; one for /14
patches, two for /16), their dot product the mask logits, and a linear class head with a no-object
class. In training, each query attends only to the patches inside its predicted mask (masked
attention), and the probability that it does is annealed to 0 block by block, so that inference is a
plain ViT forward plus the mask module. Parameter names follow the original repository (`q`,
`class_head`, `mask_head`, `upscale`); dinokit/tasks/panoptic/released.py maps them to and from
transformers' `EomtForUniversalSegmentation`, whose forward this one equals (tests/test_panoptic.py).

The backbone's first N - L blocks are `extract_features` (what a frozen backbone's cache holds: every
token, prefix ones included), the last L blocks with the queries are `forward_head`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.backbones.dinov3 import exporting
from dinokit.backbones.loading import backbone_blocks
from dinokit.errors import UserError
from model import DenseModel, Taps, pad_to_patches
from model_config import get_backbone_spec

QUERY_BLOCKS = 4  # the paper's L
QUERIES = 100  # our default K (the paper: 200 on COCO's 133 classes)
ANNEAL_POWER = 0.9  # the paper's polynomial annealing of the masking probability


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a `[B, C, H, W]` map (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class ScaleBlock(nn.Module):
    """2x upscaling of the patch tokens: transposed conv, GELU, depthwise 3x3 conv, LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


def upscale_blocks(patch_size: int) -> int:
    """The paper's count: masks at 4x the token grid for /16 patches, 2x for /14."""
    return max(1, int(math.log2(patch_size)) - 2)


class MaskModule(nn.Module):
    """The queries, the class head and the mask module: tokens -> (mask logits, class logits)."""

    def __init__(self, dim: int, num_classes: int, queries: int, upscales: int):
        super().__init__()
        self.q = nn.Embedding(queries, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)  # the last class: no object
        self.mask_head = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.upscale = nn.Sequential(*[ScaleBlock(dim) for _ in range(upscales)])

    def predict(
        self, tokens: torch.Tensor, patch_start: int, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, K, h', w']` mask logits and `[B, K, classes + 1]` class logits of normalised tokens
        laid out [queries, prefix tokens, patches]."""
        queries = tokens[:, : self.q.num_embeddings]
        patches = tokens[:, patch_start:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), self.upscale(patches))
        return masks, self.class_head(queries)


@dataclass
class QueryOutputs:
    """What EoMT outputs for a batch: the last block's masks and classes, every earlier prediction
    (training: each one is supervised), and the sizes that place the masks on the image."""

    masks: torch.Tensor  # [B, K, h', w'] logits over the padded input
    classes: torch.Tensor  # [B, K, num_classes + 1] logits, the last one "no object"
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # the predictions before the last, in block order
    input_size: tuple[int, int] = (0, 0)  # (H, W) of the image the network saw
    padded_size: tuple[int, int] = (0, 0)  # (H, W) after padding to whole patches

    @property
    def shape(self) -> torch.Size:
        return self.masks.shape

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: Any) -> QueryOutputs:
        return replace(self, masks=self.masks[index], classes=self.classes[index], layers=())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What an exported file outputs: class logits, mask logits."""
        return self.classes, self.masks

    def float(self) -> QueryOutputs:
        return replace(self, masks=self.masks.float(), classes=self.classes.float(), layers=())

    def detach(self) -> QueryOutputs:
        return replace(self, masks=self.masks.detach(), classes=self.classes.detach(), layers=())

    def predictions(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every supervised prediction, the final one last."""
        return [*self.layers, (self.masks, self.classes)]

    def image_masks(self, size: Sequence[int]) -> torch.Tensor:
        """`[B, K, H, W]` mask logits on an image of `size` (H, W) that the network saw resized to
        `input_size`: resized so the padded input's extent maps onto it, the padding cropped off."""
        height, width = size
        in_h, in_w = self.input_size
        pad_h, pad_w = self.padded_size
        full = ((height * pad_h + in_h // 2) // in_h, (width * pad_w + in_w // 2) // in_w)  # integers: exportable
        return F.interpolate(self.masks, size=full, mode="bilinear", align_corners=False)[..., :height, :width]


class TokenPath:
    """A backbone's token-level parts, whatever its source: patch embedding with positions (and
    DINOv3's rotary embedding), the blocks, the final norm, how many prefix tokens."""

    def __init__(self, backbone: nn.Module, hub_name: str):
        inner = getattr(backbone, "vit", None)
        if inner is None and hasattr(backbone, "rope_embed"):
            raise UserError(
                f"EoMT on {hub_name} runs on timm's build of DINOv3: add --source timm (it loads Meta's weights file)"
            )
        self.vit = inner if inner is not None else backbone
        self.blocks = backbone_blocks(backbone)
        self.norm = self.vit.norm
        self.rotary = getattr(self.vit, "rope", None)  # timm's DINOv3 (Eva)
        if hasattr(self.vit, "num_prefix_tokens"):
            self.prefix = int(self.vit.num_prefix_tokens)
        else:  # Meta's DINOv2 hub model
            self.prefix = 1 + int(getattr(self.vit, "num_register_tokens", 0))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, prefix + h * w, C]` tokens of padded, normalised images, positions added."""
        vit = self.vit
        if not hasattr(vit, "patch_embed") or not hasattr(vit, "_pos_embed"):
            return vit.prepare_tokens_with_masks(images)  # Meta's hub model
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        if isinstance(x, tuple):  # Eva returns (tokens, rotary embedding)
            x = x[0]
        return vit.norm_pre(x)

    def rope(self, grid: tuple[int, int]) -> torch.Tensor | None:
        return None if self.rotary is None else self.rotary.get_embed(shape=list(grid))

    def run(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        """A block's own forward (the blocks before the queries)."""
        return block(x, rope=rope) if rope is not None else block(x)


def block_forward(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, rope: torch.Tensor | None, patch_start: int
) -> torch.Tensor:
    """One pre-norm ViT block with an attention mask (`[B, N, N]` bool, True: may attend) and the
    rotary embedding applied to the patch tokens only (from `patch_start`), from the block's own
    weights: timm's Block and Eva block, Meta's hub block."""
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, dim = h.shape
    if getattr(attn, "q_bias", None) is not None:
        qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(h)
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :patch_start], apply_rot_embed_cat(q[:, :, patch_start:], rope, half=half)], 2).type_as(
            v
        )
        k = torch.cat([k[:, :, :patch_start], apply_rot_embed_cat(k[:, :, patch_start:], rope, half=half)], 2).type_as(
            v
        )
    dropout = attn.attn_drop.p if block.training and hasattr(attn, "attn_drop") else 0.0
    mask = attn_mask[:, None] if attn_mask is not None else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    out = out.transpose(1, 2).reshape(batch, tokens, dim)
    out = attn.proj(getattr(attn, "norm", nn.Identity())(out))
    x = x + _drop_path(block, 1)(_layer_scale(block, 1, out))
    mlp = block.mlp(block.norm2(x))
    return x + _drop_path(block, 2)(_layer_scale(block, 2, mlp))


def _layer_scale(block: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    module = getattr(block, f"ls{index}", None)
    if module is not None:
        return module(x)
    gamma = getattr(block, f"gamma_{index}", None)  # timm's Eva
    return x if gamma is None else x * gamma


def _drop_path(block: nn.Module, index: int) -> nn.Module:
    return getattr(block, f"drop_path{index}", None) or nn.Identity()


def anneal_spans(query_blocks: int) -> list[tuple[float, float]]:
    """(start, end) of each query block's annealing, as fractions of the run: the paper's schedule
    (4 blocks: 1/6-2/6, 2/6-3/6, 3/6-4/6, 4/6-5/6 of training), generalised to L blocks."""
    parts = query_blocks + 2
    return [((i + 1) / parts, (i + 2) / parts) for i in range(query_blocks)]


def mask_probability(step: int, start: int, end: int) -> float:
    """1 before `start`, 0 from `end`, (1 - progress) ** 0.9 between."""
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return (1.0 - (step - start) / (end - start)) ** ANNEAL_POWER


class EomtModel(DenseModel):
    """A DINOv2 / DINOv3 ViT with EoMT's queries in its last `query_blocks` blocks: `QueryOutputs`
    for images of any size. `masked_attention=False` never masks (the frozen-encoder PMT variant
    trains without it as well)."""

    def __init__(
        self,
        num_classes: int,
        *,
        queries: int = QUERIES,
        query_blocks: int = QUERY_BLOCKS,
        masked_attention: bool = True,
        backbone: str = "small",
        registers: bool = False,
        **kwargs: Any,
    ):
        spec = get_backbone_spec(backbone, registers)
        if spec.is_convnext:
            raise UserError(
                f"EoMT needs a ViT: {spec.hub_name} is a ConvNeXt, which has no tokens to add queries to; "
                "use a DINOv3 ViT (dinov3_vits16, ...) or DINOv2"
            )
        if not 1 <= query_blocks <= spec.depth:
            raise UserError(f"--query-blocks {query_blocks}: {spec.hub_name} has {spec.depth} blocks")
        if queries < 1:
            raise UserError(f"--queries must be at least 1, got {queries}")
        upscales = upscale_blocks(spec.patch_size)
        arch = {
            "head": "eomt",
            "num_classes": num_classes,
            "queries": queries,
            "query_blocks": query_blocks,
            "masked_attention": masked_attention,
        }

        def make_head() -> MaskModule:
            return MaskModule(spec.embed_dim, num_classes, queries, upscales)

        super().__init__(make_head, Taps(()), arch, backbone=backbone, registers=registers, **kwargs)
        self.path = TokenPath(self.backbone, spec.hub_name)
        self.query_blocks, self.masked_attention = query_blocks, masked_attention
        # the probability that a query block masks a query's attention (annealed over training)
        self.register_buffer(
            "attn_mask_probs", torch.ones(query_blocks) if masked_attention else torch.zeros(query_blocks)
        )

    @property
    def head_blocks(self) -> int:
        return self.query_blocks

    @property
    def split(self) -> int:
        return len(self.path.blocks) - self.query_blocks

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Every token after the blocks before the queries, `[B, prefix + h * w, C]`."""
        self.backbone_images += images.shape[0]
        images = pad_to_patches(images, self.patch_size, self.padding)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        with torch.set_grad_enabled(self.fine_tune and torch.is_grad_enabled()):
            x, rope = self.path.embed(images), self.path.rope(grid)
            for block in self.path.blocks[: self.split]:
                x = self.path.run(block, x, rope)
        return x

    def feature_shape(self, height: int, width: int) -> tuple[int, int]:
        rows, cols = self.grid(height, width)
        return (self.path.prefix + rows * cols, self.spec.embed_dim)

    def forward_head(
        self, features: torch.Tensor, image_size: Sequence[int], output_size: Sequence[int] | None = None
    ) -> QueryOutputs:
        """The query blocks and the mask module on `extract_features` output of images of `image_size`."""
        height, width = image_size
        patch = self.patch_size
        grid = ((height + patch - 1) // patch, (width + patch - 1) // patch)  # integer ops: symbolic sizes in export
        rope = self.path.rope(grid)
        head: MaskModule = self.head
        queries = head.q.weight[None].expand(features.shape[0], -1, -1)
        x = torch.cat([queries.to(features.dtype), features], dim=1)
        patch_start = head.q.num_embeddings + self.path.prefix
        layers = []
        for index, block in enumerate(self.path.blocks[self.split :]):
            attn_mask = None
            probability = self.attn_mask_probs[index]
            # exported graphs are inference's plain forward (a model whose annealing has not ended
            # would mask: export's self-check then reports the difference)
            if self.masked_attention and not exporting() and (self.training or probability > 0):
                masks, classes = head.predict(self.path.norm(x), patch_start, grid)
                layers.append((masks, classes))
                attn_mask = self.attention_mask(masks, grid, x.shape[1], patch_start, probability)
            x = block_forward(block, x, attn_mask, rope, patch_start)
        masks, classes = head.predict(self.path.norm(x), patch_start, grid)
        padded = (grid[0] * self.patch_size, grid[1] * self.patch_size)
        return QueryOutputs(masks, classes, tuple(layers), (height, width), padded)

    def attention_mask(
        self, masks: torch.Tensor, grid: tuple[int, int], tokens: int, patch_start: int, probability: torch.Tensor
    ) -> torch.Tensor:
        """Queries see the patches of their predicted mask (logit > 0 at the token grid); each query
        is unmasked with probability 1 - `probability`. Every other pair attends as usual."""
        queries = masks.shape[1]
        allowed = torch.ones(masks.shape[0], tokens, tokens, dtype=torch.bool, device=masks.device)
        inside = F.interpolate(masks.detach().float(), size=grid, mode="bilinear").flatten(2) > 0
        allowed[:, :queries, patch_start:] = inside
        if probability < 1:
            free = torch.rand(masks.shape[0], queries, device=masks.device) > probability
            allowed[:, :queries, patch_start:][free] = True
        return allowed

    def training_progress(self, step: int, total: int) -> None:
        """The annealing: query block i masks with probability 1 -> 0 over its span of the run."""
        if not self.masked_attention:
            return
        for index, (start, end) in enumerate(anneal_spans(self.query_blocks)):
            self.attn_mask_probs[index] = mask_probability(step, round(start * total), round(end * total))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise UserError("--grad-checkpointing is not implemented for EoMT's query blocks")

    def compile_backbone(self) -> None:
        raise UserError("--compile is not implemented for EoMT (its query blocks run outside the backbone's forward)")
