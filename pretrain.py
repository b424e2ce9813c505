"""Continue self-supervised training of a DINOv2 / DINOv3 backbone on your own unlabelled images
(DINOv2's recipe: multi-crop, DINO + iBOT + KoLeo, an EMA teacher; DINOv3's Gram anchoring), or
distil a large backbone into a small one. The result is a backbone file in Meta's layout that
every other script reads with --weights.

    python pretrain.py --images input/my_images --backbone dinov2_vits14 --out-dir my_ssl     # from Meta's weights
    python pretrain.py --images input/my_images --backbone dinov2_vits14 --source timm --no-pretrained \\
        --recipe small --imgsz 98 --out-dir from_scratch                                           # from random init
    python pretrain.py --images input/my_images --backbone dinov2_vits14 --no-pretrained \\
        --distill-from dinov2_vitb14 --out-dir distilled                                           # distillation
    python train.py --weights outputs/my_ssl/backbone.pth --backbone dinov2_vits14 ...            # use it

Writes to outputs/<out-dir>/: backbone.pth (Meta's layout: the EMA teacher after pretraining, as
DINOv2 evaluates it; the student after distillation), student.pth (pretraining), last.pth (for
--resume: exact, even after kill -9, on the CPU), metrics.csv and loss.png per epoch, knn.png with
--monitor, tensorboard/ with --tensorboard. docs/pretraining.md: recipes, figures, torchrun.

The steps: parse -> settle (the recipe, or the checkpoint's settings) -> build (images, crops,
backbones, heads, optimizer) -> fit (the epochs) -> the files.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import deferred_interrupt, save_checkpoint
from cli import (
    RANDOM_INIT,
    FlagParser,
    add_backbone_args,
    at_least,
    non_negative,
    output_folder,
    positive,
    run_cli,
    unit_interval,
)
from dinokit.backbones.choice import BackboneChoice
from dinokit.backbones.loading import load_backbone
from dinokit.data.file_kinds import read_torch_file
from dinokit.data.image_files import open_image
from dinokit.errors import UserError
from dinokit.pretraining.crops import (
    EpochOrder,
    ImagesError,
    MultiCrop,
    UnlabelledImages,
    collate,
    list_unlabelled_images,
    local_crop_size,
)
from dinokit.pretraining.methods import FeatureDistillation, SelfDistillation
from dinokit.pretraining.monitor import KnnMonitor
from dinokit.pretraining.recipe import (
    GRAM_WEIGHT,
    RECIPES,
    ParameterGroup,
    PretrainConfig,
    apply_schedule,
    parameter_groups,
    schedule_at,
)
from dinokit.runs.reports import write_csv
from dinokit.runs.resume import resume_command
from dinokit.runs.run_folder import claim_run_folder, missing_folders, remove_empty_folders
from dinokit.writing import atomic_write
from engine import NonFiniteLossError
from model_config import get_backbone_spec
from utils import (
    autocast,
    distribute,
    init_distributed,
    is_main_process,
    on_main_process,
    rank,
    select_precision,
    world_size,
)

CHECKPOINT_KIND = "pretraining-checkpoint"
CHECKPOINT_FORMAT = 1
COLLAPSE_SPREAD = 0.02  # feature spread (random directions: ~1) below which features that had spread collapsed
LOCAL_FLAGS = (
    "images",
    "out_dir",
    "resume",
    "exist_ok",
    "device",
    "workers",
    "tensorboard",
    "monitor",
    "monitor_every",
    "checkpoint_every",
    "grad_checkpointing",
    "dist_timeout",
)  # how, not what
CHANGEABLE_ON_RESUME = ("epochs",)


class CollapseError(FloatingPointError):
    """The features collapsed: every image maps to (nearly) the same vector or prototype."""


def main(args: argparse.Namespace) -> None:
    resumed = read_resume(args.resume) if args.resume else None
    config = settle(args, resumed)
    device = init_distributed(args.device, args.dist_timeout)
    config = replace(config, world=world_size()) if resumed is None else config
    check_world(config, args.resume)
    folders = [str(f) for f in (args.images or resumed["images"]["folders"])] if (args.images or resumed) else []
    files = read_images(folders, config, resumed)
    out_dir = run_folder(args)
    new_folders = missing_folders(out_dir)
    lock = on_main_process(
        lambda: claim_run_folder(out_dir, resume=args.resume, exist_ok=args.exist_ok, kind="pretraining run")
    )
    try:
        run = build(args, config, folders, files, device, out_dir)
        if resumed is not None:
            run.restore(resumed)
        try:
            fit(run)
        except KeyboardInterrupt:
            print(
                f"\nInterrupted. {out_dir / 'last.pth'} holds step {run.saved_step}; continue with:\n  "
                f"{resume_command(sys.argv[1:], out_dir / 'last.pth', 'pretrain.py')}",
                file=sys.stderr,
            )
            sys.exit(130)
        finally:
            run.close()
    finally:
        if lock is not None:
            lock.release()
        remove_empty_folders(new_folders)


# -- settle -------------------------------------------------------------------------------------


def read_resume(path: str) -> dict[str, Any]:
    checkpoint = read_torch_file(path, "pretraining checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{path}: not a pretrain.py checkpoint (last.pth of a pretraining run)")
    return checkpoint


def settle(args: argparse.Namespace, resumed: dict[str, Any] | None) -> PretrainConfig:
    """The run's settings: a resumed run's are its checkpoint's (only --epochs may grow); a new run's
    are its flags over its --recipe over the paper's defaults."""
    given = getattr(args, "given_flags", frozenset(vars(args)))
    if resumed is not None:
        saved = PretrainConfig.from_dict(resumed["config"])
        for name in sorted(given - set(LOCAL_FLAGS)):
            now, before = flag_value(args, name), getattr(saved, config_name(name), None)
            if config_name(name) in CHANGEABLE_ON_RESUME or now == before:
                continue
            raise UserError(
                f"{args.resume}: the run was trained with --{name.replace('_', '-')} {before!r} but this run has "
                f"{now!r}; a resumed run keeps it (start a new run to change it)"
            )
        epochs = args.epochs if args.epochs is not None else saved.epochs
        return replace(saved, epochs=epochs)
    if not args.images:
        raise UserError("--images DIR [DIR ...] is required (or --resume outputs/NAME/last.pth)")
    choice = BackboneChoice.from_flags(args)
    trained_start = choice.pretrained or choice.weights is not None
    recipe = args.recipe or ("distill" if args.distill_from else "continue" if trained_start else "scratch")
    values: dict[str, Any] = dict(RECIPES[recipe])
    is_dinov3_vit = choice.spec.family == "dinov3" and not choice.spec.is_convnext
    if is_dinov3_vit and not args.distill_from:
        values["gram_weight"] = GRAM_WEIGHT
    for item in fields(PretrainConfig):
        value = getattr(args, item.name, None)
        if value is not None and item.name not in ("backbone", "weights"):
            values[item.name] = value
    config = PretrainConfig(
        **{
            **values,
            "recipe": recipe,
            "backbone": choice.spec.hub_name,
            "source": choice.source,
            "hub_dir": choice.hub_dir,
            "weights": choice.weights,
            "pretrained": choice.pretrained,
        }
    )
    check_config(config)
    return config


