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
from dinokit.backbones.released_heads import META_IMGSZ, SPEC_BY_CLASSES, HeadWeightsError, read_checked_head
from dinokit.backbones.settings import moved_weights
from dinokit.backbones.weights_file import check_weights_unchanged, is_url, weights_identity
from dinokit.data.file_kinds import FileKindError, read_torch_file, torch_contents
from dinokit.data.labels import DatasetSpec
from dinokit.depth.released import DepthHeadError, is_depth_head_name, read_depth_head
from dinokit.writing import atomic_write
from model import BackboneModel, DinoDepth, Dinov2Segmentation
from model_config import canonical_name, get_backbone_spec
from utils import broadcast_object, broadcast_state, is_main_process

CHECKPOINT_FORMAT = 1
BACKBONE_PREFIX = "backbone."  # the backbone's tensors in a model's state dict


def model_info(model: Dinov2Segmentation, spec: DatasetSpec, imgsz: tuple[int, int], **extra: Any) -> dict[str, Any]:
    """Everything inference needs to rebuild and interpret the model, without config.py (`extra`:
    what the run adds, e.g. the data folder evaluate.py scores by default)."""
    return {
        "arch": dict(model.arch),
        "hub_dir": model.hub_dir,
        "classes": list(spec.classes),
        "colors": [list(c) for c in spec.colors],
        "ignore_index": spec.ignore_index,
        "ignore_colors": [list(c) for c in spec.ignore_colors],
        "mask_format": spec.mask_format,
        "imgsz": list(imgsz),
        "mean": list(model.mean),
        "std": list(model.std),
        # read from the backbone: the size rules and token layout of inference and export
        "patch_size": model.patch_size,
        "prefix_tokens": model.spec.prefix_tokens,
        "licence": model.spec.licence,
        **extra,
    }


def info_patch_size(info: dict[str, Any]) -> int:
    """The patch size a model_info's backbone works in (checkpoints from before it was stored: from
    the backbone's name)."""
    if "patch_size" in info:
        return int(info["patch_size"])
    arch = info.get("arch", {})
    return get_backbone_spec(arch.get("backbone", "small"), arch.get("registers", False)).patch_size


