"""The two ways pretrain.py trains a backbone, behind one contract (`forward(batch, values) ->
(loss, statistics)`, `after_step`, the backbones to write), so that the loop, the checkpoint and
the outputs are shared:

- `SelfDistillation`: DINOv2's (and with Gram anchoring DINOv3's) self-supervised recipe: a
  student and its EMA teacher, DINO on class tokens, iBOT on masked patches, KoLeo.
- `FeatureDistillation`: a frozen teacher backbone distilled into a student through projection
  heads on the class token and the patch tokens.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.pretraining.crops import Batch
from dinokit.pretraining.losses import (
    cosine_distance,
    dino_loss,
    entropy,
    gram_loss,
    ibot_loss,
    koleo_loss,
    patch_targets,
    sinkhorn_knopp,
    spread,
)
from dinokit.pretraining.networks import FeatureProjection, ProjectionHead, TokenBackbone
from dinokit.pretraining.recipe import PretrainConfig, ScheduleValues


class SelfDistillation(nn.Module):
    """Student (with drop-path) and EMA teacher of the same backbone, each with a DINO and an iBOT head."""

    def __init__(self, backbone: nn.Module, config: PretrainConfig):
        super().__init__()
        self.config = config
        self.student = TokenBackbone(backbone)
        if config.layerscale_init > 0 and not (config.pretrained or config.weights):
            self.student.set_layerscale(config.layerscale_init)
        width = self.student.embed_dim
        self.student_heads = nn.ModuleDict(
            {
                "dino": ProjectionHead(
                    width, config.prototypes, config.head_hidden, config.head_bottleneck, config.head_batch_norm
                ),
                "ibot": ProjectionHead(width, config.ibot_prototypes, config.head_hidden, config.head_bottleneck),
            }
        )
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.teacher_heads = copy.deepcopy(self.student_heads).requires_grad_(False)
        self.gram_anchor: TokenBackbone | None = None  # set when the Gram loss starts (`take_gram_anchor`)
        self.student.set_drop_path(config.drop_path)

    @property
    def trained_backbone(self) -> TokenBackbone:
        return self.student

    @property
    def trained_heads(self) -> nn.Module:
        return self.student_heads

    def train(self, mode: bool = True) -> SelfDistillation:
        super().train(mode)
        self.teacher.eval()  # no drop-path, ever
        if self.gram_anchor is not None:
            self.gram_anchor.eval()
        return self

    def forward(self, batch: Batch, values: ScheduleValues) -> tuple[torch.Tensor, dict[str, float]]:
        config, size = self.config, batch.size
        masks = batch.masks.flatten(1)  # [2B, N]
        with torch.no_grad():
            teacher_cls, teacher_patches = self.teacher(batch.global_crops)
            teacher_logits = self.teacher_heads["dino"](teacher_cls)
            teacher_dino = sinkhorn_knopp(teacher_logits, values.teacher_temp)
            teacher_ibot = sinkhorn_knopp(self.teacher_heads["ibot"](teacher_patches[masks]), values.teacher_temp)
        student_cls, student_patches = self.student(batch.global_crops, batch.masks)
        local_cls = self.student(batch.local_crops)[0] if batch.local_crops.numel() else student_cls[:0]
        dino = dino_loss(
            self.student_heads["dino"](student_cls), self.student_heads["dino"](local_cls), teacher_dino, size
        )
        ibot = ibot_loss(self.student_heads["ibot"](student_patches[masks]), teacher_ibot, batch.masks)
        koleo = sum(koleo_loss(crop) for crop in student_cls.chunk(2))
        loss = config.dino_weight * dino + config.ibot_weight * ibot + config.koleo_weight * koleo
        parts = {"dino": dino, "ibot": ibot, "koleo": koleo}
        if self.gram_anchor is not None and config.gram_weight > 0:
            with torch.no_grad():
                anchor_patches = self.gram_anchor(batch.global_crops)[1]
            gram = gram_loss(student_patches, anchor_patches)
            loss = loss + config.gram_weight * gram
            parts["gram"] = gram
        teacher_probs = F.softmax(teacher_logits.float() / values.teacher_temp, dim=-1)
        statistics = {name: float(value.detach()) for name, value in parts.items()}
        statistics["teacher_entropy"] = float(entropy(teacher_probs).mean())  # ~0: one prototype per image
        statistics["prototype_usage"] = float(entropy(teacher_probs.mean(0)).exp())  # effective prototypes used
        statistics["feature_spread"] = spread(teacher_cls)
        return loss, statistics

    @torch.no_grad()
    def after_step(self, values: ScheduleValues) -> None:
        """The teacher follows the student: t = m t + (1 - m) s, backbone and heads."""
        for ours, theirs in ((self.teacher, self.student), (self.teacher_heads, self.student_heads)):
            teacher_params = [p for p in ours.parameters()]
            student_params = [p.detach() for p in theirs.parameters()]
            torch._foreach_mul_(teacher_params, values.momentum)
            torch._foreach_add_(teacher_params, student_params, alpha=1 - values.momentum)

    def take_gram_anchor(self) -> None:
        """DINOv3's Gram teacher: a frozen copy of the teacher as it is now."""
        self.gram_anchor = copy.deepcopy(self.teacher).requires_grad_(False).eval()

    def outputs(self) -> dict[str, TokenBackbone]:
        """backbone.pth: the EMA teacher (what DINOv2 evaluates); student.pth beside it."""
        return {"backbone.pth": self.teacher, "student.pth": self.student}

    def monitored(self) -> TokenBackbone:
        return self.teacher