def config_name(flag: str) -> str:
    return {"no_pretrained": "pretrained", "registers": "backbone"}.get(flag, flag)


def flag_value(args: argparse.Namespace, name: str) -> Any:
    """A given flag's value as the config records it."""
    if name == "no_pretrained":
        return not args.no_pretrained
    if name in ("backbone", "registers"):
        return get_backbone_spec(args.backbone, args.registers).hub_name
    return getattr(args, name)


def check_config(config: PretrainConfig) -> None:
    """Settings that cannot work, refused before anything is loaded."""
    spec = get_backbone_spec(config.backbone)
    if spec.is_convnext and not config.distilling:
        raise UserError(
            f"--backbone {spec.hub_name}: Meta's ConvNeXts were distilled from a ViT, not trained self-supervised; "
            "add --distill-from dinov3_vitb16 (or another ViT) to distil into it"
        )
    if config.distilling:
        teacher = get_backbone_spec(config.distill_from)
        if teacher.embed_dim < spec.embed_dim:
            print(
                f"Note: the student {spec.hub_name} (width {spec.embed_dim}) is wider than its teacher "
                f"{teacher.hub_name} (width {teacher.embed_dim}); distillation usually goes from large to small."
            )
        if teacher.hub_name == spec.hub_name:
            print(f"Note: --distill-from {teacher.hub_name} is the student's own architecture.")
    if config.imgsz < 2 * spec.patch_size:
        raise UserError(f"--imgsz {config.imgsz}: global crops need at least 2 patches of {spec.patch_size} px a side")
    if config.lr <= 0 or config.epochs < 1 or config.batch < 2:
        raise UserError("--lr must be > 0, --epochs >= 1 and --batch >= 2 (KoLeo and the centring need a batch)")
    if not 0 <= config.momentum <= 1 or not 0 <= config.layer_decay <= 1:
        raise UserError("--momentum and --layer-decay must lie in [0, 1]")


