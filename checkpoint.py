"""The model's file formats: what train.py saves, loading it safely, rebuilding a model from it
alone, and a training run's checkpoint files; Meta's released heads as a ready model too.

A checkpoint is a plain dict: `format`, `model` (state dict), `optimizer`, `scheduler`, `scaler`,
`epoch`, `metrics`, `best`, `history`, `overrides`, `args`, and `model_info` (`model_info` below:
all that inference needs). Inference needs only `model` and `model_info`.

A frozen backbone whose weights can be had again (a weights file, recorded by path, size and
SHA-256, or the source's own pretrained weights) is not stored: `model` holds the head alone and
`model_info["backbone_weights"]` says where the backbone comes from (ViT-S: about 140 kB instead of
88 MB). A fine-tuned backbone, and a random-init one (it cannot be drawn again), is stored whole.
Checkpoints of either kind, and those written before, load the same way (`build_model_from_checkpoint`,
`load_model_state`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dinokit.backbones.loading import BackboneUnavailableError, hub_state_to_timm
from dinokit.backbones.released_heads import META_IMGSZ
from dinokit.backbones.settings import moved_weights
from dinokit.backbones.weights_file import check_weights_unchanged, is_url, weights_identity
from dinokit.data.file_kinds import FileKindError, read_torch_file, torch_contents
from dinokit.runs.checkpoint_format import (
    BACKBONE_ARCH,
    CHECKPOINT_FORMAT,
    BackboneDescription,
    ModelDescription,
    migrate_checkpoint,
)
from dinokit.tasks import TASKS, get_task
from dinokit.tasks.registry import DEFAULT_TASK
from dinokit.tasks.task import Task
from dinokit.writing import atomic_write
from model import DenseModel
from utils import broadcast_object, broadcast_state, is_main_process

BACKBONE_PREFIX = "backbone."  # the backbone's tensors in a model's state dict


def describe_model(task: Task, model: DenseModel, spec: Any, imgsz: tuple[int, int], **extra: Any) -> dict[str, Any]:
    """A model's `model_info`: everything inference needs to rebuild and interpret it, without
    config.py (dinokit/runs/checkpoint_format.py `ModelDescription`): the backbone and how it is fed,
    the head's architecture, and the task's own part (`task.describe`: classes and colours, or the
    depth range; `extra`: what the run adds, e.g. the data folder evaluate.py scores by default)."""
    backbone = BackboneDescription(
        name=model.spec.hub_name,
        source=model.source,
        hub_dir=model.hub_dir,
        padding=model.padding,
        normalization=model.normalization,
        patch_size=model.patch_size,
        prefix_tokens=model.spec.prefix_tokens,
        licence=model.spec.licence,
    )
    head = {key: value for key, value in model.arch.items() if key not in BACKBONE_ARCH}
    fields = task.describe(model, spec, imgsz, **extra)
    return ModelDescription(
        task.name, backbone, head, tuple(imgsz), tuple(model.mean), tuple(model.std), fields
    ).to_info()


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write atomically; a Ctrl-C during the write is held back until the file is complete."""
    with deferred_interrupt():
        atomic_write(path, lambda tmp: _torch_save(checkpoint, tmp))


def _torch_save(value: Any, path: str) -> None:
    """torch.save through a Python file: a failed write is then the OSError it is (No space left on
    device), not a RuntimeError from torch's zip writer ("unexpected pos ...")."""
    with open(path, "wb") as f:
        try:
            torch.save(value, f)
        except RuntimeError as err:  # the zip writer's own failure while it handles the write's OSError
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise


