"""Meta's released DINOv2 depth heads, by name or file, without mmcv.

Names: `{nyu,kitti}_{linear,linear4,dpt}`, resolved as dinov2/hub/depthers.py does to
`{base}/dinov2_vit{s,b,l,g}14/dinov2_vit…14_{dataset}_{linear,linear4,dpt}_head.pth` and kept in the
torch.hub cache. The files are mmseg checkpoints: `state_dict` with `decode_head.*` keys, which
dinokit/tasks/depth/heads.py mirrors. What the file does not say is taken from Meta's code, with one
correction:

- the blocks: 1 layer = the last; 4 layers and DPT = Meta's `out_index` (S/B 2, 5, 8, 11;
  L 4, 11, 17, 23; g 9, 19, 29, 39), not the last four;
- the depth range: NYU 0.001-10 m, KITTI 0.001-80 m (`_get_depth_range`). Meta's hub code builds
  every *linear* head with `max_depth=80`, whatever the dataset; the NYU heads' bins were trained
  over 0-10 m (dinov2/eval/depth configs), so with 80 every NYU depth comes out 8x too far.
  Here each head gets its dataset's range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinokit.data.file_kinds import read_torch_file
from dinokit.errors import UserError
from model_config import get_backbone_spec

HEAD_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
DEPTH_RANGES = {"nyu": (0.001, 10.0), "kitti": (0.001, 80.0)}  # metres
DEPTH_KINDS = {"linear": ("linear", 1), "linear4": ("linear", 4), "dpt": ("dpt", 4)}  # name -> (head, blocks)
META_DEPTH_TAPS = {
    "dinov2_vits14": (2, 5, 8, 11),
    "dinov2_vitb14": (2, 5, 8, 11),
    "dinov2_vitl14": (4, 11, 17, 23),
    "dinov2_vitg14": (9, 19, 29, 39),
}


class DepthHeadError(UserError):
    """A depth head that cannot be used as asked; the message names the fix."""


@dataclass(frozen=True)
class ReleasedDepthHead:
    """What building Meta's depth model needs beyond the tensors."""

    dataset: str  # nyu | kitti
    head: str  # linear | dpt
    taps: tuple[int, ...]
    min_depth: float
    max_depth: float


def is_depth_head_name(name: str) -> bool:
    dataset, _, kind = str(name).partition("_")
    return dataset in DEPTH_RANGES and kind in DEPTH_KINDS


def depth_head_url(name: str, backbone: str = "small", registers: bool = False) -> str:
    """`nyu_linear4` -> Meta's URL of that head for the backbone."""
    hub_name = _released_backbone(backbone, registers, name)
    return f"{HEAD_BASE_URL}/{hub_name}/{hub_name}_{name}_head.pth"


def _released_backbone(backbone: str, registers: bool, what: str) -> str:
    hub_name = get_backbone_spec(backbone, registers).hub_name
    if hub_name not in META_DEPTH_TAPS:
        raise DepthHeadError(
            f"{what}: Meta released depth heads for dinov2_vits14, _vitb14, _vitl14 and _vitg14 only "
            f"(not {hub_name}); pass one of those to --backbone"
        )
    return hub_name


def read_depth_head(
    path_or_name: str | Path, backbone: str = "small", registers: bool = False
) -> tuple[dict[str, torch.Tensor], ReleasedDepthHead]:
    """The head's tensors (keys of dinokit/tasks/depth/heads.py) and how it is built, checked against the
    backbone: a released name (downloaded once into the torch.hub cache) or such a file."""
    where = str(path_or_name)
    if Path(path_or_name).is_file():
        raw, name = read_torch_file(path_or_name, "depth head"), Path(path_or_name).name
    elif is_depth_head_name(where):
        url = depth_head_url(where, backbone, registers)
        try:
            raw = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except Exception as err:  # URLError, HTTPError, unpickling errors
            file = url.rsplit("/", 1)[1]
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DepthHeadError(
                f"could not load {file} ({url}): {reason}; offline, copy it into $TORCH_HOME/hub/checkpoints/ "
                "or pass its path to --head-weights"
            ) from err
        name = where
    else:
        raise DepthHeadError(f"--head-weights {where}: not a file, and not one of Meta's depth heads")
    state = depth_head_state(raw, where)
    return state, describe(state, name, backbone, registers, where)


def depth_head_state(raw: Any, where: str) -> dict[str, torch.Tensor]:
    """`decode_head.*` tensors (in a `state_dict` or bare) without the prefix."""
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else {}
    head = {k.removeprefix("decode_head."): v for k, v in state.items() if torch.is_tensor(v)}
    if "conv_depth.weight" not in head and "conv_depth.head.0.weight" not in head:
        raise DepthHeadError(f"{where}: not a DINOv2 depth head checkpoint (no decode_head.conv_depth tensors)")
    return head


def describe(
    state: dict[str, torch.Tensor], name: str, backbone: str, registers: bool, where: str
) -> ReleasedDepthHead:
    """Kind, blocks and range of a head, from its tensors and its (released) name."""
    hub_name = _released_backbone(backbone, registers, where)
    width = get_backbone_spec(hub_name).embed_dim
    dataset = next((d for d in DEPTH_RANGES if d in name.lower()), None)
    if dataset is None:
        raise DepthHeadError(
            f"{where}: cannot tell an NYU head (0.001-10 m) from a KITTI one (0.001-80 m); keep 'nyu' or "
            "'kitti' in the file name, as Meta's files have it"
        )
    if "conv_depth.head.0.weight" in state:  # DPT: the readout projection reads [patch, class] of 2 x width
        head, taps = "dpt", META_DEPTH_TAPS[hub_name]
        fits = state["reassemble_blocks.readout_projects.0.0.weight"].shape[-1] == 2 * width
    else:  # linear: [patch, class] of every block it reads, concatenated
        layers = state["conv_depth.weight"].shape[1] / (2 * width)
        head, fits = "linear", layers in (1, 4)
        taps = META_DEPTH_TAPS[hub_name] if layers == 4 else (get_backbone_spec(hub_name).depth - 1,)
    if not fits:
        raise DepthHeadError(
            f"{where}: the head does not read {hub_name}'s {width}-wide blocks; pass the --backbone it was released for"
        )
    return ReleasedDepthHead(dataset, head, tuple(taps), *DEPTH_RANGES[dataset])


def depth_taps(backbone: str, layers: int, registers: bool = False) -> tuple[int, ...]:
    """The blocks a linear depth head of `layers` (1 or 4) reads: 1 = the last; 4 = Meta's
    `out_index` for DINOv2 ViTs, and for other ViTs the last block of each quarter (the rule that
    gives Meta's S/B and g indices)."""
    spec = get_backbone_spec(backbone, registers)
    if layers == 1:
        return (spec.depth - 1,)
    released = META_DEPTH_TAPS.get(spec.hub_name.removesuffix("_reg"))
    return released or tuple(round(spec.depth * quarter / 4) - 1 for quarter in range(1, 5))