def check_world(config: PretrainConfig, resume: str | None) -> None:
    if config.world != world_size():
        raise UserError(
            f"{resume}: the run was trained by {config.world} process(es), this one has {world_size()}; "
            "a resumed run keeps its global batch and data order: start it with the same torchrun "
            "--nproc-per-node/--nnodes"
        )


def read_images(folders: list[str], config: PretrainConfig, resumed: dict[str, Any] | None) -> list[Path]:
    """The run's image files, checked: enough for one global batch, large enough for the crops, and on
    --resume the same list the run was trained on."""
    files, others = list_unlabelled_images(folders)
    if others:
        print(f"Note: {others} non-image file(s) under --images passed over.")
    needed = config.batch * config.world
    if len(files) < needed:
        raise ImagesError(
            f"{', '.join(map(str, folders))}: {len(files)} image(s), fewer than one batch of {needed} "
            f"(--batch {config.batch} x {config.world} process(es)); lower --batch"
        )
    if resumed is not None and resumed["images"]["sha256"] != files_digest(files, folders):
        raise ImagesError(
            f"{', '.join(map(str, folders))}: not the images the run was trained on ({len(files)} files now, "
            f"{resumed['images']['count']} then); an exact resume needs the same files"
        )
    check_image_sizes(files, config)
    return files


def files_digest(files: list[Path], folders: list[str]) -> str:
    """The image list's identity: each file's path below its --images folder."""
    digest = hashlib.sha256()
    for path in files:
        root = next((Path(f) for f in folders if path.is_relative_to(Path(f))), path.parent)
        digest.update(f"{path.relative_to(root).as_posix()}\n".encode())
    return digest.hexdigest()


