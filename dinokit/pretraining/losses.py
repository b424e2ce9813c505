"""The pretraining losses as functions of tensors: DINO on class tokens with Sinkhorn-Knopp
centring, iBOT on masked patches, the KoLeo regulariser (dinov2/loss/), DINOv3's Gram anchoring,
and the feature distillation terms. Sums that span processes are all-reduced under torchrun, so
the centring sees the global batch as DINOv2's does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STUDENT_TEMPERATURE = 0.1


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum `tensor` over the processes of a torchrun job, in place (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets [B, K] whose prototype marginals are uniform over the (global) batch: DINOv2's
    `sinkhorn_knopp_teacher` (SwAV's equal-partition constraint), which keeps the teacher from
    collapsing onto a few prototypes without a running centre."""
    q = torch.exp(logits.float() / temperature).t()  # [K, B]
    count = torch.tensor([float(q.shape[1])], device=q.device)
    all_reduce_sum(count)
    prototypes = q.shape[0]
    total = q.sum().reshape(1)
    all_reduce_sum(total)
    q /= total
    for _ in range(iterations):
        rows = q.sum(dim=1)
        all_reduce_sum(rows)
        q /= rows.unsqueeze(1)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= count
    q *= count
    return q.t()


def cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """-sum(teacher * log_softmax(student / 0.1)) per row."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / STUDENT_TEMPERATURE, dim=-1)).sum(-1)


def dino_loss(
    student_global: torch.Tensor, student_local: torch.Tensor, teacher_probs: torch.Tensor, batch: int
) -> torch.Tensor:
    """DINO's class-token loss: every student crop against every teacher global crop of the same
    image but its own view, averaged over the pairs and the batch. Crops are crop-major
    ([crops * B, K]); teacher_probs holds the 2 global crops' targets."""
    teachers = teacher_probs.chunk(2)
    terms, total = 0, student_global.new_zeros(())
    for index, student in enumerate(student_global.chunk(2)):
        total = total + cross_entropy(student, teachers[1 - index]).mean()  # the other view
        terms += 1
    if student_local.numel():
        for student in student_local.chunk(len(student_local) // batch):
            for teacher in teachers:
                total = total + cross_entropy(student, teacher).mean()
                terms += 1
    return total / terms


def ibot_loss(student_masked: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """iBOT's masked-patch loss: for each masked patch, the student's prediction (from the masked
    crop) against the teacher's (from the full crop), weighted 1 / masked patches of its crop,
    summed and divided by the number of crops (dinov2's iBOTPatchLoss.forward_masked)."""
    if not masks.any():
        return student_masked.new_zeros(()) + 0.0 * student_masked.sum()
    weights = (1.0 / masks.flatten(1).sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks.flatten(1))
    weights = weights[masks.flatten(1)]
    return (cross_entropy(student_masked, teacher_probs) * weights).sum() / len(masks)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate's regulariser (Sablayrolles et al.): -mean log distance
    of each L2-normalised vector to its nearest neighbour in the batch; spreads the class tokens."""
    if len(features) < 2:
        return features.new_zeros(())
    unit = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        similarity = unit @ unit.t()
        similarity.fill_diagonal_(-2.0)
        nearest = similarity.argmax(dim=1)
    distances = (unit - unit[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


def gram_matrix(patches: torch.Tensor) -> torch.Tensor:
    """[B, N, N] cosine similarities between an image's patch tokens."""
    unit = F.normalize(patches.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def gram_loss(student_patches: torch.Tensor, anchor_patches: torch.Tensor) -> torch.Tensor:
    """DINOv3's Gram anchoring: the mean squared difference between the student's patch-similarity
    matrices and an earlier teacher's (the Gram teacher), per image, so long training cannot wash
    the dense features' local structure out while the global loss keeps improving."""
    return F.mse_loss(gram_matrix(student_patches), gram_matrix(anchor_patches))


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, averaged over rows (any leading shape, features last)."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def patch_targets(teacher_patches: torch.Tensor, teacher_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The teacher's patch tokens [B, N_t, C] resampled to the student's token grid (patch 14 vs 16,
    or a ConvNeXt's stride 32): bilinear on the [C, H, W] map, as [B, N_s, C]."""
    if teacher_grid == grid:
        return teacher_patches
    batch, _, width = teacher_patches.shape
    maps = teacher_patches.transpose(1, 2).reshape(batch, width, *teacher_grid)
    maps = F.interpolate(maps.float(), size=grid, mode="bilinear", align_corners=False, antialias=True)
    return maps.flatten(2).transpose(1, 2)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of `probs`."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)


def spread(features: torch.Tensor) -> float:
    """How far apart a batch's unit-normalised features are: their per-dimension standard deviation,
    times sqrt(C) so that random directions give about 1 at any width; 0 when every image maps
    to the same vector (collapse)."""
    unit = F.normalize(features.detach().float(), dim=-1)
    return float(unit.std(dim=0).mean() * math.sqrt(unit.shape[-1])) if len(unit) > 1 else float("nan")
