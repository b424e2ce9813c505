"""The resume policy of train.py, as pure functions: what each flag may do when a run continues from
its last.pth (`RESUME_RULES`), which flags the checkpoint settles, that the model and data described
by this run are the checkpoint's, how many steps are left, and how a restored optimizer follows a
changed learning rate."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_config import canonical_name

KEEP = "keep"  # what the run is: taken from the checkpoint; another value given is refused
CHANGE = "change"  # taken from the checkpoint unless given; a new value is applied, printed and recorded
LOCAL = "local"  # where and how this process runs (no effect on the result): this invocation's own, not recorded

# What --resume does with each flag of train.py (a test checks that none is missing).
RESUME_RULES = {
    "task": KEEP,
    "data_dir": CHANGE,
    "classes": CHANGE,  # a moved dataset; its classes are checked against the checkpoint
    "imgsz": KEEP,
    "workers": LOCAL,
    "backbone": KEEP,
    "registers": KEEP,
    "source": CHANGE,
    "hub_dir": CHANGE,
    "weights": CHANGE,
    "no_pretrained": CHANGE,
    "fine_tune": KEEP,
    "head_layers": KEEP,
    "head_weights": KEEP,
    "recipe": KEEP,
    "epochs": CHANGE,
    "steps": CHANGE,
    "batch": KEEP,
    "lr": CHANGE,
    "weight_decay": CHANGE,
    "scheduler": KEEP,
    "scheduler_epochs": KEEP,
    "scheduler_gamma": KEEP,
    "warmup_steps": KEEP,
    "head_dropout": KEEP,
    "gradient_loss": KEEP,
    "head": KEEP,
    "queries": KEEP,
    "query_blocks": KEEP,
    "no_masked_attention": KEEP,
    "layer_decay": CHANGE,
    "backbone_lr": CHANGE,
    "mode": CHANGE,
    "short_side": CHANGE,
    "crop": CHANGE,
    "stride": CHANGE,
    "scales": CHANGE,
    "flip": CHANGE,
    "amp": CHANGE,
    "grad_checkpointing": LOCAL,
    "compile": LOCAL,
    "no_val_cache": LOCAL,
    "train_views": KEEP,
    "cache_ram_gb": LOCAL,
    "out_dir": LOCAL,
    "device": LOCAL,
    "seed": CHANGE,
    "resume": LOCAL,
    "exist_ok": LOCAL,
    "tensorboard": LOCAL,
    "tensorboard_images": LOCAL,
    "tensorboard_every": LOCAL,
    "dist_timeout": LOCAL,
}


@dataclass(frozen=True)
class FlagChange:
    """A flag a resumed run gave anew: recorded in the checkpoint's `overrides` and printed."""

    flag: str
    before: Any
    now: Any


def plain(value: Any) -> Any:
    """argparse values as plain Python types, so checkpoints load with weights_only=True."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a checkpoint records: every one but the LOCAL ones' effect-free values."""
    return {name: plain(value) for name, value in vars(args).items() if name in RESUME_RULES}


def settle_flags(
    args: argparse.Namespace, saved: dict[str, Any], given: frozenset[str], where: str
) -> list[FlagChange]:
    """Apply RESUME_RULES: a flag not `given` takes the checkpoint's value (`saved`); a KEEP flag given
    with another value is refused; a CHANGE flag given anew is returned as a change. Flags the
    checkpoint lacks (older formats) and LOCAL flags are this run's own."""
    changes = []
    for name, rule in RESUME_RULES.items():
        if name not in saved or rule == LOCAL:
            continue
        flag, before, now = f"--{name.replace('_', '-')}", saved[name], plain(getattr(args, name))
        if name not in given:
            setattr(args, name, before)
        elif now != before and rule == KEEP:
            raise ValueError(
                f"{where}: checkpoint was trained with {flag} {before!r} but this run has {now!r}; "
                "a resumed run keeps it (start a new run to change it)"
            )
        elif now != before:
            changes.append(FlagChange(flag, before, now))
    return changes


SOURCE_FAMILIES = {"hub": "meta", "local": "meta", "timm": "timm"}  # hub and local share Meta's parameter names


