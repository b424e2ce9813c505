"""A pretraining run's settings as one typed record (`PretrainConfig`, saved in last.pth and read
back on --resume), its named presets (`RECIPES`), the per-step schedules, and the optimizer's
parameter groups.

The presets: `scratch` is DINOv2's recipe (dinov2/configs/ssl_default_config.yaml and the ViT-L
training config); `continue` starts from released weights (new heads on trained features: a
lower rate, no teacher-temperature warmup, the backbone held for the first epoch while the heads
learn what its features are, and for DINOv3 Gram anchoring to the start weights); `small` is for a
few hundred to a few thousand images on one machine, where the paper's 65,536 prototypes and
slow teacher never leave the uniform start in the few hundred steps there are
(docs/pretraining.md#why-the-small-recipe).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

REFERENCE_BATCH = 1024  # --lr is the rate at this global batch; DINOv2 scales it by sqrt(batch / 1024)


@dataclass
class PretrainConfig:
    """Everything that decides what a pretraining run computes (not where or how fast it runs)."""

    recipe: str = "scratch"
    backbone: str = "dinov2_vits14"
    source: str = "timm"
    hub_dir: str | None = None
    weights: str | None = None
    pretrained: bool = False
    distill_from: str | None = None
    teacher_weights: str | None = None
    imgsz: int = 224
    local_crops: int = 8
    color_jitter: float = 1.0  # multiple of DINOv2's colour-jitter strengths
    epochs: int = 100
    batch: int = 64  # per process
    world: int = 1  # processes (torchrun)
    seed: int = 0
    lr: float = 0.004  # at REFERENCE_BATCH
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    drop_path: float = 0.1
    momentum: float = 0.992
    momentum_end: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_epochs: float = 30.0
    prototypes: int = 65536
    ibot_prototypes: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_batch_norm: bool = False  # BatchNorm in the DINO head's hidden layers (DINO's use_bn_in_head)
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    gram_weight: float = 0.0
    gram_start: float = 0.5  # share of the run after which the Gram loss starts (its anchor: the teacher then)
    gram_refresh_epochs: int = 0  # 0: the anchor stays; else re-taken from the teacher every N epochs
    freeze_prototypes_epochs: float = 1.0
    frozen_backbone_epochs: float = 0.0
    layerscale_init: float = 0.0  # > 0: a random-init backbone's LayerScale factors start here (its own: 1e-5)
    amp: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PretrainConfig:
        """A saved config; keys of a newer format that this code does not know are refused by name."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown pretraining settings {', '.join(unknown)} (written by a newer version?)")
        return cls(**values)

    @property
    def lr_at_batch(self) -> float:
        """The peak learning rate at this run's global batch (DINOv2's sqrt_wrt_1024 rule)."""
        return self.lr * math.sqrt(self.batch * self.world / REFERENCE_BATCH)

    @property
    def distilling(self) -> bool:
        return self.distill_from is not None


# Flags each preset sets; what a preset leaves out is PretrainConfig's default (the paper's).
RECIPES: dict[str, dict[str, Any]] = {
    "scratch": {},
    "continue": {
        "lr": 5e-4,
        "warmup_epochs": 1.0,
        "weight_decay_end": 0.04,
        "momentum": 0.996,
        "warmup_teacher_temp": 0.07,
        "teacher_temp_epochs": 0.0,
        "epochs": 10,
        "frozen_backbone_epochs": 1.0,
        "gram_start": 0.0,
    },
    "small": {
        "epochs": 20,
        "local_crops": 4,
        "prototypes": 1024,
        "ibot_prototypes": 1024,
        "head_hidden": 1024,
        "warmup_epochs": 2.0,
        "momentum": 0.98,
        "teacher_temp_epochs": 5.0,
        "drop_path": 0.0,
        "freeze_prototypes_epochs": 0.5,
        "layerscale_init": 0.1,
    },
    "distill": {
        "local_crops": 0,
        "epochs": 20,
        "warmup_epochs": 1.0,
        "weight_decay_end": 0.04,
        "drop_path": 0.0,
        "layer_decay": 1.0,
        "patch_embed_lr_mult": 1.0,
    },
}
GRAM_WEIGHT = 2.0  # DINOv3's Gram loss weight, on for DINOv3 backbones unless --gram-weight says otherwise


