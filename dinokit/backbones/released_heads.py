"""Meta's released DINOv2 segmentation heads, without mmcv or mmsegmentation.

Meta published trained heads beside the backbones, `{base}/dinov2_vit{s,b,l,g}14/
dinov2_vit…14_{voc2012,ade20k}_{linear,ms}_head.pth`: mmseg checkpoints whose
`state_dict` holds the BNHead of dinov2/eval/segmentation/models/decode_heads/linear_head.py —
`decode_head.bn.*` (a BatchNorm over the concatenated block features) and
`decode_head.conv_seg.*` (the 1x1 conv classifier). `linear` heads read the last block, `ms`
heads the last four (resize_concat of equal-sized maps, i.e. a plain concatenation here); both
are exactly this project's `LinearHead`. The model gets Meta's centred padding (model.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dinokit.backbones.ade20k import ADE20K
from dinokit.data.file_kinds import read_torch_file
from dinokit.data.labels import VOC
from dinokit.errors import UserError
from model_config import HEAD_LAYERS, SIZES, get_backbone_spec

HEAD_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
HEAD_KINDS = {"linear": 1, "ms": 4}  # head name -> blocks it reads
HEAD_DATASETS = ("voc2012", "ade20k")
META_IMGSZ = (518, 518)  # whole-mode size for these heads (their evaluation: slide, 512 windows)

SPEC_BY_CLASSES = {21: VOC, 150: ADE20K}  # a head's class count -> its dataset


class HeadWeightsError(UserError):
    """A head file that cannot be used with the chosen backbone; the message names the fix."""


def head_url(name: str, backbone: str = "small", registers: bool = False) -> str:
    """`voc2012_linear` -> Meta's URL of that head for the backbone."""
    dataset, _, kind = name.partition("_")
    if dataset in ("nyu", "kitti"):  # dinokit/tasks/depth/released.py
        raise HeadWeightsError(
            f"--head-weights {name}: one of Meta's depth heads, not a segmentation head; it goes to "
            "--head-weights of infer_image.py / infer_video.py / evaluate.py / app.py"
        )
    if dataset not in HEAD_DATASETS or kind not in HEAD_KINDS:
        names = ", ".join(f"{d}_{k}" for d in HEAD_DATASETS for k in HEAD_KINDS)
        raise HeadWeightsError(f"--head-weights {name}: not a file, and not one of Meta's heads ({names})")
    spec = get_backbone_spec(backbone, registers)
    if spec.family != "dinov2":
        raise HeadWeightsError(
            f"--head-weights {name}: Meta released linear heads for DINOv2 backbones only (for DINOv3 just a "
            f"Mask2Former on the 7B); train a head on {spec.hub_name} with train.py, or pass a DINOv2 --backbone"
        )
    hub_name = spec.hub_name
    return f"{HEAD_BASE_URL}/{hub_name}/{hub_name}_{dataset}_{kind}_head.pth"


def read_head_file(path_or_name: str | Path, backbone: str = "small", registers: bool = False) -> dict[str, Any]:
    """The raw checkpoint of a head: a local file, or a Meta head name fetched once into the
    torch.hub cache ($TORCH_HOME/hub/checkpoints), which then works offline."""
    if Path(path_or_name).is_file():
        return read_torch_file(path_or_name, "segmentation head")
    url = head_url(str(path_or_name), backbone, registers)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except Exception as err:  # URLError, HTTPError, unpickling errors
        file = url.rsplit("/", 1)[1]
        raise HeadWeightsError(
            f"could not load {file} ({url}): {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
            "offline, copy it into $TORCH_HOME/hub/checkpoints/ or pass its path to --head-weights"
        ) from err


def head_state(raw: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """mmseg `decode_head.bn.*` / `decode_head.conv_seg.*` tensors (in a `state_dict` or bare) as
    `LinearHead` keys."""
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else {}
    renames = {"bn.": "norm.", "conv_seg.": "classifier."}
    head = {}
    for key, tensor in state.items():
        key = key.removeprefix("decode_head.")
        for old, new in renames.items():
            if key.startswith(old) and torch.is_tensor(tensor):
                head[new + key[len(old) :]] = tensor
    needed = {
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "classifier.weight",
        "classifier.bias",
    }
    if not needed <= head.keys():
        raise HeadWeightsError(
            f"{where}: not a DINOv2 BNHead checkpoint (no decode_head.bn.* / decode_head.conv_seg.* tensors)"
        )
    return head


def check_head_fits(
    head: dict[str, torch.Tensor], backbone: str, registers: bool, head_layers: int | None, where: str
) -> int:
    """The number of blocks the head reads; a head for another backbone or layer count is an error naming the fix."""
    width = head["norm.weight"].numel()
    embed = get_backbone_spec(backbone, registers).embed_dim
    if width not in (embed * n for n in HEAD_LAYERS):
        fits = [
            f"--backbone {s} --head-layers {n}"
            for s in SIZES
            for n in HEAD_LAYERS
            if get_backbone_spec(s).embed_dim * n == width
        ]
        raise HeadWeightsError(
            f"{where}: the head reads {width}-channel features, but --backbone {backbone} gives "
            f"{embed} per block ({' or '.join(f'{embed * n}' for n in HEAD_LAYERS)}); "
            f"{'pass ' + ' or '.join(fits) if fits else 'no DINOv2 size fits'}"
        )
    layers = width // embed
    if head_layers is not None and head_layers != layers:
        kind = "linear" if layers == 1 else "multi-layer (ms)"
        raise HeadWeightsError(
            f"{where}: a {kind} head reading {layers} block(s), but --head-layers {head_layers}; "
            f"pass --head-layers {layers} or leave it out"
        )
    return layers


def read_checked_head(
    path_or_name: str | Path, backbone: str, registers: bool, head_layers: int | None
) -> tuple[dict[str, torch.Tensor], int]:
    """A released head's `LinearHead` state and the number of blocks it reads, checked against the backbone."""
    head = head_state(read_head_file(path_or_name, backbone, registers), str(path_or_name))
    return head, check_head_fits(head, backbone, registers, head_layers, str(path_or_name))
