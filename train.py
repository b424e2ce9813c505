"""Train a head on DINOv2 / DINOv3 features (frozen backbone), or fine-tune everything: any task of
dinokit/tasks/ (segmentation by default, depth), one loop (engine.py) for all.

    python train.py --epochs 20 --imgsz 640 640 --out-dir transfer_learning --batch 2
    python train.py --epochs 20 --imgsz 640 640 --out-dir fine_tuning --batch 2 --fine-tune
    python train.py --recipe paper --data-dir input/voc_aug --out-dir paper_lin --head-layers 1   # the paper's protocol
    python train.py --recipe dinov3 --backbone dinov3_vits16 --weights dinov3_vits16_pretrain_lvd1689m-08c60483.pth \
        --head-layers 1 --out-dir dinov3_lin                                                     # DINOv3's protocol

    python train.py --task depth --data-dir input/nyu --imgsz 640 480 --out-dir nyu_depth   # a depth head on RGB-D data

Writes to outputs/<out-dir>/: best_model_loss.pth, best_model_<metric>.pth (segmentation: _iou, depth:
_rmse), final_model.pth, last.pth (for --resume), metrics.csv, the task's per-epoch curves as PNGs
(loss/accuracy/miou; depth: loss/rmse/abs_rel/delta1; at the training size) and best_validation.json
(the best checkpoint at original resolution).
A run owns that folder: another run's files there are refused unless --resume continues them or
--exist-ok starts over, and a lock keeps a second run out while this one works (dinokit/runs/run_folder.py).
What --resume may change is dinokit/runs/resume.py. Runs under torchrun for several GPUs or machines (see README).

The steps below: parse (the flags) -> plan (settle them: recipe, checkpoint) -> build (data, model,
optimizer, schedule, caches) -> fit (the epochs) -> report (the best checkpoint at full resolution).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

import config
from checkpoint import RunCheckpoints, backbone_record, describe_model, load_checkpoint, load_model_state
from cli import (
    RANDOM_INIT,
    FlagParser,
    add_backbone_args,
    add_device_args,
    add_mode_args,
    at_least,
    backbone_weights,
    mode_from_args,
    non_negative,
    output_folder,
    positive,
    run_cli,
    unit_interval,
)
from datasets import build_loaders
from dinokit.backbones.choice import BackboneChoice
from dinokit.backbones.loading import backbone_blocks
from dinokit.data.augmentations import CROPPED_RECIPES
from dinokit.data.resize import check_imgsz, round_to_patch
from dinokit.runs.checkpoint_format import RENAMED_RECIPES
from dinokit.runs.resume import (
    FlagChange,
    check_model_matches,
    diverged_message,
    follow_schedule_flags,
    interrupted_message,
    plan_steps,
    recorded_flags,
    restore_scaler,
    settle_flags,
)
from dinokit.runs.run_folder import claim_run_folder, missing_folders, remove_empty_folders
from dinokit.tasks import TASKS, get_task, task_names
from dinokit.tasks.registry import DEFAULT_TASK
from dinokit.tasks.task import Task
from dinokit.training.schedules import SCHEDULERS, build_scheduler, check_schedule, current_factor
from dinokit.writing import write_json
from engine import LoopSettings, NonFiniteLossError, Run, build_caches, fit
from evaluation import evaluate_pairs
from inference import Predictor
from model import DenseModel
from model_config import HEAD_LAYERS
from utils import (
    distribute,
    distributed,
    init_distributed,
    is_main_process,
    on_main_process,
    seed_everything,
    select_precision,
)


def main(args: argparse.Namespace) -> None:
    resumed = load_checkpoint(args.resume) if args.resume else None
    changes = settle(args, resumed)
    task, backbone = get_task(args.task), resolve_backbone(args)
    check_args(args, task, backbone)
    device = init_distributed(args.device, args.dist_timeout)
    seed_everything(args.seed)
    out_dir = run_folder(args, task)
    new_folders = missing_folders(out_dir)
    # rank 0 claims the run folder (dinokit/runs/run_folder.py); every rank gets its verdict
    lock = on_main_process(lambda: claim_run_folder(out_dir, resume=args.resume, exist_ok=args.exist_ok))
    try:
        run = build_run(args, task, backbone, device, out_dir, resumed)
        finished = False
        try:
            if resumed is not None:
                restore(run, resumed, changes)
            fit(run)
            final_evaluation(run)
            finished = True
        except NonFiniteLossError as err:
            raise NonFiniteLossError(diverged_message(err, out_dir / "last.pth", run.checkpoints.epochs_done)) from err
        except KeyboardInterrupt:
            print(interrupted_message(sys.argv[1:], out_dir / "last.pth", run.checkpoints.epochs_done), file=sys.stderr)
            sys.exit(130)
        finally:
            run.close(finished)
    finally:
        if lock is not None:
            lock.release()
        remove_empty_folders(new_folders)  # a run that failed before writing anything leaves no folder


# -- plan ---------------------------------------------------------------------------------------


def settle(args: argparse.Namespace, resumed: dict[str, Any] | None) -> list[FlagChange]:
    """Settle every flag: a resumed run follows its checkpoint (dinokit/runs/resume.py); a flag still
    unset takes its --recipe's default (config.RECIPES). Training is counted in --epochs or --steps,
    whichever was given (or the recipe's). Returns the flags a resumed run changes."""
    if args.epochs is not None and args.steps is not None:
        raise ValueError("--epochs and --steps exclude each other: count training in one of them")
    counted_in = "epochs" if args.epochs is not None else "steps" if args.steps is not None else None
    if args.recipe in RENAMED_RECIPES:
        print(f"warning: --recipe {args.recipe} is now --recipe {RENAMED_RECIPES[args.recipe]}", file=sys.stderr)
        args.recipe = RENAMED_RECIPES[args.recipe]
    given = getattr(args, "given_flags", frozenset(vars(args)))
    changes = settle_flags(args, resumed["args"], given, args.resume) if resumed is not None else []
    args.recipe = args.recipe or "article"
    for name, default in config.RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if counted_in == "epochs":
        args.steps = None
    elif args.steps is not None:
        args.epochs = None  # set from the training split's length (plan_steps)
    return changes


def resolve_backbone(args: argparse.Namespace) -> BackboneChoice:
    """The backbone, resolved once from its flags and passed on; --head-layers defaults to what it
    serves best (a ViT's last four blocks, a ConvNeXt's last stage)."""
    backbone = BackboneChoice.from_flags(args)
    if args.head_layers is None:
        args.head_layers = max(backbone.spec.head_layers())
    return backbone


def check_args(args: argparse.Namespace, task: Task, backbone: BackboneChoice) -> None:
    if args.layer_decay < 1.0 and not args.fine_tune:
        raise ValueError(f"--layer-decay {args.layer_decay:g} decays the backbone's learning rates: add --fine-tune")
    """Reject flag values that would only fail later, with the flag's name in the message."""
    check_schedule(args.scheduler, args.warmup_steps)
    check_imgsz(args.imgsz)
    if args.train_views and args.fine_tune:
        raise ValueError("--train-views / --cache-train-features need a frozen backbone; drop --fine-tune")
    if args.grad_checkpointing and not args.fine_tune:
        raise ValueError("--grad-checkpointing only matters with --fine-tune (a frozen backbone stores no activations)")
    cropped = args.recipe in CROPPED_RECIPES
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
    if args.recipe == "dinov3" and backbone.spec.family != "dinov3":
        print(f"Note: --recipe dinov3 on {backbone.name}: Meta's DINOv3 protocol on a DINOv2 backbone.")
    task.check_args(args, backbone)


def run_folder(args: argparse.Namespace, task: Task) -> Path:
    """outputs/<--out-dir>; a resumed run without --out-dir continues in its checkpoint's folder."""
    if args.out_dir is None and args.resume:
        return Path(args.resume).parent
    return output_folder(args.out_dir or task.run_folder(args.fine_tune))


# -- build --------------------------------------------------------------------------------------


def build_run(
    args: argparse.Namespace,
    task: Task,
    backbone: BackboneChoice,
    device: torch.device,
    out_dir: Path,
    resumed: dict[str, Any] | None,
) -> Run:
    """Data (checked), model, optimizer, schedule, caches and checkpoint files of a run."""
    imgsz = round_to_patch(args.imgsz, backbone.spec.patch_size)
    if list(imgsz) != list(args.imgsz):
        print(
            f"Note: --imgsz {args.imgsz[0]} {args.imgsz[1]} rounded up to {imgsz[0]} {imgsz[1]} "
            f"(a multiple of the backbone's patch size {backbone.spec.patch_size})."
        )
    normalization = backbone.spec.normalization(backbone.weights)
    train_set, valid_set, spec = task.load_data(args, imgsz, normalization)
    train_loader, valid_loader = build_loaders(
        train_set, valid_set, batch=args.batch, workers=args.workers, device=device, where=args.data_dir
    )
    print(
        f"Training images: {len(train_set)}, validation images: {len(valid_set)}, "
        f"size {imgsz[0]}x{imgsz[1]}, device {device}"
    )
    history = resumed["history"] if resumed is not None else []
    total_steps, args.epochs = plan_steps(args, len(train_loader), history, args.resume)  # --steps: their epochs
    print_plan(args, total_steps, len(train_loader))
    if resumed is not None:  # a mismatch costs seconds, not a backbone download
        info = resumed["model_info"]
        check_model_matches(info, resumed["args"], args, task.resume_fields(info, spec), args.resume)
        task.check_resume(info, spec, args.resume)
    model = task.build_model(args, spec, backbone, resumed["model_info"]["arch"] if resumed else None).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.compile:
        model.compile_backbone()
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
    data_dir = Path(args.data_dir).resolve()
    checkpoints = RunCheckpoints(
        out_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        info=describe_model(task, model, spec, imgsz, dataset=data_dir.name, data_dir=str(data_dir)),
        args=recorded_flags(args),
        best_on=task.best,
        backbone=backbone_record(args),
    )
    valid_cache, train_cache = build_caches(args, task, model, train_set, imgsz, amp_dtype, out_dir)
    return Run(
        args=args,
        task=task,
        out_dir=out_dir,
        imgsz=imgsz,
        total_steps=total_steps,
        spec=spec,
        settings=LoopSettings(device, task.scoring(spec, args), amp_dtype),
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


def print_model(model: DenseModel, args: argparse.Namespace, amp_dtype: torch.dtype | None) -> None:
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


def build_optimizer(model: DenseModel, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over what trains, one group per learning rate (`parameter_groups`)."""
    groups = [{"params": params, "lr": lr} for params, lr in parameter_groups(model, args)]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def base_lrs(model: DenseModel, args: argparse.Namespace) -> list[float]:
    """Learning rate of each optimizer group, in `build_optimizer`'s order."""
    return [lr for _, lr in parameter_groups(model, args)]


def parameter_groups(model: DenseModel, args: argparse.Namespace) -> list[tuple[list[torch.nn.Parameter], float]]:
    """(parameters, learning rate) of each group: the head at --lr; with --fine-tune the backbone at
    --backbone-lr (default --lr / 10, since a foundation model's features degrade at a freshly
    initialised head's rate), and with --layer-decay d below 1 block i of N at d^(N-1-i) of it, the
    patch embedding at d^N, the final norm and the blocks the head works in (EoMT's query blocks)
    undecayed: BEiT / EoMT's layer-wise decay, lower layers changing least."""
    groups = [(list(model.head.parameters()), args.lr)]
    if not args.fine_tune:
        return groups
    backbone_lr, decay = args.backbone_lr or args.lr / 10, args.layer_decay
    if decay == 1.0:
        return groups + [([p for p in model.backbone.parameters() if p.requires_grad], backbone_lr)]
    blocks = backbone_blocks(model.backbone)
    depth, undecayed = len(blocks), len(blocks) - model.head_blocks
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    norm = {id(p) for name, p in model.backbone.named_parameters() if name.split(".")[-2] == "norm"}
    by_lr: dict[float, list[torch.nn.Parameter]] = {}
    for param in model.backbone.parameters():
        if not param.requires_grad:
            continue
        index = block_of.get(id(param), -1)  # -1: the embeddings
        scale = 1.0 if id(param) in norm or index >= undecayed else decay ** (depth - 1 - index)
        by_lr.setdefault(backbone_lr * scale, []).append(param)
    return groups + [(params, lr) for lr, params in sorted(by_lr.items(), reverse=True)]


def restore(run: Run, resumed: dict[str, Any], changes: list[FlagChange]) -> None:
    """Continue `resumed`: weights, optimizer, schedule, scaler and history; flags given now win."""
    load_model_state(run.model, resumed, run.args.resume)
    run.optimizer.load_state_dict(resumed["optimizer"])
    run.scheduler.load_state_dict(resumed["scheduler"])
    factor = current_factor(run.scheduler)
    follow_schedule_flags(run.optimizer, run.scheduler, base_lrs(run.model, run.args), run.args.weight_decay, factor)
    restore_scaler(run.scaler, resumed["scaler"])
    start = resumed["epoch"] + 2
    overrides = [{"epoch": start, "flag": c.flag, "from": c.before, "to": c.now} for c in changes]
    run.checkpoints.restore(resumed, overrides)
    print(
        f"Resumed from {run.args.resume} at epoch {start}"
        + "".join(f"; {c.flag} {c.now} (was {c.before})" for c in changes)
        + "."
    )


def final_evaluation(run: Run) -> None:
    """The best checkpoint (the task's metric: mIoU, RMSE) scored on the validation split at each image's
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
    pairs, mode = run.valid_loader.dataset.pairs, predictor.mode.describe()
    result = evaluate_pairs(predictor, pairs, run.spec, workers=run.args.workers, desc="Validate best")
    lines, report = result.lines(), result.report(checkpoint=best_path.name, split="valid", mode=mode)
    report["backbone_weights"] = backbone_weights(run.args)
    for line in lines:
        print(line)
    if is_main_process():
        write_json(run.out_dir / "best_validation.json", report)
    print(f"Outputs in {run.out_dir}")


# -- parse ----------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(parser)
    add_model_flags(parser)
    add_optimisation_flags(parser)
    add_mode_args(parser, flag="--eval-mode", sizes=False, default=None)  # article: whole, paper: slide
    add_speed_flags(parser)
    add_run_flags(parser)
    return parser


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        default=DEFAULT_TASK,
        choices=task_names(),
        help="; ".join(f"{task.name}: {task.help}" for task in TASKS.values()) + f" (default: {DEFAULT_TASK})",
    )
    data.add_argument(
        "--data-dir",
        default=str(config.DATA_DIR),
        help="dataset root: " + ", ".join(f"{task.name} {task.data_layout}" for task in TASKS.values()),
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
        "/14, 640 for /16); --recipe paper/dinov3: the side of its square crops (default: article 640 640, "
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
        "--head",
        default=None,
        choices=("linear", "eomt"),
        help="--task segmentation: the linear head (default) or EoMT's queries and mask module (mask "
        "classification, read as per-pixel classes); panoptic / instance: always eomt",
    )
    queries = parser.add_argument_group("EoMT (--task panoptic / instance, --head eomt)")
    queries.add_argument(
        "--queries", type=int, default=None, metavar="K", help="object queries (default 100; the paper: 200 on COCO)"
    )
    queries.add_argument(
        "--query-blocks",
        type=int,
        default=None,
        metavar="L",
        help="the last L blocks see the queries (default: the paper's 4)",
    )
    queries.add_argument(
        "--no-masked-attention",
        action="store_true",
        help="never mask the queries' attention (the paper masks it early in training and anneals it away)",
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
        choices=[*config.RECIPES, *RENAMED_RECIPES],  # an old name works, with a deprecation line
        metavar="{" + ",".join(config.RECIPES) + "}",
        help="article (default): the reference article's run (named seed before); paper: the DINOv2 paper's protocol "
        "(rescale + 518 crops + photometric distortion, 40k steps of 16, poly LR, slide evaluation); "
        "dinov3: Meta's DINOv3 linear protocol (512 crops, 40k steps of 16, lr 1e-3, wd 1e-3, warmup + "
        "one-cycle cosine, Dropout2d 0.1, slide 512/341); eomt: EoMT's COCO recipe for --task panoptic / instance "
        "(--fine-tune, 640 crops, 12 epochs of 16, lr 1e-4 everywhere, wd 0.05, layer decay 0.8, poly after warm-up)",
    )
    optim.add_argument(
        "--epochs", type=at_least(1), default=None, help=f"total epochs (default: article {config.EPOCHS})"
    )
    optim.add_argument(
        "--steps",
        type=at_least(1),
        default=None,
        help="total optimizer steps instead of --epochs; the last epoch stops there (default: paper and dinov3 40000)",
    )
    optim.add_argument(
        "--batch", type=at_least(1), default=None, help="images per step (default: article 2, paper and dinov3 16)"
    )
    optim.add_argument(
        "--lr", type=positive, default=None, help="AdamW learning rate (default: article 1e-4, paper and dinov3 1e-3)"
    )
    optim.add_argument(
        "--weight-decay",
        type=non_negative,
        default=None,
        help="AdamW weight decay (default: article 1e-2, paper 1e-4, dinov3 1e-3)",
    )
    optim.add_argument(
        "--scheduler",
        default=None,
        choices=SCHEDULERS,
        help="multistep: --scheduler-epochs milestones (article); poly (paper) / cosine / onecycle (dinov3): "
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
        "(default: article 0, paper and dinov3 1500)",
    )
    optim.add_argument(
        "--backbone-lr",
        type=positive,
        default=None,
        help="with --fine-tune: the backbone's learning rate (default: --lr / 10; the head keeps --lr)",
    )
    optim.add_argument(
        "--layer-decay",
        type=unit_interval,
        default=None,
        metavar="D",
        help="with --fine-tune: block i of N learns at D^(N-1-i) x --backbone-lr (default: --recipe eomt 0.8, else 1)",
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