def check_image_sizes(files: list[Path], config: PretrainConfig, sample: int = 200) -> None:
    """Crops are cut from the images and resized: --imgsz more than twice the images' typical short
    side would train on blown-up pixels. Reads the headers of up to `sample` files."""
    step = max(1, len(files) // sample)
    sides = []
    for path in files[::step]:
        try:
            with open_image(path) as image:
                sides.append(min(image.size))
        except (UserError, OSError, ValueError):
            continue  # unreadable: skipped in training, counted there
    if not sides:
        raise ImagesError(f"{files[0].parent}: none of the sampled image files could be read")
    median = int(statistics.median(sides))
    if config.imgsz > 2 * median:
        raise ImagesError(
            f"--imgsz {config.imgsz}: the images' short side is {median} px (median of {len(sides)}), so global crops "
            f"would be blown up more than {config.imgsz / median:.1f}x; use --imgsz {max(median, 1)} or less"
        )


def run_folder(args: argparse.Namespace) -> Path:
    if args.out_dir is None and args.resume:
        return Path(args.resume).parent
    if args.out_dir is None:
        raise UserError("--out-dir NAME is required (the run's folder under outputs/)")
    return output_folder(args.out_dir)


# -- build --------------------------------------------------------------------------------------


@dataclass
class EpochTally:
    """The running sums of an epoch's step statistics (saved in last.pth, so an epoch resumed in its
    middle reports what the uninterrupted one would)."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    unreadable: int = 0

    def add(self, stats: dict[str, float]) -> None:
        self.steps += 1
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def means(self) -> dict[str, float]:
        return {name: round(value / max(self.steps, 1), 6) for name, value in self.sums.items()}


@dataclass
class PretrainRun:
    """What the loop works on; `step` counts optimizer steps over the whole run."""

    config: PretrainConfig
    args: argparse.Namespace
    out_dir: Path
    folders: list[str]  # --images
    files: list[Path]
    method: SelfDistillation | FeatureDistillation
    train_model: torch.nn.Module
    groups: list[ParameterGroup]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    order: EpochOrder
    loader: DataLoader
    device: torch.device
    amp_dtype: torch.dtype | None
    monitor: KnnMonitor | None
    board: Any = None
    step: int = 0
    saved_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    tally: EpochTally = field(default_factory=EpochTally)
    images_record: dict[str, Any] = field(default_factory=dict)  # what last.pth says of --images
    started: float = field(default_factory=time.perf_counter)
    minutes_before: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch()

    def restore(self, checkpoint: dict[str, Any]) -> None:
        if any(key.startswith("gram_anchor.") for key in checkpoint["method"]):
            self.method.take_gram_anchor()
        self.method.load_state_dict(checkpoint["method"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler.is_enabled() and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = self.saved_step = int(checkpoint["step"])
        self.history = list(checkpoint["history"])
        self.tally = EpochTally(**checkpoint["tally"])
        self.minutes_before = float(checkpoint.get("minutes", 0.0))
        print(f"Resumed {self.args.resume}: step {self.step} of {self.config.epochs * self.steps_per_epoch}.")

    def minutes(self) -> float:
        return self.minutes_before + (time.perf_counter() - self.started) / 60

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def build(
    args: argparse.Namespace,
    config: PretrainConfig,
    folders: list[str],
    files: list[Path],
    device: torch.device,
    out_dir: Path,
) -> PretrainRun:
    spec = get_backbone_spec(config.backbone)
    torch.manual_seed(config.seed)  # a random-init backbone and the heads are drawn from the seed
    method = build_method(config)
    method.student.grad_checkpointing = args.grad_checkpointing
    method.to(device)
    normalization = spec.normalization(config.weights)
    multicrop = MultiCrop(
        config.imgsz,
        local_crop_size(config.imgsz, spec.patch_size),
        config.local_crops,
        *normalization,
        color_jitter=config.color_jitter,
    )
    grid = None if config.distilling else (config.imgsz // spec.patch_size,) * 2
    order = EpochOrder(len(files), config.batch, config.seed, world=config.world, rank=rank())
    loader = DataLoader(
        UnlabelledImages(files, multicrop, grid),
        batch_sampler=order,
        num_workers=args.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    groups = parameter_groups(
        method.trained_backbone, method.trained_heads, len(method.trained_backbone.blocks), config
    )
    optimizer = torch.optim.AdamW([{"params": g.params} for g in groups], lr=0.0, betas=(0.9, 0.999))
    amp_dtype = select_precision(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    monitor = None
    if args.monitor:
        monitor = KnnMonitor(args.monitor, config.imgsz, normalization, device, args.workers)
        if isinstance(method, FeatureDistillation):
            teacher_top1 = monitor.set_teacher(method.teacher.backbone, method.teacher_size(config.imgsz))
            print(f"Monitor: the teacher's kNN top-1 on {args.monitor}: {teacher_top1:.3f}")
    run = PretrainRun(
        config,
        args,
        out_dir,
        folders,
        files,
        method,
        distribute(method, device),
        groups,
        optimizer,
        scaler,
        order,
        loader,
        device,
        amp_dtype,
        monitor,
    )
    run.images_record = {"folders": folders, "count": len(files), "sha256": files_digest(files, folders)}
    describe(run)
    return run


def build_method(config: PretrainConfig) -> SelfDistillation | FeatureDistillation:
    student = load_backbone(
        config.backbone,
        source=config.source,
        hub_dir=config.hub_dir,
        weights=config.weights,
        pretrained=config.pretrained,
    )
    if not config.distilling:
        return SelfDistillation(student, config)
    teacher = load_backbone(  # the teacher is Meta's (or --teacher-weights): distilling random weights teaches nothing
        config.distill_from, source=config.source, hub_dir=config.hub_dir, weights=config.teacher_weights
    )
    return FeatureDistillation(student, teacher, config)


def describe(run: PretrainRun) -> None:
    config = run.config
    spec = get_backbone_spec(config.backbone)
    total = config.epochs * run.steps_per_epoch
    what = (
        f"distilling {config.distill_from} into {config.backbone}"
        if config.distilling
        else f"self-distillation of {config.backbone} (DINO + iBOT + KoLeo"
        + (f" + Gram anchoring from {config.gram_start:.0%} of the run" if config.gram_weight else "")
        + ")"
    )
    print(
        f"Recipe {config.recipe}: {what}; {len(run.files)} images, {config.epochs} epochs of {run.steps_per_epoch} "
        f"steps ({total} steps) of batch {config.batch} x {config.world}; crops 2 x {config.imgsz} px"
        + (
            f" + {config.local_crops} x {local_crop_size(config.imgsz, spec.patch_size)} px"
            if config.local_crops
            else ""
        )
        + f"; peak lr {config.lr_at_batch:.2e}; device {run.device}"
    )
    if not config.pretrained and not config.weights:
        print(f"warning: {RANDOM_INIT}")


# -- fit ----------------------------------------------------------------------------------------


def step_seed(seed: int, step: int, process: int) -> int:
    """Drop-path's generator is re-seeded at every step from (seed, step, process): a resumed run
    draws what the uninterrupted one drew, without saving generator states."""
    return (seed * 1_000_003 + step * 7_919 + process * 104_729 + 1) % (2**63)


def fit(run: PretrainRun) -> None:
    config, steps_per_epoch = run.config, run.steps_per_epoch
    total = config.epochs * steps_per_epoch
    if run.step >= total:
        raise UserError(
            f"--epochs {config.epochs}: {run.args.resume} already holds {run.step} steps; give a larger --epochs"
        )
    if run.args.tensorboard and is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        run.board = SummaryWriter(str(run.out_dir / "tensorboard"), purge_step=run.step or None)
    run.method.train()
    while run.step < total:
        epoch, start = divmod(run.step, steps_per_epoch)
        update_gram_anchor(run, epoch, start)
        run.order.set_epoch(epoch, start)
        if not start:
            run.tally = EpochTally()
        tally, images, began = run.tally, 0, time.perf_counter()
        bar = tqdm(
            run.loader,
            desc=f"Epoch {epoch + 1}/{config.epochs}",
            leave=False,
            dynamic_ncols=True,
            disable=not is_main_process(),
            initial=start,
            total=steps_per_epoch,
        )
        for batch in bar:
            tally.unreadable += batch.unreadable
            if batch.size < 2:  # nothing (or one image) readable: nothing to compare
                run.step += 1
                continue
            stats = train_step(run, batch)
            images += batch.size * config.world
            tally.add(stats)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{images / (time.perf_counter() - began):.1f}")
            if run.board is not None:
                for name, value in stats.items():
                    run.board.add_scalar(f"step/{name}", value, run.step)
            if run.args.checkpoint_every and run.step % run.args.checkpoint_every == 0 and run.step % steps_per_epoch:
                save(run)
        bar.close()
        row = {
            "epoch": epoch + 1,
            "step": run.step,
            "minutes": round(run.minutes(), 3),
            "images_per_s": round(images / max(time.perf_counter() - began, 1e-9), 2),
            "unreadable": tally.unreadable,
            **tally.means(),
        }
        if (
            run.monitor is not None
            and is_main_process()
            and ((epoch + 1) % run.args.monitor_every == 0 or run.step >= total)
        ):
            row.update(
                {name: round(value, 4) for name, value in run.monitor.score(run.method.monitored().backbone).items()}
            )
        run.history.append(row)
        print(epoch_line(row))
        check_collapse(row, run)
        save(run)
    print(
        f"Wrote {run.out_dir / 'backbone.pth'} (Meta's layout): use it with "
        f"--weights {run.out_dir / 'backbone.pth'} --backbone {config.backbone} (any script)."
    )


def train_step(run: PretrainRun, batch: Any) -> dict[str, float]:
    """One optimizer step: schedules, forward under autocast, the loss checked, backward, clipping,
    the update, the teacher's EMA."""
    config = run.config
    torch.manual_seed(step_seed(config.seed, run.step, rank()))
    values = schedule_at(config, run.step, run.steps_per_epoch)
    apply_schedule(run.optimizer, run.groups, values)
    batch = type(batch)(
        *(
            t.to(run.device, non_blocking=True) if torch.is_tensor(t) else t
            for t in (batch.global_crops, batch.local_crops, batch.masks, batch.indices, batch.unreadable)
        )
    )
    with autocast(run.device, run.amp_dtype):
        loss, stats = run.train_model(batch, values)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"step {run.step + 1}: loss is {loss.item()}; {run.out_dir / 'last.pth'} (step {run.saved_step}) is the "
            "last good checkpoint; lower --lr, raise --warmup-epochs or use --amp off"
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    params = [p for g in run.groups for p in g.params]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad) if config.clip_grad > 0 else torch.zeros(())
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.method.after_step(values)
    run.step += 1
    return {
        "loss": float(loss.detach()),
        **stats,
        "grad_norm": float(grad_norm),
        "lr": values.lr,
        "teacher_temp": values.teacher_temp,
        "momentum": values.momentum,
    }


