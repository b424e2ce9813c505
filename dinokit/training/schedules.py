"""Learning-rate schedules: the seed's epoch milestones, or per-step poly / cosine decay after a
linear warmup (the DINOv2 paper's segmentation recipe: poly, power 1, 1500 warmup steps), or
DINOv3's `onecycle` (its WarmupOneCycleLR with pct_start 0 and final_div_factor inf, from
dinov3/eval/segmentation/schedulers.py: during the warmup the warmed-up rate times a linear decay
1 - step / total, then cosine from the full rate to 0 at (step + 1) / total).

The warmup follows mmcv's `linear` warmup, which Meta's mmseg configs use: during the first
`warmup` steps the decayed rate is scaled by 1 - (1 - 1e-6) (1 - step / warmup), from a
millionth of it up to all of it."""

from __future__ import annotations

import math

import torch

SCHEDULERS = ("multistep", "poly", "cosine", "onecycle")
WARMUP_RATIO = 1e-6  # mmcv's warmup_ratio in Meta's segmentation configs


def lr_factor(kind: str, step: int, total: int, warmup: int = 0, power: float = 1.0) -> float:
    """The multiple of the base learning rate at optimizer step `step` of `total`."""
    progress = min(step, total) / max(total, 1)
    warming = step < warmup
    warmup_factor = 1 - (1 - WARMUP_RATIO) * (1 - step / warmup) if warming else 1.0
    if kind == "onecycle":
        if warming:
            return warmup_factor * (1 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(step + 1, total) / max(total, 1)))
    factor = (1 - progress) ** power if kind == "poly" else 0.5 * (1 + math.cos(math.pi * progress))
    return factor * warmup_factor


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A per-step poly or cosine schedule with warmup; `step()` after every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0):
        self.kind, self.total_steps, self.warmup_steps = kind, total_steps, warmup_steps
        super().__init__(optimizer, lambda step: lr_factor(kind, step, total_steps, warmup_steps))

    def factor(self) -> float:
        return lr_factor(self.kind, self.last_epoch, self.total_steps, self.warmup_steps)

    def state_dict(self) -> dict:
        """The position only: a resumed run's schedule shape comes from its flags (a longer --steps
        stretches the decay to the new end), not from the checkpoint."""
        return {
            key: value
            for key, value in super().state_dict().items()
            if key not in ("kind", "total_steps", "warmup_steps")
        }


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    """`multistep`: MultiStepLR over epochs (step it once per epoch); `poly`/`cosine`: `StepSchedule`."""
    check_schedule(kind, warmup_steps)
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones or [], gamma)
    return StepSchedule(optimizer, kind, total_steps, warmup_steps)


def check_schedule(kind: str, warmup_steps: int) -> None:
    """A schedule's flags that fit together (train.py checks them before loading any data)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"--scheduler {kind}: choose one of {', '.join(SCHEDULERS)}")
    if warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {warmup_steps}")
    if warmup_steps and kind == "multistep":
        raise ValueError("--warmup-steps needs --scheduler poly or cosine (multistep changes the rate per epoch)")


def current_factor(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The multiple of the base rate that `scheduler` applies now (after a resume, for new base rates)."""
    if isinstance(scheduler, StepSchedule):
        return scheduler.factor()
    decays = sum(count for milestone, count in scheduler.milestones.items() if milestone <= scheduler.last_epoch)
    return scheduler.gamma**decays
