"""Depth heads, written from Meta's DINOv2 depth code (dinov2/hub/depth/decode_heads.py) so that
its released head files load by name, without mmcv.

Both read backbone tokens with `norm=False` and the class token beside every patch token (DPT:
"project" readout; linear: concatenated, 2 x width per block). Output: metric depth `[B, 1, h, w]`
at 4x the token grid (linear) or 16x (DPT: four fusion blocks and its regression head each
upsample 2x from half the grid), clamped to the head's (min_depth, max_depth); the model resizes it
to the image, as Meta's encoder-decoder does.

- `BinsHead` (Meta's `BNHead` with classify=True: despite the name it has no BatchNorm — the line is
  commented out in Meta's code): the blocks' [patch, class] maps resized 4x (bilinear) and
  concatenated, a 1x1 conv to 256 bins, "linear" normalisation (ReLU + 0.1, divided by the sum),
  depth = sum of p x bin centre over bins uniform in [min_depth, max_depth]. `batch_norm=True`
  adds a BatchNorm before the conv: our trained heads, like the segmentation head.
- `DPTHead`: reassemble (readout projection, 1x1 projection, resize to 4x, 2x, 1x, 0.5x), 3x3
  convs to 256 channels, four fusion blocks (pre-activation residual units, 2x upsampling each),
  a 3x3 projection + ReLU, and a regression head (ReLU(conv) + min_depth).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BINS = 256
DEPTH_HEADS = ("linear", "dpt")
UPSAMPLE = 4
BIN_EPS = 0.1  # Meta's "linear" normalisation: ReLU(logit) + 0.1, then divided by the sum


class BinsHead(nn.Module):
    """Meta's linear depth head (module docstring): 256 depth bins per pixel."""

    def __init__(
        self, in_channels: int, *, min_depth: float, max_depth: float, bins: int = BINS, batch_norm: bool = False
    ):
        super().__init__()
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.norm = nn.BatchNorm2d(in_channels) if batch_norm else nn.Identity()
        self.conv_depth = nn.Conv2d(in_channels, bins, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features`: the blocks' `with_class_token` maps concatenated, `[B, blocks x 2C, h, w]`
        (resizing the concatenation is resizing each map: bilinear works channel by channel)."""
        size = [side * UPSAMPLE for side in features.shape[-2:]]
        maps = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
        return self.depth(self.conv_depth(self.norm(maps))).clamp(self.min_depth, self.max_depth)

    def depth(self, logits: torch.Tensor) -> torch.Tensor:
        """Bin logits `[B, bins, h, w]` -> depth `[B, 1, h, w]` (Meta's "UD" bins, "linear" normalisation)."""
        weights = torch.relu(logits) + BIN_EPS
        weights = weights / weights.sum(dim=1, keepdim=True)
        centres = torch.linspace(self.min_depth, self.max_depth, logits.shape[1], device=logits.device)
        return torch.einsum("bkhw,k->bhw", weights, centres.to(weights.dtype)).unsqueeze(1)


class _Conv(nn.Module):
    """mmcv's ConvModule as Meta's DPT head uses it: a conv (key `conv.*`), then an optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, *, padding: int = 0, bias: bool = True, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return torch.relu(x) if self.relu else x


class _ResidualUnit(nn.Module):
    """Meta's PreActResidualConvUnit without norm: x + conv2(relu(conv1(relu(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _Conv(channels, channels, 3, padding=1, bias=False)
        self.conv2 = _Conv(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class _FusionBlock(nn.Module):
    def __init__(self, channels: int, first: bool):
        super().__init__()
        self.res_conv_unit1 = None if first else _ResidualUnit(channels)
        self.res_conv_unit2 = _ResidualUnit(channels)
        self.project = _Conv(channels, channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class _Reassemble(nn.Module):
    def __init__(self, width: int, channels: Sequence[int]):
        super().__init__()
        self.readout_projects = nn.ModuleList(nn.Sequential(nn.Linear(2 * width, width), nn.GELU()) for _ in channels)
        self.projects = nn.ModuleList(_Conv(width, c, 1) for c in channels)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(channels[0], channels[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(channels[1], channels[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(channels[3], channels[3], kernel_size=3, stride=2, padding=1),
            ]
        )

    def forward(self, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        out = []
        for index, (patches, cls) in enumerate(blocks):
            shape = patches.shape
            tokens = patches.flatten(2).transpose(1, 2)
            tokens = torch.cat([tokens, cls.unsqueeze(1).expand_as(tokens)], dim=-1)
            x = self.readout_projects[index](tokens).transpose(1, 2).reshape(shape)
            out.append(self.resize_layers[index](self.projects[index](x)))
        return out


class DPTHead(nn.Module):
    """Meta's DPT depth head (module docstring) for a ViT of `width`, reading four blocks."""

    def __init__(self, width: int, *, min_depth: float, max_depth: float, channels: int = 256):
        super().__init__()
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        post = [width // 2 ** (3 - i) for i in range(4)]
        self.reassemble_blocks = _Reassemble(width, post)
        self.convs = nn.ModuleList(_Conv(c, channels, 3, padding=1, bias=False) for c in post)
        self.fusion_blocks = nn.ModuleList(_FusionBlock(channels, first=i == 0) for i in range(4))
        self.project = _Conv(channels, channels, 3, padding=1, relu=True)
        self.conv_depth = _RegressionHead(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features`: four blocks' `with_class_token` maps concatenated, `[B, 4 x 2C, h, w]`."""
        blocks = [(x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2 :, 0, 0]) for x in features.chunk(4, dim=1)]
        maps = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(blocks))]
        out = self.fusion_blocks[0](maps[-1])
        for index in range(1, 4):
            out = self.fusion_blocks[index](out, maps[-(index + 1)])
        depth = torch.relu(self.conv_depth(self.project(out))) + self.min_depth
        return depth.clamp(self.min_depth, self.max_depth)


class _RegressionHead(nn.Module):
    """Meta's HeadDepth: conv 3x3 to half, 2x upsampling (align_corners=True), conv 3x3 to 32, ReLU, conv 1x1 to 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            _Upsample2x(),
            nn.Conv2d(channels // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class _Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
