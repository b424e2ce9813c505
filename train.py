"""Train a linear segmentation head on DINOv2 / DINOv3 features (frozen backbone), or fine-tune everything.

    python train.py --epochs 20 --imgsz 640 640 --out-dir transfer_learning --batch 2
    python train.py --epochs 20 --imgsz 640 640 --out-dir fine_tuning --batch 2 --fine-tune
    python train.py --recipe paper --data-dir input/voc_aug --out-dir paper_lin --head-layers 1   # the paper's protocol
    python train.py --recipe dinov3 --backbone dinov3_vits16 --weights dinov3_vits16_pretrain_lvd1689m-08c60483.pth \
        --head-layers 1 --out-dir dinov3_lin                                                     # DINOv3's protocol

    python train.py --task depth --data-dir input/nyu --imgsz 640 480 --out-dir nyu_depth   # a depth head on RGB-D data

Writes to outputs/<out-dir>/: best_model_loss.pth, best_model_iou.pth (depth: best_model_rmse.pth), final_model.pth,
last.pth (for --resume), metrics.csv, loss/accuracy/miou PNG curves (depth: loss/rmse/abs_rel/delta1;
per-epoch figures, at the training size) and best_validation.json (the best checkpoint at original
resolution).
A run owns that folder: another run's files there are refused unless --resume continues them or
--exist-ok starts over, and a lock keeps a second run out while this one works (dinokit/runs/run_folder.py).
Runs under torchrun for several GPUs or machines (see README).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import config
from checkpoint import RunCheckpoints, backbone_record, depth_info, load_checkpoint, load_model_state, model_info
from cli import (
    RANDOM_INIT,
    FlagParser,
    add_backbone_args,
    add_device_args,
    add_mode_args,
    at_least,
    backbone_kwargs,
    backbone_weights,
    mode_from_args,
    non_negative,
    output_folder,
    positive,
    random_init_note,
    run_cli,
    unit_interval,
)
from datasets import (
    SegmentationDataset,
    ViewsDataset,
    build_datasets,
    build_depth_datasets,
    epoch_seed,
    make_loader,
    set_epoch,
    shard_indices,
)
from dinokit.backbones.loading import weights_digest
from dinokit.backbones.released_heads import read_checked_head
from dinokit.data.depth_files import DepthSpec
from dinokit.data.file_kinds import fingerprint_files
from dinokit.data.labels import DatasetSpec, load_dataset_spec
from dinokit.data.resize import check_imgsz, eval_transform, round_to_patch
from dinokit.depth.released import depth_taps
from dinokit.prediction.depth_maps import colorize
from dinokit.prediction.drawing import overlay
from dinokit.prediction.modes import InferenceMode
from dinokit.runs.reports import DEPTH_CURVES, SEGMENTATION_CURVES, save_plots, write_csv
from dinokit.runs.run_folder import RunLock, claim_run_folder, missing_folders, remove_empty_folders
from dinokit.runs.tensorboard_log import TrainingBoard
from dinokit.training.feature_cache import FeatureCache, default_cache_budget
from dinokit.training.schedules import SCHEDULERS, StepSchedule, build_scheduler, check_schedule, current_factor
from dinokit.writing import write_json
from engine import (
    SCORINGS,
    DepthTarget,
    EpochResult,
    LoopSettings,
    NonFiniteLossError,
    cache_features,
    train_one_epoch,
    validate,
)
from evaluation import depth_report_lines, evaluate_depth_pairs, evaluate_pairs, report_json, report_lines
from inference import Predictor
from model import BackboneModel, DinoDepth, Dinov2Segmentation
from model_config import HEAD_LAYERS, canonical_name, get_backbone_spec
from utils import (
    all_reduce_sum,
    distributed,
    init_distributed,
    is_main_process,
    on_main_process,
    rank,
    seed_everything,
    select_precision,
    sync_buffers,
    world_size,
)

# What --resume does with each flag (every flag of get_args_parser; a test checks that none is missing):
KEEP = "keep"  # what the run is: taken from the checkpoint; another value given is refused
CHANGE = "change"  # taken from the checkpoint unless given; a new value is applied, printed and recorded
LOCAL = "local"  # where and how this process runs (no effect on the result): this invocation's own, not recorded
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


def main(args: argparse.Namespace) -> None:
    resumed = load_checkpoint(args.resume) if args.resume else None
    changes = resolve_defaults(args, resumed)
    check_args(args)
    device = init_distributed(args.device, args.dist_timeout)
    seed_everything(args.seed)
    out_dir = run_folder(args)
    new_folders = missing_folders(out_dir)
    lock = claim_folder(out_dir, args)
    try:
        run = build_run(args, device, out_dir, resumed)
        finished = False
        try:
            if resumed is not None:
                restore(run, resumed, changes)
            fit(run)
            final_evaluation(run)
            finished = True
        except NonFiniteLossError as err:
            last = out_dir / "last.pth"
            kept = (
                f"{last} (epoch {run.checkpoints.epochs_done}) is the last good checkpoint"
                if last.exists()
                else "no checkpoint was written"
            )
            raise NonFiniteLossError(f"training diverged: {err}; {kept}; lower --lr or use --amp off") from err
        except KeyboardInterrupt:
            print_resume_hint(out_dir, run.checkpoints.epochs_done)
            sys.exit(130)
        finally:
            run.close(finished)
    finally:
        if lock is not None:
            lock.release()
        remove_empty_folders(new_folders)  # a run that failed before writing anything leaves no folder


def run_folder(args: argparse.Namespace) -> Path:
    """outputs/<--out-dir>; a resumed run without --out-dir continues in its checkpoint's folder."""
    if args.out_dir is None and args.resume:
        return Path(args.resume).parent
    default = "fine_tuning" if args.fine_tune else "transfer_learning"
    return output_folder(args.out_dir or (f"depth_{default}" if args.task == "depth" else default))


