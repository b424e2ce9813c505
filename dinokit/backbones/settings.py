"""One setting for every script's backbone: environment variables read when a script starts.

    export DINOKIT_WEIGHTS_DIR=~/weights      # Meta's .pth files under their own names
    export DINOKIT_SOURCE=timm                # builds offline; or: hub, local (with DINOKIT_HUB_DIR)
    export DINOKIT_HUB_DIR=~/dinov2           # a clone of facebookresearch/dinov2 or /dinov3

Flags given on the command line win. With DINOKIT_WEIGHTS_DIR set and no --weights, a script
takes the file Meta publishes for the chosen backbone from that folder (`dinov2_vits14_pretrain.pth`,
`dinov2_vits14_reg4_pretrain.pth`, `dinov3_vits16_pretrain_lvd1689m-08c60483.pth`, ...), so a
machine without internet is set up once, not per command (docs/backbones.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dinokit.backbones.weights_file import weights_identity
from dinokit.errors import UserError
from model_config import SOURCES, get_backbone_spec

WEIGHTS_DIR, SOURCE, HUB_DIR = "DINOKIT_WEIGHTS_DIR", "DINOKIT_SOURCE", "DINOKIT_HUB_DIR"
SETTING_HINT = (
    f"to set this up once for every script: export {WEIGHTS_DIR}=FOLDER_OF_META_PTH_FILES and "
    f"{SOURCE}=timm (docs/backbones.md)"
)


def meta_file_patterns(hub_name: str) -> list[str]:
    """The names Meta publishes a backbone's weights under (glob patterns, preferred first)."""
    if hub_name.startswith("dinov2"):
        stem = hub_name.replace("_reg", "_reg4")
        return [f"{stem}_pretrain.pth"]
    return [f"{hub_name}_pretrain_lvd1689m*.pth", f"{hub_name}_pretrain_*.pth"]


def weights_in_folder(folder: Path, hub_name: str) -> Path:
    """The weights file of `hub_name` in `folder` ($DINOKIT_WEIGHTS_DIR), or a one-line error."""
    if not folder.is_dir():
        raise UserError(f"{WEIGHTS_DIR}={folder}: no such folder")
    for pattern in meta_file_patterns(hub_name):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise UserError(
        f"{WEIGHTS_DIR}={folder}: no weights file for {hub_name} in it (looked for "
        f"{' or '.join(meta_file_patterns(hub_name))}); put Meta's file there, or give --weights FILE"
    )


def moved_weights(stored: dict, hub_name: str) -> dict:
    """A weights identity (weights_file.weights_identity) whose recorded file is gone, found again by
    content in $DINOKIT_WEIGHTS_DIR (a checkpoint or index copied to another machine); else the
    stored identity, for the caller's refusal to name."""
    folder = os.environ.get(WEIGHTS_DIR)
    if Path(stored["path"]).is_file() or not folder:
        return stored
    try:
        candidate = weights_identity(weights_in_folder(Path(folder).expanduser(), hub_name))
    except UserError:
        return stored
    return candidate if candidate["sha256"] == stored["sha256"] else stored


def default_source() -> str:
    """--source's default: $DINOKIT_SOURCE, else torch.hub."""
    return os.environ.get(SOURCE) or "hub"


def default_hub_dir() -> str | None:
    """--hub-dir's default: $DINOKIT_HUB_DIR."""
    return os.environ.get(HUB_DIR) or None


def apply_backbone_settings(args: argparse.Namespace) -> None:
    """Check the environment's source and fill --weights from $DINOKIT_WEIGHTS_DIR when the command
    line gives none (module docstring); the other defaults are read when the parser is built."""
    if args.source not in SOURCES:
        raise UserError(f"{SOURCE}={args.source}: must be one of {', '.join(SOURCES)}")
    folder = os.environ.get(WEIGHTS_DIR)
    if folder and args.weights is None and not args.no_pretrained:
        spec = get_backbone_spec(args.backbone, args.registers)
        args.weights = str(weights_in_folder(Path(folder).expanduser(), spec.hub_name))