@dataclass(frozen=True)
class ScheduleValues:
    """What the schedules give one optimizer step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    prototypes_frozen: bool
    backbone_frozen: bool


def cosine(start: float, end: float, progress: float) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def schedule_at(config: PretrainConfig, step: int, steps_per_epoch: int) -> ScheduleValues:
    """DINOv2's CosineScheduler per step: the rate warms up linearly from 0 and then follows a
    cosine to --min-lr; weight decay and teacher momentum follow cosines from their start to their
    end value; the teacher temperature rises linearly, then stays."""
    total = config.epochs * steps_per_epoch
    epoch = step / steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    peak = config.lr_at_batch
    if step < warmup:
        lr = peak * step / warmup
    else:
        lr = cosine(peak, config.min_lr, (step - warmup) / max(1.0, total - warmup))
    if config.teacher_temp_epochs > 0 and epoch < config.teacher_temp_epochs:
        temp = config.warmup_teacher_temp + (config.teacher_temp - config.warmup_teacher_temp) * (
            epoch / config.teacher_temp_epochs
        )
    else:
        temp = config.teacher_temp
    return ScheduleValues(
        lr=lr,
        weight_decay=cosine(config.weight_decay, config.weight_decay_end, step / max(1, total)),
        momentum=cosine(config.momentum, config.momentum_end, step / max(1, total)),
        teacher_temp=temp,
        prototypes_frozen=epoch < config.freeze_prototypes_epochs,
        backbone_frozen=epoch < config.frozen_backbone_epochs,
    )


EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed", "mask_token", "reg_token", "register_tokens", "storage")
NO_DECAY = re.compile(r"(\.bias$|norm|gamma|token|pos_embed|prototypes|storage)")


def layer_of(name: str, depth: int) -> int:
    """DINOv2's layer id of a backbone parameter: 0 for the embeddings and tokens, i + 1 for block i
    (a ConvNeXt: stage i), depth + 1 for what follows the blocks (the final norm)."""
    match = re.search(r"(?:blocks|stages)\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    if any(part in name for part in EMBEDDING_NAMES) or name.startswith(
        ("backbone.stem", "backbone.downsample_layers.0")
    ):
        return 0
    return depth + 1


@dataclass
class ParameterGroup:
    """Parameters that share a learning-rate and weight-decay multiple, and what they are."""

    params: list[nn.Parameter]
    lr_mult: float
    wd_mult: float
    role: str  # "backbone", "head" or "prototypes" (held for the first epochs)


def parameter_groups(backbone: nn.Module, heads: nn.Module, depth: int, config: PretrainConfig) -> list[ParameterGroup]:
    """Layer-wise rate decay (block i of N at layer_decay^(N - i), the embeddings at
    layer_decay^(N + 1) and times --patch-embed-lr-mult), no weight decay on biases, norms,
    LayerScale, tokens and position embeddings (dinov2/train/param_groups.py)."""
    groups: dict[tuple[float, float, str], list[nn.Parameter]] = {}
    for module, role in ((backbone, "backbone"), (heads, "head")):
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = 1.0
            if role == "backbone":
                lr_mult = config.layer_decay ** (depth + 1 - layer_of(name, depth))
                if "patch_embed" in name:
                    lr_mult *= config.patch_embed_lr_mult
            wd_mult = 0.0 if param.ndim <= 1 or NO_DECAY.search(name) else 1.0
            kind = "prototypes" if name.endswith("prototypes") else role
            groups.setdefault((lr_mult, wd_mult, kind), []).append(param)
    return [ParameterGroup(params, lr, wd, role) for (lr, wd, role), params in groups.items()]


def apply_schedule(optimizer: torch.optim.Optimizer, groups: list[ParameterGroup], values: ScheduleValues) -> None:
    """Set every group's rate and weight decay for this step; held groups (prototypes in the first
    epochs, the backbone while the heads warm up) get rate 0."""
    for group, settings in zip(optimizer.param_groups, groups):
        held = (settings.role == "prototypes" and values.prototypes_frozen) or (
            settings.role == "backbone" and values.backbone_frozen
        )
        group["lr"] = 0.0 if held else values.lr * settings.lr_mult
        group["weight_decay"] = values.weight_decay * settings.wd_mult