def resolve_defaults(args: argparse.Namespace, resumed: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """Settle every flag: a new run takes its --recipe's defaults (config.RECIPES) for those not
    given; a resumed run follows RESUME_RULES against its checkpoint's flags. Training is counted in
    --epochs or --steps, whichever was given (or the recipe's). Returns the recorded changes:
    (flag, checkpoint's value, this run's)."""
    if args.epochs is not None and args.steps is not None:
        raise ValueError("--epochs and --steps exclude each other: count training in one of them")
    counted_in = "epochs" if args.epochs is not None else "steps" if args.steps is not None else None
    saved = resumed.get("args", {}) if resumed is not None else {}
    given = getattr(args, "given_flags", frozenset(vars(args)))
    changes = []
    for name, rule in RESUME_RULES.items():
        if name not in saved or rule == LOCAL:  # a new run, an older checkpoint without the flag, or LOCAL
            continue
        flag, before, now = f"--{name.replace('_', '-')}", saved[name], _plain(getattr(args, name))
        if name not in given:
            setattr(args, name, before)
        elif now != before and rule == KEEP:
            raise ValueError(
                f"{args.resume}: checkpoint was trained with {flag} {before!r} but this run has {now!r}; "
                "a resumed run keeps it (start a new run to change it)"
            )
        elif now != before:
            changes.append((flag, before, now))
    args.recipe = args.recipe or "seed"
    for name, default in config.RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.head_layers is None:  # a ViT's last four blocks; a ConvNeXt's last stage
        args.head_layers = max(get_backbone_spec(args.backbone, args.registers).head_layers())
    if counted_in == "epochs":
        args.steps = None
    elif args.steps is not None:
        args.epochs = None  # set from the training split's length (plan_steps)
    return changes


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values that would only fail later, with the flag's name in the message."""
    check_schedule(args.scheduler, args.warmup_steps)
    check_imgsz(args.imgsz)
    if args.train_views and args.fine_tune:
        raise ValueError("--train-views / --cache-train-features need a frozen backbone; drop --fine-tune")
    if args.grad_checkpointing and not args.fine_tune:
        raise ValueError("--grad-checkpointing only matters with --fine-tune (a frozen backbone stores no activations)")
    cropped = args.recipe in ("paper", "dinov3")
    if cropped and args.imgsz[0] != args.imgsz[1]:
        raise ValueError(
            f"--imgsz {args.imgsz[0]} {args.imgsz[1]}: --recipe {args.recipe} trains on square crops; "
            "give one side twice"
        )
    if cropped and args.train_views == 1:
        raise ValueError(
            "--train-views 1 / --cache-train-features compute features of un-augmented images once; "
            f"--recipe {args.recipe} needs random crops: give --train-views 2 or more"
        )
    spec = get_backbone_spec(args.backbone, args.registers)
    if args.recipe == "dinov3" and spec.family != "dinov3":
        print(f"Note: --recipe dinov3 on {spec.hub_name}: Meta's DINOv3 protocol on a DINOv2 backbone.")
    if args.task == "depth":
        check_depth_args(args)
    elif args.gradient_loss:
        raise ValueError("--gradient-loss weighs a depth loss: it needs --task depth")


def check_depth_args(args: argparse.Namespace) -> None:
    """What a depth run cannot take, each refusal with its reason."""
    if args.recipe in ("paper", "dinov3"):
        raise ValueError(
            f"--recipe {args.recipe} with --task depth: its random rescale and crops change how near things look "
            "while their metres stay the same; depth trains with --recipe seed (depth-safe augmentation)"
        )
    if args.head_weights:
        raise ValueError(
            "--head-weights with --task depth: Meta's depth heads run as released (infer_image.py / evaluate.py "
            "--head-weights nyu_linear4); a depth run trains a head of its own"
        )
    if args.classes:
        raise ValueError("--classes with --task depth: an RGB-D folder is described by its depth.json")
    if args.head_dropout:
        raise ValueError("--head-dropout applies to segmentation heads; a depth head has none")
    if get_backbone_spec(args.backbone, args.registers).is_convnext:
        raise ValueError(f"--task depth on {args.backbone}: depth heads read ViT blocks with their class token")


def claim_folder(out_dir: Path, args: argparse.Namespace) -> RunLock | None:
    """Rank 0 claims the run folder (dinokit/runs/run_folder.py); every rank gets its verdict."""
    return on_main_process(lambda: claim_run_folder(out_dir, resume=args.resume, exist_ok=args.exist_ok))


@dataclass
class Run:
    """Everything one training run is made of, built by `build_run`."""

    args: argparse.Namespace
    out_dir: Path
    imgsz: tuple[int, int]  # --imgsz rounded up to the patch size
    total_steps: int  # optimizer steps of the whole run (--steps, or --epochs x batches per epoch)
    spec: DatasetSpec | DepthSpec  # classes.json / VOC, or an RGB-D folder's depth.json
    settings: LoopSettings
    train_loader: torch.utils.data.DataLoader
    valid_loader: torch.utils.data.DataLoader
    model: BackboneModel  # Dinov2Segmentation, or DinoDepth with --task depth
    train_model: torch.nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped per epoch (multistep) or per optimizer step
    scaler: torch.amp.GradScaler
    checkpoints: RunCheckpoints
    valid_cache: FeatureCache | None = None  # frozen backbone: validation features computed once
    train_cache: FeatureCache | None = None  # --train-views: K views of every training image

    def close(self, finished: bool) -> None:
        """Release the caches; an unfinished run keeps its resumable training views on disk."""
        for cache in (self.valid_cache, self.train_cache):
            if cache is not None:
                cache.close(keep=not finished)


def build_run(args: argparse.Namespace, device: torch.device, out_dir: Path, resumed: dict[str, Any] | None) -> Run:
    """Data (checked), model, optimizer, schedule, caches and checkpoint files of a run."""
    patch_size = get_backbone_spec(args.backbone, args.registers).patch_size
    imgsz = round_to_patch(args.imgsz, patch_size)
    if list(imgsz) != list(args.imgsz):
        print(
            f"Note: --imgsz {args.imgsz[0]} {args.imgsz[1]} rounded up to {imgsz[0]} {imgsz[1]} "
            f"(a multiple of the backbone's patch size {patch_size})."
        )
    spec, train_loader, valid_loader = build_data(args, imgsz, device)
    total_steps, args.epochs = plan_steps(args, len(train_loader), resumed)  # --steps: the epochs they end in
    print_plan(args, total_steps, len(train_loader))
    if resumed is not None:  # a mismatch costs seconds, not a backbone download
        check_resume_matches(resumed, args, spec, args.resume)
    model = build_model(args, spec, resumed, device)
    amp_dtype = select_precision(device, args.amp)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(
        optimizer,
        args.scheduler,
        total_steps=total_steps,
        warmup_steps=args.warmup_steps,
        milestones=args.scheduler_epochs,
        gamma=args.scheduler_gamma,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    print_model(model, args, amp_dtype)
    recorded = {name: _plain(value) for name, value in vars(args).items() if name in RESUME_RULES}
    depth = args.task == "depth"
    checkpoints = RunCheckpoints(
        out_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        info=depth_info(
            model,
            imgsz,
            dataset=Path(args.data_dir).name,
            data_dir=str(Path(args.data_dir).resolve()),
            depth_scale=spec.depth_scale,
            eval_crop=spec.eval_crop,
        )
        if depth
        else model_info(model, spec, imgsz, data_dir=str(Path(args.data_dir).resolve())),
        args=recorded,
        best_on=SCORINGS[args.task].best,
        backbone=backbone_record(args),
    )
    valid_cache, train_cache = build_caches(args, model, train_loader.dataset, imgsz, amp_dtype, out_dir)
    return Run(
        args=args,
        out_dir=out_dir,
        imgsz=imgsz,
        total_steps=total_steps,
        spec=spec,
        settings=loop_settings(args, spec, device, amp_dtype),
        train_loader=train_loader,
        valid_loader=valid_loader,
        model=model,
        train_model=distribute(model, device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        checkpoints=checkpoints,
        valid_cache=valid_cache,
        train_cache=train_cache,
    )


def loop_settings(
    args: argparse.Namespace, spec: DatasetSpec | DepthSpec, device: torch.device, amp_dtype: torch.dtype | None
) -> LoopSettings:
    """What the loop needs to know of the task: classes and ignore index, or the metres that count."""
    if args.task == "depth":
        return LoopSettings(
            device, amp_dtype=amp_dtype, depth=DepthTarget(spec.min_depth, spec.max_depth, args.gradient_loss)
        )
    return LoopSettings(device, len(spec.classes), spec.ignore_index, amp_dtype)


def print_plan(args: argparse.Namespace, total_steps: int, steps_per_epoch: int) -> None:
    epochs = f"{args.epochs} epoch{'s' * (args.epochs != 1)} of {steps_per_epoch}"
    warmup = f" after {args.warmup_steps} warmup steps" if args.warmup_steps else ""
    dropout = f", Dropout2d {args.head_dropout:g} before the head" if args.head_dropout else ""
    print(
        f"Recipe {args.recipe}: {total_steps:,} steps of batch {args.batch} ({epochs}), AdamW lr {args.lr:g} "
        f"weight decay {args.weight_decay:g}, {args.scheduler} schedule{warmup}{dropout}."
    )
    if args.warmup_steps >= total_steps:
        print(
            f"Note: --warmup-steps {args.warmup_steps} is not shorter than the run ({total_steps} steps): "
            "the learning rate never reaches --lr."
        )


def build_model(
    args: argparse.Namespace, spec: DatasetSpec | DepthSpec, resumed: dict[str, Any] | None, device: torch.device
) -> BackboneModel:
    """The task's model on `device`: segmentation (its head from Meta's released one with
    --head-weights), or depth (Meta's linear depth head over its blocks, with BatchNorm, centred padding)."""
    normalization = resumed["model_info"]["arch"].get("normalization") if resumed is not None else None
    if args.task == "depth":
        model = DinoDepth(
            head="linear",
            taps=depth_taps(args.backbone, args.head_layers, args.registers),
            min_depth=spec.min_depth,
            max_depth=spec.max_depth,
            fine_tune=args.fine_tune,
            batch_norm=True,
            normalization=normalization,
            **backbone_kwargs(args),
        )
    else:
        model = segmentation_model(args, spec, resumed, normalization)
    model.to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.compile:
        model.compile_backbone()
    return model


def segmentation_model(
    args: argparse.Namespace, spec: DatasetSpec, resumed: dict[str, Any] | None, normalization: str | None
) -> Dinov2Segmentation:
    """The segmentation model, its head from Meta's released one with --head-weights."""
    # Meta's heads and recipe use their centred padding; a resumed run keeps whatever it had.
    if resumed is not None:
        padding = resumed["model_info"]["arch"].get("padding", "bottom_right")
    else:
        padding = "center" if args.head_weights or args.recipe == "paper" else "bottom_right"
    model = Dinov2Segmentation(
        len(spec.classes),
        fine_tune=args.fine_tune,
        head_layers=args.head_layers,
        padding=padding,
        dropout=args.head_dropout,
        normalization=normalization,
        **backbone_kwargs(args),
    )
    if args.head_weights and resumed is None:
        load_released_head(model, args, spec)
    return model


def print_model(model: BackboneModel, args: argparse.Namespace, amp_dtype: torch.dtype | None) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = f"{str(amp_dtype).removeprefix('torch.')} autocast" if amp_dtype else "fp32"
    print(
        f"{total:,} total parameters, {trainable:,} trainable "
        f"({'fine-tuning' if args.fine_tune else 'frozen backbone'}); precision: {precision}."
    )
    spec = model.spec
    print(f"Backbone {spec.hub_name}: patch {spec.patch_size}, weights under the {spec.licence}.")
    if args.no_pretrained:
        print(f"warning: {RANDOM_INIT}")


def build_caches(
    args: argparse.Namespace,
    model: BackboneModel,
    train_set: SegmentationDataset,
    imgsz: tuple[int, int],
    amp_dtype: torch.dtype | None,
    out_dir: Path,
) -> tuple[FeatureCache | None, FeatureCache | None]:
    """The frozen backbone's feature caches: validation (unless --no-val-cache) and --train-views."""
    if args.fine_tune:
        return None, None
    budget = int(args.cache_ram_gb * 1e9) if args.cache_ram_gb is not None else default_cache_budget()
    targets = torch.float32 if args.task == "depth" else torch.uint8  # metres, or class indices
    valid = None if args.no_val_cache else FeatureCache("valid", budget, out_dir, rank=rank(), target_dtype=targets)
    train = None
    if args.train_views:
        key = train_views_key(args, model, train_set, imgsz, amp_dtype)
        train = FeatureCache(
            "train_views", budget, out_dir, views=args.train_views, rank=rank(), key=key, target_dtype=targets
        )
    return valid, train


def build_data(
    args: argparse.Namespace, imgsz: tuple[int, int], device: torch.device
) -> tuple[DatasetSpec | DepthSpec, torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """The dataset description (classes, or an RGB-D folder's depth.json), checked, and the two loaders."""
    normalization = get_backbone_spec(args.backbone, args.registers).normalization(args.weights)
    rgbd = (Path(args.data_dir) / "depth.json").is_file() and not (Path(args.data_dir) / "train_labels").is_dir()
    if args.task != "depth" and rgbd:
        raise ValueError(f"{args.data_dir}: an RGB-D folder (depth.json, no train_labels/): add --task depth")
    if args.task == "depth":
        train_set, valid_set, spec = depth_data(args, imgsz, normalization)
    else:
        train_set, valid_set, spec = segmentation_data(args, imgsz, normalization)
    if args.batch > len(train_set):
        raise ValueError(
            f"--batch {args.batch} is larger than the training split ({len(train_set)} images in {args.data_dir})"
        )
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, args.batch, shuffle=True, workers=args.workers, pin_memory=pin)
    valid_loader = make_loader(valid_set, args.batch, shuffle=False, workers=args.workers, pin_memory=pin)
    print(
        f"Training images: {len(train_set)}, validation images: {len(valid_set)}, "
        f"size {imgsz[0]}x{imgsz[1]}, device {device}"
    )
    if world_size() > 1:
        print(
            f"Distributed: {world_size()} processes x batch {args.batch} = global batch {args.batch * world_size()} "
            f"per step ({'NCCL' if device.type == 'cuda' else 'gloo'}); --lr applies to the global batch."
        )
    return spec, train_loader, valid_loader


def segmentation_data(
    args: argparse.Namespace, imgsz: tuple[int, int], normalization: tuple
) -> tuple[SegmentationDataset, SegmentationDataset, DatasetSpec]:
    """The two splits of a segmentation folder (mask format decided by the full check) and its classes."""
    spec = load_dataset_spec(args.data_dir, args.classes)
    print(f"{len(spec.classes)} classes from {spec.source}: {', '.join(spec.classes)}")
    train_set, valid_set, check = build_datasets(
        args.data_dir,
        imgsz,
        spec,
        threads=min(8, os.cpu_count() or 1),
        seed=args.seed,
        recipe=args.recipe,
        normalization=normalization,
    )
    print(
        f"Checked {check.pairs} image/mask pairs in {check.seconds:.1f} s (every file decoded); labelled pixels: "
        + ", ".join(f"{split} {count:,}" for split, count in check.labelled.items())
    )
    for note in check.notes:
        print(f"Note: {note}")
    return train_set, valid_set, check.spec


def depth_data(
    args: argparse.Namespace, imgsz: tuple[int, int], normalization: tuple
) -> tuple[SegmentationDataset, SegmentationDataset, DepthSpec]:
    """The two splits of an RGB-D folder (every depth file read and checked) and its depth.json."""
    started = time.perf_counter()
    train_set, valid_set, spec, valid_pixels = build_depth_datasets(
        args.data_dir, imgsz, seed=args.seed, normalization=normalization
    )
    crop = f", evaluation crop {spec.eval_crop}" if spec.eval_crop else ""
    print(
        f"Depth from {spec.source}: {spec.min_depth:g}-{spec.max_depth:g} m, PNG units per metre "
        f"{spec.depth_scale:g}{crop}"
    )
    print(
        f"Checked {len(train_set) + len(valid_set)} image/depth pairs in {time.perf_counter() - started:.1f} s; "
        "valid depth pixels: " + ", ".join(f"{split} {count:,}" for split, count in valid_pixels.items())
    )
    return train_set, valid_set, spec


def plan_steps(args: argparse.Namespace, steps_per_epoch: int, resumed: dict[str, Any] | None) -> tuple[int, int]:
    """(total optimizer steps, epochs) of the run. With --steps, the epochs are those the steps end
    in (the last one stops early); a resumed run must have steps left."""
    history = resumed["history"] if resumed is not None else []
    done = steps_done(history, steps_per_epoch)
    if args.steps is not None:
        if done >= args.steps:
            raise ValueError(
                f"--steps {args.steps}: {args.resume} already holds {done} steps; give a larger --steps to train on"
            )
        return args.steps, len(history) + math.ceil((args.steps - done) / steps_per_epoch)
    if len(history) >= args.epochs:
        raise ValueError(
            f"--epochs {args.epochs}: {args.resume} already holds {len(history)} epochs; "
            "give a larger --epochs to train on"
        )
    return done + (args.epochs - len(history)) * steps_per_epoch, args.epochs


def steps_done(history: list[dict[str, Any]], steps_per_epoch: int) -> int:
    """Optimizer steps taken in the epochs of `history` (its "step" column; rows from before that
    column existed are whole epochs)."""
    return int(history[-1].get("step", len(history) * steps_per_epoch)) if history else 0


def check_resume_matches(
    checkpoint: dict[str, Any], args: argparse.Namespace, spec: DatasetSpec | DepthSpec, path: str
) -> None:
    """The flags and the dataset must describe the checkpoint's model; name the first field that differs."""
    info = checkpoint["model_info"]
    arch = info["arch"]
    family = {"hub": "meta", "local": "meta", "timm": "timm"}  # hub and local share Meta's parameter names
    fields = [
        (
            "--backbone",
            canonical_name(arch["backbone"], arch["registers"]),
            canonical_name(args.backbone, args.registers),
        ),
        ("--source", family[arch["source"]], family[args.source]),
        ("--fine-tune", checkpoint.get("args", {}).get("fine_tune", args.fine_tune), args.fine_tune),
        ("--head-layers", len(arch["taps"]) if "taps" in arch else arch.get("head_layers", 4), args.head_layers),
        ("--scheduler", checkpoint.get("args", {}).get("scheduler", "multistep"), args.scheduler),
        ("--recipe", checkpoint.get("args", {}).get("recipe", "seed"), args.recipe),
    ]
    if args.task == "depth":
        fields.append(("depth range", [arch["min_depth"], arch["max_depth"]], [spec.min_depth, spec.max_depth]))
        # older depth checkpoints did not record how their files were read: nothing to compare
        fields.append(("depth.json depth_scale", info.get("depth_scale", spec.depth_scale), spec.depth_scale))
        fields.append(("depth.json eval_crop", info.get("eval_crop", spec.eval_crop), spec.eval_crop))
    else:
        fields.append(("number of classes", arch["num_classes"], len(spec.classes)))
    for name, saved, given in fields:
        if saved != given:
            shown = arch["source"] if name == "--source" else saved
            raise ValueError(f"{path}: checkpoint was trained with {name} {shown!r} but this run has {given!r}")
    if args.task != "depth":
        check_resume_classes(info, spec, path)


def check_resume_classes(info: dict[str, Any], spec: DatasetSpec, path: str) -> None:
    """A resumed segmentation run's classes, colours and ignore index are the checkpoint's."""
    for index, (name, color) in enumerate(zip(spec.classes, spec.colors)):
        saved_name, saved_color = info["classes"][index], tuple(info["colors"][index])
        if (saved_name, saved_color) != (name, tuple(color)):
            raise ValueError(
                f"{path}: class {index} is {saved_name!r} {saved_color} in the checkpoint but {name!r} "
                f"{tuple(color)} in {spec.source}; resume with the dataset description it was trained with"
            )
    if info["ignore_index"] != spec.ignore_index:
        raise ValueError(
            f"{path}: checkpoint was trained with ignore index {info['ignore_index']} but {spec.source} "
            f"says {spec.ignore_index}"
        )


def load_released_head(model: Dinov2Segmentation, args: argparse.Namespace, spec: DatasetSpec) -> None:
    """Initialise the head from Meta's released one (dinokit/backbones/released_heads.py): same blocks, same classes."""
    head, _ = read_checked_head(args.head_weights, args.backbone, args.registers, args.head_layers)
    classes = head["classifier.weight"].shape[0]
    if classes != len(spec.classes):
        raise ValueError(
            f"--head-weights {args.head_weights}: the head predicts {classes} classes but {spec.source} has "
            f"{len(spec.classes)}; it can only start a run on data with its classes, in its order"
        )
    model.head.load_state_dict(head, strict=False)  # num_batches_tracked is optional
    print(
        f"Head initialised from {args.head_weights} ({classes} classes, {args.head_layers} block(s), centred padding)"
    )


def build_optimizer(model: Dinov2Segmentation, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over what trains, at `base_lrs`: the head, and with --fine-tune the backbone."""
    parts = [model.head] + ([model.backbone] if args.fine_tune else [])
    groups = [{"params": list(part.parameters()), "lr": lr} for part, lr in zip(parts, base_lrs(args))]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def base_lrs(args: argparse.Namespace) -> list[float]:
    """Learning rate of each optimizer group: the head at --lr; with --fine-tune the backbone at
    --backbone-lr (default --lr / 10), since a foundation model's features degrade at a freshly
    initialised head's rate."""
    return [args.lr] + ([args.backbone_lr or args.lr / 10] if args.fine_tune else [])


def distribute(model: Dinov2Segmentation, device: torch.device) -> torch.nn.Module:
    """Under torchrun: the model wrapped in DistributedDataParallel (BatchNorm synchronised on GPUs)."""
    if world_size() == 1:
        return model
    if device.type == "cuda":  # SyncBatchNorm needs GPU tensors; on CPU the head normalises per process
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def train_views_key(
    args: argparse.Namespace,
    model: Dinov2Segmentation,
    train_set: SegmentationDataset,
    imgsz: tuple[int, int],
    amp_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """What cached training views depend on; a cache left in the run folder under another key is rebuilt."""
    return {
        "format": 1,
        "views": args.train_views,
        "recipe": args.recipe,
        "imgsz": list(imgsz),
        "seed": args.seed,
        "pairs": fingerprint_files(path for pair in train_set.pairs for path in pair),
        "arch": {k: v for k, v in model.arch.items() if k != "num_classes"},
        "weights": weights_digest(model.backbone),
        "dtype": str(amp_dtype or torch.float32),
        "rank": rank(),
        "world_size": world_size(),
    }


def restore(run: Run, resumed: dict[str, Any], changes: list[tuple[str, Any, Any]]) -> None:
    """Continue `resumed`: weights, optimizer, schedule, scaler and history; flags given now win."""
    load_model_state(run.model, resumed, run.args.resume)
    run.optimizer.load_state_dict(resumed["optimizer"])
    run.scheduler.load_state_dict(resumed["scheduler"])
    follow_schedule_flags(run.optimizer, run.scheduler, run.args)
    restore_scaler(run.scaler, resumed.get("scaler", {}))
    start = resumed["epoch"] + 2
    run.checkpoints.restore(
        resumed, [{"epoch": start, "flag": flag, "from": old, "to": new} for flag, old, new in changes]
    )
    print(
        f"Resumed from {run.args.resume} at epoch {start}"
        + "".join(f"; {flag} {new} (was {old})" for flag, old, new in changes)
        + "."
    )


def follow_schedule_flags(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, args: argparse.Namespace
) -> None:
    """After restoring optimizer state: apply --lr/--backbone-lr/--weight-decay, so the schedule goes
    on as if the run had started with them (a restored state would otherwise keep the old values)."""
    factor = current_factor(scheduler)
    for group, base in zip(optimizer.param_groups, base_lrs(args)):
        group["lr"] = base * factor
        group["initial_lr"] = base
        group["weight_decay"] = args.weight_decay
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """fp16 loss-scaler state when both the checkpoint and this run use one: a bf16/fp32 run saved
    an empty state, and a bf16/fp32 resume needs none."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)


def fit(run: Run) -> None:
    """Train from the epoch after the last recorded one to --epochs, recording each (RunCheckpoints)."""
    args, settings = run.args, run.settings
    if run.train_cache is not None:
        prepare_train_views(run)
    shuffle = torch.Generator()  # order (and views) of cached training features, reseeded every epoch
    step = steps_done(run.checkpoints.history, len(run.train_loader))
    board = open_board(run, step)
    after_step = step_hook(run, board, step)
    try:
        for epoch in range(run.checkpoints.epochs_done, args.epochs):
            print(f"EPOCH: {epoch + 1}/{args.epochs}")
            started = time.perf_counter()
            set_epoch(run.train_loader, epoch)
            shuffle.manual_seed(epoch_seed(args.seed, epoch) + rank())
            train_result = train_one_epoch(
                run.train_model,
                run.train_loader,
                run.optimizer,
                settings,
                epoch=epoch + 1,
                scaler=run.scaler,
                cache=run.train_cache,
                generator=shuffle,
                after_step=after_step,
                max_steps=run.total_steps - step,
            )
            step += min(len(run.train_loader), run.total_steps - step)
            sync_buffers(run.model)  # every rank validates, and rank 0 saves, the same model
            valid_result = validate_split(run, "Valid")
            if not isinstance(run.scheduler, StepSchedule):
                run.scheduler.step()
            seconds = time.perf_counter() - started
            print_epoch("Train", train_result, args.task)
            print_epoch("Valid", valid_result, args.task)
            end_epoch(run, epoch, step, train_result, valid_result, seconds)
            if board is not None:
                board.log_epoch(epoch + 1, train_result, valid_result)
                board.log_examples(epoch + 1, run_predictor(run), last=epoch + 1 == args.epochs)
    finally:
        if board is not None:
            board.close()
    run.checkpoints.save_final(args.epochs)
    passes = torch.tensor(run.model.backbone_images)
    all_reduce_sum(passes)
    print(
        f"Backbone passes: {int(passes):,} images"
        + (f" ({world_size()} processes)" if world_size() > 1 else "")
        + " (images run through the backbone in this run; cached features take none)"
    )


def prepare_train_views(run: Run) -> None:
    """--train-views K: reuse a complete cache of this run's views, else compute them now, K per
    image of this process's shard (K=1: the un-augmented image), storage reserved up front."""
    args, base = run.args, run.train_loader.dataset
    views = args.train_views
    source = copy.copy(base)
    if views == 1:
        source.transform = eval_transform(run.imgsz, run.model.mean, run.model.std)
    dataset = ViewsDataset(source, shard_indices(len(base), rank(), world_size()), views)
    width, height = run.imgsz
    shapes = (
        len(dataset),
        run.model.feature_shape(height, width),
        run.settings.amp_dtype or torch.float32,
        (height, width),
    )
    if run.train_cache.reuse(*shapes):
        return
    what = "un-augmented images" if views == 1 else f"{views} augmented views per image"
    print(
        f"Caching training features: {what}, {len(dataset)} backbone passes"
        + (f" on this process's {len(dataset) // views} images" if world_size() > 1 else "")
    )
    run.train_cache.allocate(*shapes)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=False,
        num_workers=args.workers,
        pin_memory=run.settings.device.type == "cuda",
    )
    cache_features(run.train_cache, run.model, loader, run.settings)


def step_hook(run: Run, board: TrainingBoard | None, steps_before: int) -> Callable[[torch.Tensor], None] | None:
    """What runs after every optimizer step: a per-step schedule's step, and the step's loss and
    learning rate for TensorBoard (the rate the step used: read before the schedule moves it)."""
    per_step = isinstance(run.scheduler, StepSchedule)
    if board is None:
        return (lambda loss: run.scheduler.step()) if per_step else None
    counter = itertools.count(steps_before + 1)

    def after_step(loss: torch.Tensor) -> None:
        board.log_step(next(counter), loss, run.optimizer.param_groups[0]["lr"])
        if per_step:
            run.scheduler.step()

    return after_step


def open_board(run: Run, steps_before: int) -> TrainingBoard | None:
    """--tensorboard: rank 0's writer into <run>/tensorboard (a resumed run drops the events after its checkpoint)."""
    if not run.args.tensorboard or not is_main_process():
        return None
    dataset = run.valid_loader.dataset
    examples = [
        (dataset.pairs[i][0].stem, *dataset.load_pair(i)) for i in range(run.args.tensorboard_images)[: len(dataset)]
    ]
    if run.args.task == "depth":
        scale = (run.spec.min_depth, run.spec.max_depth)
        draw = lambda image, depth: colorize(depth, scale)  # noqa: E731
    else:
        color_map = run.spec.color_map()
        draw = lambda image, mask: overlay(image, mask, color_map)  # noqa: E731
    board = TrainingBoard(
        run.out_dir,
        classes=getattr(run.spec, "classes", []),
        examples=examples,
        draw=draw,
        every=run.args.tensorboard_every,
        purge_step=steps_before if run.checkpoints.epochs_done else None,
    )
    print(f"TensorBoard: {board.log_dir} (tensorboard --logdir {run.out_dir.parent})")
    return board


def validate_split(run: Run, desc: str) -> EpochResult:
    """The validation split's metrics; a frozen backbone's features are computed on the first call only."""
    if run.valid_cache is not None and not run.valid_cache.ready:
        cache_features(run.valid_cache, run.model, run.valid_loader, run.settings)
    return validate(run.model, run.valid_loader, run.settings, desc=desc, cache=run.valid_cache)


CURVES = {"segmentation": SEGMENTATION_CURVES, "depth": DEPTH_CURVES}  # metrics.csv columns drawn, by task
SHOWN = {"pixacc": "PixAcc", "miou": "mIOU"}  # how the epoch line names a metric (others: by their column)


def print_epoch(kind: str, result: EpochResult, task: str) -> None:
    """The epoch's loss and the metrics its curves draw."""
    shown = [name for name, _, _ in CURVES[task] if name != "loss"]
    scores = "".join(f", {kind} Epoch {SHOWN.get(name, name)}: {result.metrics[name]:.4f}" for name in shown)
    print(f"{kind} Epoch Loss: {result.loss:.4f}{scores}")


def end_epoch(
    run: Run, epoch: int, step: int, train_result: EpochResult, valid_result: EpochResult, seconds: float
) -> None:
    """Record the epoch (checkpoints, metrics.csv, curves) and report it."""
    row = {"epoch": epoch + 1, "step": step}
    for split, result in (("train", train_result), ("valid", valid_result)):
        row[f"{split}_loss"] = result.loss
        row.update({f"{split}_{name}": value for name, value in result.metrics.items()})
    row.update(lr=run.optimizer.param_groups[0]["lr"], seconds=seconds)
    for name, value in run.checkpoints.end_epoch(row).items():
        print(f"Best validation {name}: {value:.4f}\nSaved best model for epoch: {epoch + 1}")
    if is_main_process():
        write_csv(run.checkpoints.history, run.out_dir / "metrics.csv")
        save_plots(run.checkpoints.history, run.out_dir, CURVES[run.args.task], title=random_init_note(run.args))
    print(f"LR for next epoch: {run.scheduler.get_last_lr()}  ({seconds:.1f} s)")
    print("-" * 50)


def run_predictor(run: Run) -> Predictor:
    """The model being trained, predicting as inference will (whole image at the training size)."""
    return Predictor(
        run.model,
        run.checkpoints.info,
        device=run.settings.device,
        amp_dtype=run.settings.amp_dtype,
        mode=InferenceMode(imgsz=run.imgsz),
    )


def final_evaluation(run: Run) -> None:
    """The best checkpoint (mIoU; depth: RMSE) scored on the validation split at each image's
    original resolution (the per-epoch figures are at the training size): printed, and
    best_validation.json."""
    if distributed():
        torch.distributed.barrier()  # rank 0 has finished writing the checkpoints
    best_path = run.checkpoints.load_best(run.settings.device)
    predictor = Predictor(
        run.model,
        run.checkpoints.info,
        device=run.settings.device,
        amp_dtype=run.settings.amp_dtype,
        mode=mode_from_args(run.args, sizes=False),
    )
    print(
        f"Validating {best_path.name}: predicted {predictor.mode.describe()}, "
        "scored at each image's original resolution"
    )
    pairs, workers, mode = run.valid_loader.dataset.pairs, run.args.workers, predictor.mode.describe()
    if run.args.task == "depth":
        errors = evaluate_depth_pairs(predictor, pairs, run.spec, workers=workers, desc="Validate best")
        lines = depth_report_lines(errors)
        report = {"checkpoint": best_path.name, "split": "valid", "mode": mode, **errors}
    else:
        result = evaluate_pairs(predictor, pairs, workers=workers, desc="Validate best")
        lines = report_lines(result, run.spec.classes)
        report = report_json(result, run.spec.classes, checkpoint=best_path.name, split="valid", mode=mode)
    report["backbone_weights"] = backbone_weights(run.args)
    for line in lines:
        print(line)
    if is_main_process():
        write_json(run.out_dir / "best_validation.json", report)
    print(f"Outputs in {run.out_dir}")


def print_resume_hint(out_dir: Path, epochs_done: int) -> None:
    command = sys.argv[1:]
    if "--resume" in command:
        del command[command.index("--resume") : command.index("--resume") + 2]
    print(
        f"\nInterrupted. {out_dir / 'last.pth'} holds epoch {epochs_done}; continue with:\n"
        f"  python train.py {' '.join(command)} --resume {out_dir / 'last.pth'}",
        file=sys.stderr,
    )


def _plain(value: Any) -> Any:
    """argparse values as plain Python types, so checkpoints load with weights_only=True."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(parser)
    add_model_flags(parser)
    add_optimisation_flags(parser)
    add_mode_args(parser, flag="--eval-mode", sizes=False, default=None)  # seed: whole, paper: slide
    add_speed_flags(parser)
    add_run_flags(parser)
    return parser


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        default="segmentation",
        choices=tuple(SCORINGS),
        help="segmentation (default), or depth: a depth head on an RGB-D folder ({train,valid}_images/ + "
        "{train,valid}_depth/ + depth.json; docs/depth.md), SigLoss, best checkpoint on RMSE",
    )
    data.add_argument(
        "--data-dir",
        default=str(config.DATA_DIR),
        help="dataset root with {train,valid}_{images,labels}/ (depth: {train,valid}_{images,depth}/)",
    )
    data.add_argument(
        "--classes",
        default=None,
        metavar="FILE",
        help="dataset description (JSON); default: <data-dir>/classes.json, else the VOC classes",
    )
    data.add_argument(
        "--imgsz",
        type=int,
        nargs=2,
        default=None,
        metavar=("W", "H"),
        help="training/validation size, rounded up to a multiple of the backbone's patch size (640 -> 644 for "
        "/14, 640 for /16); --recipe paper/dinov3: the side of its square crops (default: seed 640 640, "
        "paper 518 518, dinov3 512 512)",
    )
    data.add_argument("--workers", type=at_least(0), default=config.WORKERS, help="DataLoader worker processes")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    add_backbone_args(parser)
    parser.add_argument("--fine-tune", action="store_true", help="train the backbone too (default: frozen backbone)")
    parser.add_argument(
        "--head-layers",
        type=int,
        default=None,
        choices=HEAD_LAYERS,
        help="blocks the linear head reads: 4 = the last four (default for ViTs, the DINOv2 paper's +ms head "
        "input), 1 = the last (both papers' lin head; a ConvNeXt's last stage, its only choice)",
    )
    parser.add_argument(
        "--head-weights",
        default=None,
        metavar="NAME|FILE",
        help="start the head from Meta's released one (voc2012_ms, ... or a file; the dataset must have its classes)",
    )
    parser.add_argument(
        "--gradient-loss",
        type=non_negative,
        default=0.0,
        metavar="W",
        help="--task depth: add W x the multi-scale gradient loss of log depth to SigLoss (Meta's configs: 0.5)",
    )
    parser.add_argument(
        "--head-dropout",
        type=unit_interval,
        default=None,
        metavar="P",
        help="Dropout2d on the features before the head, in training (default: --recipe dinov3 0.1, else 0)",
    )


def add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimisation")
    # None = not given: a fresh run takes its recipe's default, a resumed run its checkpoint's value
    # (resolve_defaults; the defaults are config.RECIPES).
    optim.add_argument(
        "--recipe",
        default=None,
        choices=list(config.RECIPES),
        help="seed (default): the reference article's run; paper: the DINOv2 paper's protocol "
        "(rescale + 518 crops + photometric distortion, 40k steps of 16, poly LR, slide evaluation); "
        "dinov3: Meta's DINOv3 linear protocol (512 crops, 40k steps of 16, lr 1e-3, wd 1e-3, warmup + "
        "one-cycle cosine, Dropout2d 0.1, slide 512/341)",
    )
    optim.add_argument("--epochs", type=at_least(1), default=None, help=f"total epochs (default: seed {config.EPOCHS})")
    optim.add_argument(
        "--steps",
        type=at_least(1),
        default=None,
        help="total optimizer steps instead of --epochs; the last epoch stops there (default: paper and dinov3 40000)",
    )
    optim.add_argument(
        "--batch", type=at_least(1), default=None, help="images per step (default: seed 2, paper and dinov3 16)"
    )
    optim.add_argument(
        "--lr", type=positive, default=None, help="AdamW learning rate (default: seed 1e-4, paper and dinov3 1e-3)"
    )
    optim.add_argument(
        "--weight-decay",
        type=non_negative,
        default=None,
        help="AdamW weight decay (default: seed 1e-2, paper 1e-4, dinov3 1e-3)",
    )
    optim.add_argument(
        "--scheduler",
        default=None,
        choices=SCHEDULERS,
        help="multistep: --scheduler-epochs milestones (seed); poly (paper) / cosine / onecycle (dinov3): "
        "decay per step",
    )
    optim.add_argument(
        "--scheduler-epochs",
        type=at_least(1),
        nargs="+",
        default=None,
        metavar="E",
        help="multistep: epochs after which the LR is multiplied by --scheduler-gamma",
    )
    optim.add_argument("--scheduler-gamma", type=positive, default=0.1)
    optim.add_argument(
        "--warmup-steps",
        type=at_least(0),
        default=None,
        metavar="N",
        help="poly / cosine / onecycle: linear warmup over the first N optimizer steps "
        "(default: seed 0, paper and dinov3 1500)",
    )
    optim.add_argument(
        "--backbone-lr",
        type=positive,
        default=None,
        help="with --fine-tune: the backbone's learning rate (default: --lr / 10; the head keeps --lr)",
    )


def add_speed_flags(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("speed and memory")
    speed.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="with --fine-tune: recompute block activations in backward (much less memory, ~30%% slower)",
    )
    speed.add_argument(
        "--compile", action="store_true", help="torch.compile the backbone (first epoch pays the compile time)"
    )
    speed.add_argument(
        "--no-val-cache",
        action="store_true",
        help="re-run a frozen backbone on the validation split every epoch instead of caching its features",
    )
    speed.add_argument(
        "--train-views",
        type=at_least(0),
        default=0,
        metavar="K",
        help="frozen backbone: compute K augmented views of every training image once, then each epoch "
        "trains the head on one view per image (K=1: one un-augmented view)",
    )
    speed.add_argument(
        "--cache-train-features",
        dest="train_views",
        action="store_const",
        const=1,
        help="the same as --train-views 1 (the training features of un-augmented images, computed once)",
    )
    speed.add_argument(
        "--cache-ram-gb",
        type=non_negative,
        default=None,
        help="feature caches larger than this go to a file in the run folder (default: a quarter of RAM)",
    )


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out-dir",
        default=None,
        help="run folder under outputs/ (default: transfer_learning or fine_tuning, depth_... with --task depth; "
        "with --resume: the checkpoint's folder)",
    )
    add_device_args(run)
    run.add_argument("--seed", type=int, default=config.SEED)
    run.add_argument(
        "--resume",
        default=None,
        metavar="CKPT",
        help="continue from a last.pth: flags not given are the checkpoint's; "
        "what each flag may do on resume: RESUME_RULES",
    )
    run.add_argument(
        "--exist-ok",
        action="store_true",
        help="start over in an --out-dir that holds another run (its files are deleted first)",
    )
    run.add_argument(
        "--tensorboard",
        action="store_true",
        help="log curves and example predictions to <run folder>/tensorboard (tensorboard --logdir outputs/)",
    )
    run.add_argument(
        "--tensorboard-images",
        type=at_least(0),
        default=4,
        metavar="N",
        help="--tensorboard: validation images shown with their predictions (default 4)",
    )
    run.add_argument(
        "--tensorboard-every",
        type=at_least(1),
        default=1,
        metavar="E",
        help="--tensorboard: draw the example predictions every E epochs and after the last (default 1)",
    )
    run.add_argument(
        "--dist-timeout",
        type=positive,
        default=30,
        metavar="MIN",
        help="torchrun: minutes a process waits for a dead or stuck peer before failing",
    )


if __name__ == "__main__":
    run_cli(main, get_args_parser())