class FeatureDistillation(nn.Module):
    """A frozen teacher backbone's class and patch tokens as targets for a student's, through two
    projection heads (student width -> teacher width), with a cosine loss on each; the teacher's
    patch map is resampled to the student's token grid."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: PretrainConfig):
        super().__init__()
        self.config = config
        self.student = TokenBackbone(student)
        self.teacher = TokenBackbone(teacher).requires_grad_(False).eval()
        width, target = self.student.embed_dim, self.teacher.embed_dim
        self.student_heads = nn.ModuleDict(
            {
                "cls": FeatureProjection(width, target, config.head_hidden),
                "patch": FeatureProjection(width, target, config.head_hidden),
            }
        )
        self.gram_anchor = None
        self.student.set_drop_path(config.drop_path)

    @property
    def trained_backbone(self) -> TokenBackbone:
        return self.student

    @property
    def trained_heads(self) -> nn.Module:
        return self.student_heads

    def train(self, mode: bool = True) -> FeatureDistillation:
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_size(self, side: int) -> int:
        """The nearest size the teacher's patch divides (patch 14 vs 16, a ConvNeXt's stride 32)."""
        patch = self.teacher.patch_size
        return max(patch, round(side / patch) * patch)

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """The crops at `teacher_size`."""
        size = [self.teacher_size(side) for side in images.shape[-2:]]
        if list(images.shape[-2:]) == size:
            return images
        return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)

    def forward(self, batch: Batch, values: ScheduleValues) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch.global_crops
        teacher_images = self.teacher_input(images)
        with torch.no_grad():
            teacher_cls, teacher_patches = self.teacher(teacher_images)
        student_cls, student_patches = self.student(images)
        student_grid = grid_of(images, self.student)
        targets = patch_targets(teacher_patches, grid_of(teacher_images, self.teacher), student_grid)
        cls_loss = cosine_distance(self.student_heads["cls"](student_cls), teacher_cls)
        patch_loss = cosine_distance(self.student_heads["patch"](student_patches), targets)
        statistics = {
            "cls_distance": float(cls_loss.detach()),
            "patch_distance": float(patch_loss.detach()),
            "feature_spread": spread(student_cls),
        }
        return cls_loss + patch_loss, statistics

    def after_step(self, values: ScheduleValues) -> None:
        """Nothing follows the student."""

    def take_gram_anchor(self) -> None:
        """No Gram anchoring in distillation: the teacher's patch tokens are the dense target."""

    def outputs(self) -> dict[str, TokenBackbone]:
        return {"backbone.pth": self.student}

    def monitored(self) -> TokenBackbone:
        return self.student


def grid_of(images: torch.Tensor, backbone: TokenBackbone) -> tuple[int, int]:
    """The token grid a backbone makes of `images`."""
    return images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