def update_gram_anchor(run: PretrainRun, epoch: int, start: int) -> None:
    """DINOv3's Gram teacher: taken from the teacher when the Gram loss starts, re-taken every
    --gram-refresh-epochs after (at epoch starts only, so a resumed run takes it where the
    uninterrupted one did)."""
    config = run.config
    if config.gram_weight <= 0 or start:
        return
    first = math.ceil(config.gram_start * config.epochs)
    due = epoch == first or (
        config.gram_refresh_epochs and epoch > first and (epoch - first) % config.gram_refresh_epochs == 0
    )
    if due:
        run.method.take_gram_anchor()
        print(f"Gram anchor: the teacher at epoch {epoch}.")


def epoch_line(row: dict[str, Any]) -> str:
    shown = (
        "loss",
        "dino",
        "ibot",
        "koleo",
        "gram",
        "cls_distance",
        "patch_distance",
        "feature_spread",
        "prototype_usage",
        "knn_top1",
        "knn_agreement",
        "images_per_s",
    )
    parts = [f"{name} {row[name]:.4g}" for name in shown if name in row]
    skipped = f", {row['unreadable']} unreadable file(s) skipped" if row["unreadable"] else ""
    return f"Epoch {row['epoch']} ({row['minutes']:.1f} min): {', '.join(parts)}{skipped}"