def check_model_matches(
    info: dict[str, Any], saved_args: dict[str, Any], args: argparse.Namespace, fields: Sequence[tuple], where: str
) -> None:
    """This run's flags and data (`fields`: the task's (name, checkpoint's, this run's)) describe the
    checkpoint's model; the first field that differs is named."""
    arch = info["arch"]
    common = [
        (
            "--backbone",
            canonical_name(arch["backbone"], arch["registers"]),
            canonical_name(args.backbone, args.registers),
        ),
        ("--source", SOURCE_FAMILIES[arch["source"]], SOURCE_FAMILIES[args.source]),
        ("--fine-tune", saved_args.get("fine_tune", args.fine_tune), args.fine_tune),
        ("--head-layers", len(arch["taps"]) if "taps" in arch else arch["head_layers"], args.head_layers),
        ("--scheduler", saved_args["scheduler"], args.scheduler),
        ("--recipe", saved_args["recipe"], args.recipe),
    ]
    for name, saved, given in [*common, *fields]:
        if saved != given:
            shown = arch["source"] if name == "--source" else saved
            raise ValueError(f"{where}: checkpoint was trained with {name} {shown!r} but this run has {given!r}")


def steps_done(history: list[dict[str, Any]], steps_per_epoch: int) -> int:
    """Optimizer steps taken in the epochs of `history` (its "step" column; rows from before that
    column existed are whole epochs, which only the split's length can count)."""
    return int(history[-1].get("step", len(history) * steps_per_epoch)) if history else 0


def plan_steps(
    args: argparse.Namespace, steps_per_epoch: int, history: list[dict[str, Any]], where: str | None
) -> tuple[int, int]:
    """(total optimizer steps, epochs) of the run. With --steps, the epochs are those the steps end
    in (the last one stops early); a resumed run (`history`) must have steps left."""
    done = steps_done(history, steps_per_epoch)
    if args.steps is not None:
        if done >= args.steps:
            raise ValueError(
                f"--steps {args.steps}: {where} already holds {done} steps; give a larger --steps to train on"
            )
        return args.steps, len(history) + math.ceil((args.steps - done) / steps_per_epoch)
    if len(history) >= args.epochs:
        raise ValueError(
            f"--epochs {args.epochs}: {where} already holds {len(history)} epochs; give a larger --epochs to train on"
        )
    return done + (args.epochs - len(history)) * steps_per_epoch, args.epochs


def follow_schedule_flags(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    base_lrs: Sequence[float],
    weight_decay: float,
    factor: float,
) -> None:
    """After restoring optimizer state: apply the base rates (--lr/--backbone-lr) and --weight-decay
    given now, so the schedule goes on as if the run had started with them (a restored state would
    otherwise keep the old values); `factor`: the multiple of the base rate the schedule applies now
    (dinokit/training/schedules.py current_factor)."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
        group["initial_lr"] = base
        group["weight_decay"] = weight_decay
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """fp16 loss-scaler state when both the checkpoint and this run use one: a bf16/fp32 run saved
    an empty state, and a bf16/fp32 resume needs none."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def resume_command(argv: Sequence[str], last: Path, script: str = "train.py") -> str:
    """The command that continues an interrupted run: the same flags, --resume its last.pth."""
    command = list(argv)
    if "--resume" in command:
        del command[command.index("--resume") : command.index("--resume") + 2]
    return f"python {script} {' '.join(command)} --resume {last}"


def interrupted_message(argv: Sequence[str], last: Path, epochs_done: int) -> str:
    """What a run stopped with Ctrl-C says: where it stands and the command that continues it."""
    return f"\nInterrupted. {last} holds epoch {epochs_done}; continue with:\n  {resume_command(argv, last)}"


def diverged_message(error: Exception, last: Path, epochs_done: int) -> str:
    """What a run whose loss became nan/inf says: the step, the last good checkpoint, the fix."""
    kept = f"{last} (epoch {epochs_done}) is the last good checkpoint" if last.exists() else "no checkpoint was written"
    return f"training diverged: {error}; {kept}; lower --lr or use --amp off"