CLASSIFIER_KIND = "image-classifier"  # the "kind" entry of classify.py's classifier.pth


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, kind: str = "training"
) -> dict[str, Any]:
    """Load one of our checkpoints safely (`weights_only=True`: no code runs from the file):
    train.py's checkpoints of every task, in today's format whatever format they were written in
    (dinokit/runs/checkpoint_format.py), or (kind=CLASSIFIER_KIND) classify.py's classifiers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    wanted = "image classifier" if kind == CLASSIFIER_KIND else "training checkpoint"
    checkpoint = read_torch_file(path, wanted, map_location)
    if torch_contents(checkpoint) is None:
        raise FileKindError(
            f"{path}: not a checkpoint written by {'classify.py' if kind == CLASSIFIER_KIND else 'train.py'}"
        )
    return migrate_checkpoint(checkpoint) if "model_info" in checkpoint else checkpoint


def build_model_from_checkpoint(
    checkpoint: dict[str, Any], device: torch.device | str = "cpu", *, timm: bool = False
) -> torch.nn.Module:
    """Rebuild the trained model from a checkpoint alone (architecture from `model_info`, weights from `model`).

    A model trained with Meta's hub code needs that code again; where it cannot be had (offline, no
    cache, the --hub-dir clone gone), or with `timm=True` (ONNX export traces timm's code), the same
    architecture is built with timm and the keys converted: the features agree to float rounding.
    """
    info = checkpoint["model_info"]
    described = ModelDescription.from_info(info)
    backbone, task = described.backbone, get_task(described.task)
    common, state = backbone.rebuild_keywords(), checkpoint["model"]
    if backbone.weights is not None:  # a head-only checkpoint: the frozen backbone from its weights again
        weights = check_backbone_file(backbone.weights, "the checkpoint", backbone.name)
        common = {**common, "pretrained": True, "weights": weights}
    model = None
    if not timm or backbone.source == "timm":
        try:
            model = task.rebuild(info, source=backbone.source, hub_dir=backbone.hub_dir, **common)
        except BackboneUnavailableError as err:
            if backbone.source == "timm":
                raise
            print(
                f"note: {str(err).split(';')[0]}; rebuilding the same architecture with timm instead", file=sys.stderr
            )
    if model is None:  # Meta's architecture in timm's code: convert the keys
        model = task.rebuild(info, source="timm", **common)
        state = hub_state_to_timm(state, model.backbone)
    try:
        load_state(model, state, head_only=backbone.weights is not None, where="the checkpoint")  # checked above
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint weights do not fit the model its model_info describes ({info['arch']}): "
            f"{str(err).splitlines()[0]}"
        ) from err
    return model.to(device).eval()


def backbone_record(args: Any) -> dict[str, Any] | None:
    """Where a run's frozen backbone can be had again, for a head-only checkpoint; None where the
    backbone must be stored (fine-tuned, random init, or weights behind a signed URL that expires)."""
    if args.fine_tune or args.no_pretrained or (args.weights and is_url(args.weights)):
        return None
    weights = weights_identity(args.weights) if args.weights else None
    return {"source": args.source, "hub_dir": args.hub_dir, "weights": weights}


def without_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's state dict without its backbone's tensors (a head-only checkpoint's `model`)."""
    return {key: value for key, value in state.items() if not key.startswith(BACKBONE_PREFIX)}


def load_model_state(model: torch.nn.Module, checkpoint: dict[str, Any], where: str | Path = "checkpoint") -> None:
    """Load a checkpoint's `model` into `model`: whole, or (a head-only checkpoint) the head, with
    every missing tensor the backbone's, and the backbone's weights file checked to be the one the
    head was trained on."""
    backbone = ModelDescription.from_info(checkpoint["model_info"]).backbone
    if backbone.weights is not None:
        check_backbone_file(backbone.weights, where, backbone.name)
    load_state(model, checkpoint["model"], head_only=backbone.weights is not None, where=where)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, head_only: bool, where: str | Path) -> None:
    """`state` into `model`: strictly, or for a head-only checkpoint every tensor but the backbone's."""
    if not head_only:
        model.load_state_dict(state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = unexpected + [key for key in missing if not key.startswith(BACKBONE_PREFIX)]
    if stray:
        raise ValueError(f"{where}: the head's tensors do not fit the model ({', '.join(stray[:3])})")


def check_backbone_file(record: dict[str, Any], where: str | Path, hub_name: str) -> str | None:
    """The weights file of a head-only checkpoint's backbone (where it was, or moved into
    $DINOKIT_WEIGHTS_DIR), which must still hold the weights its head was trained on."""
    if not record.get("weights"):
        return None
    found = moved_weights(record["weights"], hub_name)
    check_weights_unchanged(
        found,
        f"the frozen backbone of {where} was trained",
        "put that file back, or its copy into $DINOKIT_WEIGHTS_DIR (the head is only valid on its features)",
    )
    return found["path"]


class RunCheckpoints:
    """The checkpoint files of a training run and the state they carry between epochs.

    Owns `best_model_loss.pth`, `best_model_<label>.pth` (the epochs with the best validation loss
    and the best validation `best_on` metric: mIoU -> best_model_iou.pth, a depth run's RMSE ->
    best_model_rmse.pth), `last.pth` (every epoch, for --resume) and `final_model.pth`; keeps the
    history, the best metrics and the flags changed on resume, which every checkpoint carries. Only
    rank 0 writes.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        info: dict[str, Any],
        args: dict[str, Any],
        best_on: tuple[str, str, Callable[[float, float], float]] = ("miou", "IoU", max),
        backbone: dict[str, Any] | None = None,
    ):
        self.out_dir = out_dir
        self.metric, self.label, self.better = best_on  # e.g. ("rmse", "RMSE", min)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.info, self.args = info, args
        self.backbone = backbone  # where a frozen backbone comes from: saved without it (module docstring)
        self.history: list[dict[str, float]] = []
        self.best = {"loss": math.inf, self.metric: -math.inf if self.better is max else math.inf}
        self.overrides: list[dict[str, Any]] = []

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    def restore(self, checkpoint: dict[str, Any], overrides: list[dict[str, Any]] = ()) -> None:
        """Continue a checkpoint's run: its history, best metrics and earlier overrides (+ `overrides`)."""
        self.history = list(checkpoint["history"])
        self.best = dict(checkpoint["best"])
        self.overrides = list(checkpoint["overrides"]) + list(overrides)

    def state(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        model = self.model.state_dict()
        info = self.info
        if self.backbone is not None:
            model, info = without_backbone(model), {**info, "backbone_weights": self.backbone}
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "metrics": metrics,
            "best": dict(self.best),
            "history": self.history,
            "overrides": self.overrides,
            "model_info": info,
            "args": self.args,
        }

    def end_epoch(self, row: dict[str, float]) -> dict[str, float]:
        """Record an epoch (its metrics.csv row): the best checkpoints where it improved, and last.pth.
        Returns what improved: {"loss" / the metric's label: the new best}."""
        self.history.append(row)
        epoch = row["epoch"] - 1
        metrics = {k: v for k, v in row.items() if k.startswith(("train_", "valid_"))}
        improved = {}
        if row["valid_loss"] < self.best["loss"]:
            self.best["loss"] = improved["loss"] = row["valid_loss"]
            self._save(self.state(epoch, metrics), "best_model_loss.pth")
        value = row[f"valid_{self.metric}"]
        if value == value and self.better(value, self.best[self.metric]) != self.best[self.metric]:  # not nan
            self.best[self.metric] = improved[self.label] = value
            self._save(self.state(epoch, metrics), self.best_name)
        self._save(self.state(epoch, metrics), "last.pth")
        return improved

    def save_final(self, epochs: int) -> None:
        self._save(self.state(epochs - 1, self.history[-1] if self.history else {}), "final_model.pth")

    @property
    def best_name(self) -> str:
        return f"best_model_{self.label.lower()}.pth"

    def load_best(self, device: torch.device) -> Path:
        """Load this run's best checkpoint by its metric (final_model.pth if it never improved) into the model.
        Only rank 0 reads the file, which on machines without a shared filesystem only it has; the
        weights reach the other ranks by broadcast."""
        best_path = self.out_dir / self.best_name
        if is_main_process():
            if (
                not best_path.exists()
            ):  # the run folder is this run's alone (dinokit/runs/run_folder.py): nothing stale here
                best_path = self.out_dir / "final_model.pth"
            load_model_state(self.model, load_checkpoint(best_path, map_location=device), best_path)
        broadcast_state(self.model)
        return self.out_dir / broadcast_object(best_path.name)

    def _save(self, checkpoint: dict[str, Any], name: str) -> None:
        if is_main_process():
            save_checkpoint(checkpoint, self.out_dir / name)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it: files being written get finished."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def model_with_head(
    path_or_name: str | Path,
    *,
    backbone: str = "small",
    registers: bool = False,
    head_layers: int | None = None,
    **backbone_kwargs: Any,
) -> tuple[DenseModel, dict[str, Any]]:
    """A ready model (backbone + one of Meta's released heads, centred padding) and its `model_info`:
    the task whose head it is says (VOC 2012 / ADE20K classes by the head's class count; a depth
    head: nyu_linear4, ... or such a file, its depth range)."""
    task = released_head_task(path_or_name)
    model, spec, extra = task.released_model(
        path_or_name, backbone=backbone, registers=registers, head_layers=head_layers, **backbone_kwargs
    )
    return model, describe_model(task, model, spec, META_IMGSZ, **extra)


def released_head_task(path_or_name: str | Path) -> Task:
    """The task whose released head `path_or_name` names or holds (by content); the default task's
    reader names what is wrong with anything else."""
    claimed = [task for task in TASKS.values() if task.claims_released_head(path_or_name)]
    return claimed[0] if claimed else get_task(DEFAULT_TASK)