def check_collapse(row: dict[str, Any], run: PretrainRun) -> None:
    """Stop, naming what fell, when the features or the teacher's assignments collapsed; the
    last.pth of the previous epoch is kept."""
    spread, usage = row.get("feature_spread"), row.get("prototype_usage")
    best = max((r.get("feature_spread", 0.0) for r in run.history), default=0.0)
    # a random-init ViT starts near 0 (LayerScale 1e-5 leaves every image's class token alike): only a fall counts
    if spread is not None and spread < COLLAPSE_SPREAD and best >= 10 * COLLAPSE_SPREAD:
        what = (
            f"the feature spread fell to {spread:.4f} (random directions: about 1): every image gets the same features"
        )
    elif usage is not None and usage < 1.5 and run.config.prototypes > 1:
        what = (
            f"the teacher uses {usage:.2f} of its {run.config.prototypes} prototypes: "
            "every image is assigned the same one"
        )
    else:
        return
    raise CollapseError(
        f"collapse at epoch {row['epoch']}: {what}; {run.out_dir / 'last.pth'} (step {run.saved_step}) is the last "
        "checkpoint before it; lower --lr, raise --warmup-epochs or --momentum, or keep --koleo-weight above 0"
    )


# -- files --------------------------------------------------------------------------------------


def save(run: PretrainRun) -> None:
    """last.pth, the backbone files, metrics.csv and the plots, each atomically (Ctrl-C waits)."""
    if not is_main_process():
        run.saved_step = run.step
        return
    with deferred_interrupt():
        checkpoint = {
            "kind": CHECKPOINT_KIND,
            "format": CHECKPOINT_FORMAT,
            "config": run.config.to_dict(),
            "method": run.method.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
            "step": run.step,
            "minutes": run.minutes(),
            "history": run.history,
            "tally": asdict(run.tally),
            "images": run.images_record,
        }
        for name, backbone in run.method.outputs().items():
            state = backbone.meta_state()
            atomic_write(run.out_dir / name, lambda tmp, state=state: torch.save(state, tmp))
        save_checkpoint(checkpoint, run.out_dir / "last.pth")
        if run.history:
            write_csv(run.history, run.out_dir / "metrics.csv")
            plot_history(run)
    run.saved_step = run.step


