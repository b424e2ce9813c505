"""The checkpoint format: what a checkpoint says about its model, typed (`ModelDescription`,
`BackboneDescription`), and every migration of an older format, in one place: a checkpoint (or an
exported model's description) is brought to today's layout when it is read, so the code that uses
it reads one format. Format 0 (no "format" entry) and 1 checkpoints, and ONNX files exported from them,
keep loading; tests/test_checkpoint_compat.py holds a fixture of each and says which it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model_config import get_backbone_spec

CHECKPOINT_FORMAT = 2  # 2: model_info names its task; --recipe "seed" is "article"
RENAMED_RECIPES = {"seed": "article"}  # the reference article's recipe, named after it since format 2


def migrate_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A train.py checkpoint of any format in today's layout (a new dict; the tensors are shared)."""
    args = dict(checkpoint.get("args", {}))
    if args:
        args.setdefault("scheduler", "multistep")  # before --scheduler: the article's MultiStepLR
        args["recipe"] = RENAMED_RECIPES.get(args.get("recipe", "seed"), args.get("recipe", "seed"))
    return {
        **checkpoint,
        "format": CHECKPOINT_FORMAT,
        "model_info": migrate_model_info(checkpoint["model_info"]),
        "args": args,
        "overrides": list(checkpoint.get("overrides", [])),
        "scaler": checkpoint.get("scaler", {}),
    }


def migrate_model_info(info: dict[str, Any]) -> dict[str, Any]:
    """A `model_info` of any format (a checkpoint's, an ONNX file's metadata) in today's layout."""
    info, arch = dict(info), dict(info["arch"])
    if "task" not in info:  # before tasks were recorded, every model was a segmentation model
        info["task"] = "segmentation"
        arch.setdefault("head_layers", 4)  # before --head-layers: the last four blocks
        arch.setdefault("dropout", 0.0)  # before --head-dropout
        info.setdefault("mask_format", "auto")  # before masks were checked: decided per file
    arch.setdefault("padding", "bottom_right")  # before Meta's centred padding was offered
    arch.setdefault("normalization", "imagenet")  # before SAT-493M weights were served
    spec = get_backbone_spec(arch["backbone"], arch.get("registers", False))
    arch["backbone"] = spec.hub_name  # before DINOv3, a DINOv2 backbone was named by its size ("small")
    arch["registers"] = spec.hub_name.endswith("_reg")
    info.setdefault("patch_size", spec.patch_size)  # before DINOv3: from the backbone's name
    info.setdefault("prefix_tokens", spec.prefix_tokens)
    info.setdefault("licence", spec.licence)
    info.setdefault("hub_dir", None)
    info["arch"] = arch
    return info


BACKBONE_ARCH = ("backbone", "registers", "source", "padding", "normalization")  # model.arch's backbone half


@dataclass(frozen=True)
class BackboneDescription:
    """What rebuilds a model's backbone and feeds it: Meta's hub name, whose code builds it, how images
    are padded and normalised, its token layout, and (a head-only checkpoint) where its frozen
    weights are (path, size, SHA-256)."""

    name: str  # Meta's hub name: dinov2_vits14_reg, dinov3_vits16, ...
    source: str  # hub | local | timm
    hub_dir: str | None
    padding: str  # bottom_right | center
    normalization: str  # imagenet | sat493m
    patch_size: int
    prefix_tokens: int  # class token + registers / storage tokens before the patch tokens
    licence: str
    weights: dict[str, Any] | None = None

    @property
    def registers(self) -> bool:
        return self.name.endswith("_reg")

    def rebuild_keywords(self) -> dict[str, Any]:
        """model.DenseModel's backbone keywords for the architecture alone (the checkpoint holds the weights)."""
        return {
            "backbone": self.name,
            "registers": False,  # the hub name says it
            "pretrained": False,
            "padding": self.padding,
            "normalization": self.normalization,
        }


@dataclass(frozen=True)
class ModelDescription:
    """A model as its checkpoint (or exported file) describes it, in today's format: its task, its
    backbone, its head's architecture (the task's keywords), the size it was trained at and its
    normalisation, and the task's own fields (classes and colours, or the depth range) with where it
    was trained (`data_dir`). Stored as the flat `model_info` dict (`to_info`), read back through
    `from_info`, which migrates any older format first."""

    task: str
    backbone: BackboneDescription
    head: dict[str, Any]
    imgsz: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> ModelDescription:
        info = migrate_model_info(info)
        arch = info["arch"]
        spec = get_backbone_spec(arch["backbone"], arch["registers"])
        backbone = BackboneDescription(
            name=spec.hub_name,
            source=arch["source"],
            hub_dir=info["hub_dir"],
            padding=arch["padding"],
            normalization=arch["normalization"],
            patch_size=int(info["patch_size"]),
            prefix_tokens=int(info["prefix_tokens"]),
            licence=info["licence"],
            weights=info.get("backbone_weights"),
        )
        described = {"task", "arch", "hub_dir", "imgsz", "mean", "std", "patch_size", "prefix_tokens", "licence"}
        return cls(
            task=info["task"],
            backbone=backbone,
            head={key: value for key, value in arch.items() if key not in BACKBONE_ARCH},
            imgsz=tuple(info["imgsz"]),
            mean=tuple(info["mean"]),
            std=tuple(info["std"]),
            fields={key: value for key, value in info.items() if key not in described | {"backbone_weights"}},
        )

    def to_info(self) -> dict[str, Any]:
        """The flat `model_info` dict checkpoints and exported files store."""
        backbone = self.backbone
        arch = {
            "backbone": backbone.name,
            "registers": backbone.registers,
            "source": backbone.source,
            "padding": backbone.padding,
            "normalization": backbone.normalization,
            **self.head,
        }
        info = {
            "task": self.task,
            "arch": arch,
            "hub_dir": backbone.hub_dir,
            "imgsz": list(self.imgsz),
            "mean": list(self.mean),
            "std": list(self.std),
            "patch_size": backbone.patch_size,
            "prefix_tokens": backbone.prefix_tokens,
            "licence": backbone.licence,
            **self.fields,
        }
        if backbone.weights is not None:
            info["backbone_weights"] = backbone.weights
        return info
