"""Every migration of an older checkpoint format, in one place: a checkpoint (or an exported
model's description) is brought to today's layout when it is read, so the code that uses it reads
one format. Format 0 (no "format" entry) and 1 checkpoints, and ONNX files exported from them,
keep loading; tests/test_checkpoint_compat.py holds a fixture of each and says which it is."""

from __future__ import annotations

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
    arch.setdefault("registers", spec.hub_name.endswith("_reg"))
    info.setdefault("patch_size", spec.patch_size)  # before DINOv3: from the backbone's name
    info.setdefault("prefix_tokens", spec.prefix_tokens)
    info.setdefault("licence", spec.licence)
    info.setdefault("hub_dir", None)
    info["arch"] = arch
    return info