def plot_history(run: PretrainRun) -> None:
    """loss.png (each loss term per epoch) and, with --monitor, knn.png (kNN top-1 against minutes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = run.history
    title = RANDOM_INIT if not run.config.pretrained and not run.config.weights else ""
    terms = [
        name
        for name in ("loss", "dino", "ibot", "koleo", "gram", "cls_distance", "patch_distance")
        if name in history[-1]
    ]
    curves = [("loss.png", "Epoch", "epoch", terms)]
    if any("knn_top1" in row for row in history):
        curves.append(
            (
                "knn.png",
                "Minutes of training",
                "minutes",
                ["knn_top1"] + (["knn_agreement"] if "knn_agreement" in history[-1] else []),
            )
        )
    for filename, label, axis, names in curves:
        fig, ax = plt.subplots(figsize=(8, 5))
        for name in names:
            rows = [row for row in history if name in row]
            ax.plot([row[axis] for row in rows], [row[name] for row in rows], marker="o", label=name)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        if title:
            ax.set_title(title, fontsize=9)
        atomic_write(run.out_dir / filename, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


# -- flags --------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = FlagParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("images")
    data.add_argument(
        "--images", nargs="+", default=None, metavar="DIR", help="folders of unlabelled images (any depth)"
    )
    data.add_argument(
        "--imgsz",
        type=at_least(2),
        default=None,
        help="global crop side in px (local crops: 96/224 of it); default 224",
    )
    data.add_argument(
        "--local-crops", type=at_least(0), default=None, metavar="N", help="local crops per image (paper: 8)"
    )
    data.add_argument(
        "--color-jitter",
        type=non_negative,
        default=None,
        metavar="S",
        help="multiple of DINOv2's colour-jitter strengths (default 1); higher where colour says nothing of content",
    )
    data.add_argument("--workers", type=at_least(0), default=2, help="data-loading processes")
    add_backbone_args(parser)
    recipe = parser.add_argument_group("recipe (a flag left out takes --recipe's value; docs/pretraining.md)")
    recipe.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="scratch (DINOv2's), continue (default with pretrained weights), small (hundreds of "
        "images on one machine), distill (default with --distill-from)",
    )
    recipe.add_argument("--epochs", type=at_least(1), default=None)
    recipe.add_argument("--batch", type=at_least(2), default=None, help="images per process and step (default 64)")
    recipe.add_argument("--seed", type=int, default=None)
    recipe.add_argument(
        "--lr", type=positive, default=None, help="peak rate at a global batch of 1024, scaled by sqrt(batch/1024)"
    )
    recipe.add_argument("--min-lr", type=non_negative, default=None)
    recipe.add_argument("--warmup-epochs", type=non_negative, default=None)
    recipe.add_argument("--weight-decay", type=non_negative, default=None)
    recipe.add_argument("--weight-decay-end", type=non_negative, default=None)
    recipe.add_argument("--layer-decay", type=unit_interval, default=None, help="layer-wise lr decay (DINOv2: 0.9)")
    recipe.add_argument("--patch-embed-lr-mult", type=non_negative, default=None)
    recipe.add_argument("--clip-grad", type=non_negative, default=None, help="gradient norm clip (0: none)")
    recipe.add_argument(
        "--drop-path", type=unit_interval, default=None, help="stochastic depth of the student's last block"
    )
    recipe.add_argument(
        "--momentum", type=unit_interval, default=None, help="teacher EMA momentum at the start (cosine to 1)"
    )
    recipe.add_argument("--teacher-temp", type=positive, default=None)
    recipe.add_argument("--warmup-teacher-temp", type=positive, default=None)
    recipe.add_argument("--teacher-temp-epochs", type=non_negative, default=None)
    recipe.add_argument("--prototypes", type=at_least(2), default=None, help="DINO head prototypes (paper: 65536)")
    recipe.add_argument("--ibot-prototypes", type=at_least(2), default=None)
    recipe.add_argument("--head-hidden", type=at_least(1), default=None)
    recipe.add_argument(
        "--head-batch-norm",
        action="store_const",
        const=True,
        default=None,
        help="BatchNorm in the DINO head's hidden layers (DINO's use_bn_in_head)",
    )
    recipe.add_argument("--ibot-weight", type=non_negative, default=None)
    recipe.add_argument("--koleo-weight", type=non_negative, default=None)
    recipe.add_argument(
        "--gram-weight",
        type=non_negative,
        default=None,
        help="DINOv3's Gram anchoring (default 2 for DINOv3 ViTs, else 0)",
    )
    recipe.add_argument(
        "--gram-start", type=unit_interval, default=None, help="share of the run before the Gram loss starts"
    )
    recipe.add_argument("--gram-refresh-epochs", type=at_least(0), default=None)
    recipe.add_argument("--freeze-prototypes-epochs", type=non_negative, default=None)
    recipe.add_argument(
        "--frozen-backbone-epochs", type=non_negative, default=None, help="heads only at first (continue: 1)"
    )
    recipe.add_argument(
        "--layerscale-init", type=non_negative, default=None, help="random init: LayerScale start (small: 0.1)"
    )
    recipe.add_argument(
        "--amp", default=None, choices=("auto", "bf16", "fp16", "off"), help="mixed precision (auto: bf16 on CUDA)"
    )
    distill = parser.add_argument_group("distillation")
    distill.add_argument(
        "--distill-from", default=None, metavar="NAME", help="a frozen teacher backbone (e.g. dinov2_vitb14)"
    )
    distill.add_argument(
        "--teacher-weights", default=None, metavar="PATH", help="the teacher's weights file (default: its source's)"
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out-dir", default=None, help="run folder under outputs/")
    run.add_argument(
        "--resume", default=None, metavar="LAST", help="continue a run from its last.pth (only --epochs may change)"
    )
    run.add_argument("--exist-ok", action="store_true", help="start over in an --out-dir that holds another run")
    run.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1")
    run.add_argument(
        "--monitor", default=None, metavar="DIR", help="labelled folder (classify.py's layout): kNN top-1 per epoch"
    )
    run.add_argument("--monitor-every", type=at_least(1), default=1, metavar="E")
    run.add_argument(
        "--checkpoint-every",
        type=at_least(0),
        default=0,
        metavar="STEPS",
        help="last.pth also every N steps (0: per epoch)",
    )
    run.add_argument("--tensorboard", action="store_true", help="curves to <run folder>/tensorboard")
    run.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute block activations in backward (less memory)"
    )
    run.add_argument("--dist-timeout", type=positive, default=30, metavar="MIN")
    return parser


if __name__ == "__main__":
    run_cli(main, get_args_parser())
