"""Train a linear segmentation head on DINOv2 features (frozen backbone), or fine-tune everything.

    python train.py --epochs 20 --imgsz 640 640 --out-dir transfer_learning --batch 2
    python train.py --epochs 20 --imgsz 640 640 --out-dir fine_tuning --batch 2 --fine-tune

Writes to outputs/<out-dir>/: best_model_loss.pth, best_model_iou.pth, final_model.pth,
last.pth (for --resume), metrics.csv, loss/accuracy/miou PNG curves and test_metrics.json.
Runs under torchrun for several GPUs or machines (see README).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import config
from datasets import DatasetSpec, build_datasets, check_imgsz, load_dataset_spec, epoch_seed, eval_transform, make_loader, round_to_patch, set_epoch
from engine import EpochResult, FeatureCache, NonFiniteLossError, default_cache_budget, train_one_epoch, validate
from model import SOURCES, Dinov2Segmentation
from model_config import PATCH_SIZE, SIZES
from utils import (
    AMP_CHOICES,
    CHECKPOINT_FORMAT,
    atomic_write,
    distributed,
    init_distributed,
    is_main_process,
    load_checkpoint,
    run_cli,
    save_checkpoint,
    save_plots,
    seed_everything,
    select_precision,
    sync_buffers,
    world_size,
    write_metrics_csv,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=str(config.DATA_DIR), help="dataset root with {train,valid}_{images,labels}/")
    data.add_argument("--classes", default=None, metavar="FILE",
                      help="dataset description (JSON); default: <data-dir>/classes.json, else the VOC classes")
    data.add_argument("--imgsz", type=int, nargs=2, default=config.IMG_SIZE, metavar=("W", "H"),
                      help="training/validation size; rounded up to a multiple of 14 (640 -> 644)")
    data.add_argument("--workers", type=int, default=config.WORKERS, help="DataLoader worker processes")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="small", choices=SIZES, help="DINOv2 size: ViT-S/B/L/g 14")
    model.add_argument("--registers", action="store_true", help="use the DINOv2 variant with 4 registers")
    model.add_argument("--source", default="hub", choices=SOURCES,
                       help="hub: torch.hub (Meta's code, GitHub + cache); timm; local: needs --hub-dir")
    model.add_argument("--hub-dir", default=None, metavar="PATH",
                       help="local clone of github.com/facebookresearch/dinov2 (implies --source local)")
    model.add_argument("--weights", default=None, metavar="PATH", help="local DINOv2 backbone state dict, e.g. dinov2_vits14_pretrain.pth")
    model.add_argument("--no-pretrained", action="store_true", help="random-init backbone (offline smoke runs only)")
    model.add_argument("--fine-tune", action="store_true", help="train the backbone too (default: frozen backbone)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=config.EPOCHS)
    optim.add_argument("--batch", type=int, default=config.BATCH_SIZE, help="images per step")
    optim.add_argument("--lr", type=float, default=config.LEARNING_RATE, help="AdamW learning rate")
    optim.add_argument("--weight-decay", type=float, default=config.WEIGHT_DECAY)
    optim.add_argument("--scheduler-epochs", type=int, nargs="+", default=None, metavar="E",
                       help="epochs after which the LR is multiplied by --scheduler-gamma (MultiStepLR)")
    optim.add_argument("--scheduler-gamma", type=float, default=0.1)
    optim.add_argument("--backbone-lr", type=float, default=None,
                       help="with --fine-tune: the backbone's learning rate (default: --lr / 10; the head keeps --lr)")

    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                       help="mixed precision: auto = bf16 (or fp16 + loss scaling) on CUDA, off on CPU/MPS")
    speed.add_argument("--grad-checkpointing", action="store_true",
                       help="with --fine-tune: recompute block activations in backward (much less memory, ~30%% slower)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the backbone (first epoch pays the compile time)")
    speed.add_argument("--no-val-cache", action="store_true",
                       help="re-run a frozen backbone on the validation split every epoch instead of caching its features")
    speed.add_argument("--cache-train-features", action="store_true",
                       help="frozen backbone, no augmentation: compute training features once and train the head on them")
    speed.add_argument("--cache-ram-gb", type=float, default=None,
                       help="feature caches larger than this go to a file in the run folder (default: a quarter of RAM)")

    run = parser.add_argument_group("run")
    run.add_argument("--out-dir", default=None, help="run folder under outputs/ (default: transfer_learning or fine_tuning)")
    run.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    run.add_argument("--seed", type=int, default=config.SEED)
    run.add_argument("--resume", default=None, metavar="CKPT", help="continue from a last.pth of an earlier run")
    run.add_argument("--dist-timeout", type=float, default=30, metavar="MIN",
                     help="torchrun: minutes a process waits for a dead or stuck peer before failing")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Reject flag values that would only fail later, with the flag's name in the message."""
    for flag in ("epochs", "batch"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    check_imgsz(args.imgsz, PATCH_SIZE)
    if args.lr <= 0 or (args.backbone_lr is not None and args.backbone_lr <= 0):
        raise ValueError(f"--lr and --backbone-lr must be > 0, got {args.lr}, {args.backbone_lr}")
    if args.cache_train_features and args.fine_tune:
        raise ValueError("--cache-train-features needs a frozen backbone; drop --fine-tune")
    if args.grad_checkpointing and not args.fine_tune:
        raise ValueError("--grad-checkpointing only matters with --fine-tune (a frozen backbone stores no activations)")


def model_info(model: Dinov2Segmentation, spec: DatasetSpec, imgsz: tuple[int, int]) -> dict[str, Any]:
    """Everything inference needs to rebuild and interpret the model, without config.py."""
    return {
        "arch": dict(model.arch),
        "hub_dir": model.hub_dir,
        "classes": list(spec.classes),
        "colors": [list(c) for c in spec.colors],
        "ignore_index": spec.ignore_index,
        "ignore_colors": [list(c) for c in spec.ignore_colors],
        "mask_format": spec.mask_format,
        "imgsz": list(imgsz),
        "mean": list(config.MEAN),
        "std": list(config.STD),
    }


def check_resume_matches(checkpoint: dict[str, Any], args: argparse.Namespace, num_classes: int, path: str) -> None:
    """The flags must describe the checkpoint's model; name the first field that differs."""
    arch = checkpoint["model_info"]["arch"]
    family = {"hub": "meta", "local": "meta", "timm": "timm"}  # hub and local share Meta's parameter names
    fields = [
        ("--backbone", arch["backbone"], args.backbone),
        ("--registers", arch["registers"], args.registers),
        ("number of classes", arch["num_classes"], num_classes),
        ("--source", family[arch["source"]], family[args.source]),
        ("--fine-tune", checkpoint.get("args", {}).get("fine_tune", args.fine_tune), args.fine_tune),
    ]
    for name, saved, given in fields:
        if saved != given:
            shown = arch["source"] if name == "--source" else saved
            raise ValueError(f"{path}: checkpoint was trained with {name} {shown!r} but this run has {given!r}")


def _plain(value: Any) -> Any:
    """argparse values as plain Python types, so checkpoints load with weights_only=True."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def print_epoch(kind: str, result: EpochResult) -> None:
    print(f"{kind} Epoch Loss: {result.loss:.4f}, {kind} Epoch PixAcc: {result.pixel_accuracy:.4f}, "
          f"{kind} Epoch mIOU: {result.miou:.4f}")


def main(args: argparse.Namespace) -> None:
    check_args(args)
    device = init_distributed(args.device, args.dist_timeout)
    if args.cache_train_features and world_size() > 1:
        raise ValueError("--cache-train-features is not supported under torchrun yet; run it in one process")
    seed_everything(args.seed)
    imgsz = round_to_patch(args.imgsz, PATCH_SIZE)
    if list(imgsz) != list(args.imgsz):
        print(f"Note: --imgsz {args.imgsz[0]} {args.imgsz[1]} rounded up to {imgsz[0]} {imgsz[1]} (a multiple of the patch size {PATCH_SIZE}).")
    out_dir = config.OUTPUT_DIR / (args.out_dir or ("fine_tuning" if args.fine_tune else "transfer_learning"))
    out_dir.mkdir(parents=True, exist_ok=True)

    spec = load_dataset_spec(args.data_dir, args.classes)
    color_map = spec.color_map()
    print(f"{color_map.num_classes} classes from {spec.source}: {', '.join(spec.classes)}")
    train_set, valid_set = build_datasets(args.data_dir, imgsz, spec)
    if args.batch > len(train_set):
        raise ValueError(f"--batch {args.batch} is larger than the training split ({len(train_set)} images in {args.data_dir})")
    pin = device.type == "cuda"
    train_loader = make_loader(train_set, args.batch, True, args.workers, args.seed, pin)
    valid_loader = make_loader(valid_set, args.batch, False, args.workers, args.seed, pin)
    print(f"Training images: {len(train_set)}, validation images: {len(valid_set)}, size {imgsz[0]}x{imgsz[1]}, device {device}")
    if world_size() > 1:
        print(f"Distributed: {world_size()} processes x batch {args.batch} = global batch {args.batch * world_size()} "
              f"per step ({'NCCL' if device.type == 'cuda' else 'gloo'}); --lr applies to the global batch.")

    resumed = load_checkpoint(args.resume) if args.resume else None
    if resumed is not None:  # a mismatch costs seconds, not a backbone download
        check_resume_matches(resumed, args, color_map.num_classes, args.resume)
    model = Dinov2Segmentation(
        color_map.num_classes, args.backbone, args.fine_tune, args.registers, args.source, args.weights,
        pretrained=not args.no_pretrained, hub_dir=args.hub_dir,
    ).to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.compile:
        model.compile_backbone()
    amp_dtype = select_precision(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.scheduler_epochs or [], args.scheduler_gamma)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{sum(p.numel() for p in model.parameters()):,} total parameters, {trainable:,} trainable "
          f"({'fine-tuning' if args.fine_tune else 'frozen backbone'}); precision: "
          f"{str(amp_dtype).removeprefix('torch.') + ' autocast' if amp_dtype else 'fp32'}.")
    info = model_info(model, spec, imgsz)
    train_model = model
    if world_size() > 1:
        if device.type == "cuda":  # SyncBatchNorm needs GPU tensors; on CPU the head normalises per process
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    start_epoch, history = 0, []
    best_loss, best_miou = math.inf, -math.inf
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed.get("scaler", {}))
        start_epoch, history = resumed["epoch"] + 1, resumed["history"]
        best_loss, best_miou = resumed["best"]["loss"], resumed["best"]["miou"]
        print(f"Resumed from {args.resume} at epoch {start_epoch + 1}.")

    # A frozen backbone computes the same validation features every epoch: compute them once.
    budget = int(args.cache_ram_gb * 1e9) if args.cache_ram_gb is not None else default_cache_budget()
    valid_cache = None if args.fine_tune or args.no_val_cache else FeatureCache("valid", budget, out_dir)
    train_cache = FeatureCache("train", budget, out_dir) if args.cache_train_features else None
    shuffle = torch.Generator()  # order of cached training features, reseeded every epoch

    def save(checkpoint: dict[str, Any], name: str) -> None:
        if is_main_process():
            save_checkpoint(checkpoint, out_dir / name)

    def checkpoint_dict(epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "metrics": metrics,
            "best": {"loss": best_loss, "miou": best_miou},
            "history": history,
            "model_info": info,
            "args": {k: _plain(v) for k, v in vars(args).items()},
        }

    try:
        if train_cache is not None:
            print("Note: --cache-train-features trains on un-augmented images (features computed once).")
            train_set.transform = eval_transform(imgsz)
            train_cache.build(model, make_loader(train_set, args.batch, False, args.workers, args.seed, pin), device, amp_dtype)
        for epoch in range(start_epoch, args.epochs):
            print(f"EPOCH: {epoch + 1}/{args.epochs}")
            started = time.perf_counter()
            set_epoch(train_loader, epoch)
            shuffle.manual_seed(epoch_seed(args.seed, epoch))
            train_result = train_one_epoch(train_model, train_loader, optimizer, device, color_map.num_classes,
                                           color_map.ignore_index, epoch + 1, amp_dtype, scaler, train_cache, shuffle)
            sync_buffers(model)  # every rank validates, and rank 0 saves, the same model
            valid_result = validate(model, valid_loader, device, color_map.num_classes, color_map.ignore_index,
                                    amp_dtype=amp_dtype, cache=valid_cache)
            scheduler.step()
            seconds = time.perf_counter() - started
            print_epoch("Train", train_result)
            print_epoch("Valid", valid_result)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_result.loss, "train_pixacc": train_result.pixel_accuracy, "train_miou": train_result.miou,
                "valid_loss": valid_result.loss, "valid_pixacc": valid_result.pixel_accuracy, "valid_miou": valid_result.miou,
                "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
            }
            history.append(row)
            metrics = {k: v for k, v in row.items() if k.startswith(("train_", "valid_"))}
            if valid_result.loss < best_loss:
                best_loss = valid_result.loss
                print(f"Best validation loss: {best_loss:.4f}\nSaving best model for epoch: {epoch + 1}")
                save(checkpoint_dict(epoch, metrics), "best_model_loss.pth")
            if valid_result.miou > best_miou:
                best_miou = valid_result.miou
                print(f"Best validation IoU: {best_miou:.4f}\nSaving best model for epoch: {epoch + 1}")
                save(checkpoint_dict(epoch, metrics), "best_model_iou.pth")
            save(checkpoint_dict(epoch, metrics), "last.pth")
            if is_main_process():
                write_metrics_csv(history, out_dir / "metrics.csv")
                save_plots(history, out_dir)
            print(f"LR for next epoch: {scheduler.get_last_lr()}  ({seconds:.1f} s)")
            print("-" * 50)

        save(checkpoint_dict(args.epochs - 1, history[-1] if history else {}), "final_model.pth")
        if distributed():
            torch.distributed.barrier()  # rank 0 has finished writing the checkpoints

        best_path = out_dir / "best_model_iou.pth"
        if not best_path.exists():  # mIoU was nan every epoch (no labelled validation pixel)
            best_path = out_dir / "final_model.pth"
        model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
        print(f"Evaluating {best_path.name} on the validation split")
        test = validate(model, valid_loader, device, color_map.num_classes, color_map.ignore_index, desc="Test",
                        amp_dtype=amp_dtype, cache=valid_cache)
        print(f"Test Loss: {test.loss:.4f}\nTest Pixel Accuracy: {test.pixel_accuracy:.4f}\nTest mIOU: {test.miou:.4f}")
        print("Per-class IoU: " + ", ".join(f"{name} {iou:.4f}" for name, iou in zip(spec.classes, test.iou) if iou == iou))
        if is_main_process():
            report = {"checkpoint": best_path.name, "loss": test.loss, "pixel_accuracy": test.pixel_accuracy, "miou": test.miou,
                      "iou": dict(zip(spec.classes, test.iou)), "processes": world_size()}
            atomic_write(out_dir / "test_metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
        print(f"Outputs in {out_dir}")
    except NonFiniteLossError as err:
        last = out_dir / "last.pth"
        kept = f"{last} (epoch {len(history)}) is the last good checkpoint" if last.exists() else "no checkpoint was written"
        raise NonFiniteLossError(f"training diverged: {err}; {kept}; lower --lr or use --amp off") from err
    except KeyboardInterrupt:
        command = sys.argv[1:]
        if "--resume" in command:
            del command[command.index("--resume"): command.index("--resume") + 2]
        print(f"\nInterrupted. {out_dir / 'last.pth'} holds epoch {len(history)}; continue with:\n"
              f"  python train.py {' '.join(command)} --resume {out_dir / 'last.pth'}", file=sys.stderr)
        sys.exit(130)
    finally:
        for cache in (valid_cache, train_cache):
            if cache is not None:
                cache.close()


def build_optimizer(model: Dinov2Segmentation, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW over what trains: the head at --lr; with --fine-tune the backbone at --backbone-lr
    (default --lr / 10), since a foundation model's features degrade at a freshly initialised head's rate."""
    groups = [{"params": list(model.head.parameters()), "lr": args.lr}]
    if args.fine_tune:
        groups.append({"params": list(model.backbone.parameters()), "lr": args.backbone_lr or args.lr / 10})
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