def dataset_spec(info: dict[str, Any], source: str) -> DatasetSpec:
    """The dataset description a model was trained with, back from its `model_info`."""
    return DatasetSpec(
        info["classes"],
        [tuple(c) for c in info["colors"]],
        [tuple(c) for c in info["ignore_colors"]],
        info["ignore_index"],
        info.get("mask_format", "auto"),
        source=source,
    )


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
    path: str | Path, map_location: str | torch.device = "cpu", *, kind: str = "segmentation"
) -> dict[str, Any]:
    """Load one of our checkpoints safely (`weights_only=True`: no code runs from the file):
    train.py's segmentation checkpoints, or (kind=CLASSIFIER_KIND) classify.py's classifiers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    wanted = "image classifier" if kind == CLASSIFIER_KIND else "training checkpoint"
    checkpoint = read_torch_file(path, wanted, map_location)
    if torch_contents(checkpoint) is None:
        raise FileKindError(
            f"{path}: not a checkpoint written by {'classify.py' if kind == CLASSIFIER_KIND else 'train.py'}"
        )
    return checkpoint


def build_model_from_checkpoint(
    checkpoint: dict[str, Any], device: torch.device | str = "cpu", *, timm: bool = False
) -> torch.nn.Module:
    """Rebuild the trained model from a checkpoint alone (architecture from `model_info`, weights from `model`).

    A model trained with Meta's hub code needs that code again; where it cannot be had (offline, no
    cache, the --hub-dir clone gone), or with `timm=True` (ONNX export traces timm's code), the same
    architecture is built with timm and the keys converted: the features agree to float rounding.
    """
    info = checkpoint["model_info"]
    arch = info["arch"]
    architecture, common = rebuild_arguments(info)
    state = checkpoint["model"]
    record = info.get("backbone_weights")
    if record is not None:  # a head-only checkpoint: the frozen backbone from its weights again
        weights = check_backbone_file(record, "the checkpoint", canonical_name(arch["backbone"], arch["registers"]))
        common = {**common, "pretrained": True, "weights": weights}
    model = None
    if not timm or arch["source"] == "timm":
        try:
            model = architecture(source=arch["source"], hub_dir=info.get("hub_dir"), **common)
        except BackboneUnavailableError as err:
            if arch["source"] == "timm":
                raise
            print(
                f"note: {str(err).split(';')[0]}; rebuilding the same architecture with timm instead", file=sys.stderr
            )
    if model is None:  # Meta's architecture in timm's code: convert the keys
        model = architecture(source="timm", **common)
        state = hub_state_to_timm(state, model.backbone)
    try:
        load_state(model, state, head_only=record is not None, where="the checkpoint")  # its file checked above
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint weights do not fit the model its model_info describes ({arch}): {str(err).splitlines()[0]}"
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
    record = checkpoint["model_info"].get("backbone_weights")
    if record is not None:
        arch = checkpoint["model_info"]["arch"]
        check_backbone_file(record, where, canonical_name(arch["backbone"], arch["registers"]))
    load_state(model, checkpoint["model"], head_only=record is not None, where=where)


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


def rebuild_arguments(info: dict[str, Any]) -> tuple[type[BackboneModel], dict[str, Any]]:
    """The model class of a `model_info` (its task) and the keywords that rebuild its architecture,
    without pretrained weights (the checkpoint holds them)."""
    arch = info["arch"]
    common = dict(
        backbone=arch["backbone"],
        registers=arch["registers"],
        pretrained=False,
        padding=arch.get("padding", "bottom_right"),
        normalization=arch.get("normalization", "imagenet"),
    )  # older checkpoints: bottom_right padding, ImageNet's normalisation
    if info.get("task") == "depth":
        keys = ("head", "taps", "min_depth", "max_depth", "batch_norm")
        return DinoDepth, {**common, **{key: arch[key] for key in keys}}
    extra = dict(
        num_classes=arch["num_classes"], head_layers=arch.get("head_layers", 4), dropout=arch.get("dropout", 0.0)
    )
    return Dinov2Segmentation, {**common, **extra}  # older: 4 blocks, no dropout


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
        self.overrides = list(checkpoint.get("overrides", [])) + list(overrides)

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
    **backbone_kwargs,
) -> tuple[Dinov2Segmentation, dict[str, Any]]:
    """A ready model (backbone + Meta's head, centred padding) and its `model_info`: classes and
    palette of VOC 2012 (21 classes) or ADE20K (150), by the head's class count; a depth head
    (nyu_linear4, ... or such a file) gives a `DinoDepth` and its depth range."""
    if is_depth_head(path_or_name):
        return depth_model_with_head(path_or_name, backbone=backbone, registers=registers, **backbone_kwargs)
    where = str(path_or_name)
    head, layers = read_checked_head(path_or_name, backbone, registers, head_layers)
    num_classes = head["classifier.weight"].shape[0]
    if num_classes not in SPEC_BY_CLASSES:
        raise HeadWeightsError(f"{where}: a head for {num_classes} classes, neither VOC 2012 (21) nor ADE20K (150)")
    model = Dinov2Segmentation(
        num_classes, backbone=backbone, registers=registers, head_layers=layers, padding="center", **backbone_kwargs
    )
    model.head.load_state_dict(head, strict=False)  # num_batches_tracked is optional
    return model.eval(), model_info(model, SPEC_BY_CLASSES[num_classes], META_IMGSZ)


def is_depth_head(path_or_name: str | Path) -> bool:
    """Whether --head-weights names one of Meta's depth heads or holds one (by content)."""
    if not Path(path_or_name).is_file():
        return is_depth_head_name(str(path_or_name))
    try:
        value = read_torch_file(path_or_name, "depth head")
    except FileKindError:  # another kind of file: the segmentation path names it
        return False
    return torch_contents(value) == "depth head"


def depth_model_with_head(
    path_or_name: str | Path, *, backbone: str = "small", registers: bool = False, **backbone_kwargs: Any
) -> tuple[DinoDepth, dict[str, Any]]:
    """Meta's depth head on its backbone, as dinov2/hub/depthers.py builds it (dinokit/depth/released.py),
    and its `model_info` (task, depth range, normalisation, the size it runs at by default)."""
    state, released = read_depth_head(path_or_name, backbone, registers)
    model = DinoDepth(
        head=released.head,
        taps=released.taps,
        min_depth=released.min_depth,
        max_depth=released.max_depth,
        backbone=backbone,
        registers=registers,
        padding="center",
        **backbone_kwargs,
    )
    missing, _ = model.head.load_state_dict(state, strict=False)  # extra tensors (none known) are ignored
    if missing:
        raise DepthHeadError(f"{path_or_name}: the head file lacks {', '.join(missing[:3])} (a damaged file?)")
    return model.eval(), depth_info(model, META_IMGSZ, dataset=released.dataset)


def depth_info(model: DinoDepth, imgsz: tuple[int, int], **extra: Any) -> dict[str, Any]:
    """A depth model's `model_info`: what inference needs to rebuild and interpret it."""
    return {
        "task": "depth",
        "arch": dict(model.arch),
        "hub_dir": model.hub_dir,
        "imgsz": list(imgsz),
        "mean": list(model.mean),
        "std": list(model.std),
        "patch_size": model.patch_size,
        "min_depth": model.head.min_depth,
        "max_depth": model.head.max_depth,
        "licence": model.spec.licence,
        **extra,
    }
