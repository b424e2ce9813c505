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

import config
from checkpoint import model_info
from cli import UserError
from file_kinds import read_torch_file
from labels import DatasetSpec
from model import HEAD_LAYERS, Dinov2Segmentation
from model_config import SIZES, get_backbone_spec

HEAD_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
HEAD_KINDS = {"linear": 1, "ms": 4}  # head name -> blocks it reads
HEAD_DATASETS = ("voc2012", "ade20k")
META_IMGSZ = (518, 518)  # whole-mode size for these heads (their evaluation: slide, 512 windows)

VOC_SPEC = DatasetSpec(list(config.CLASSES), list(config.COLORS), list(config.IGNORE_COLORS),
                       source="Pascal VOC 2012 (Meta's released head)")
ADE20K_SPEC = DatasetSpec(list(config.ADE20K_CLASSES), list(config.ADE20K_COLORS), [(0, 0, 0)],
                          source="ADE20K (Meta's released head)")
SPEC_BY_CLASSES = {21: VOC_SPEC, 150: ADE20K_SPEC}


class HeadWeightsError(UserError):
    """A head file that cannot be used with the chosen backbone; the message names the fix."""


def head_url(name: str, backbone: str = "small", registers: bool = False) -> str:
    """`voc2012_linear` -> Meta's URL of that head for the backbone."""
    dataset, _, kind = name.partition("_")
    if dataset not in HEAD_DATASETS or kind not in HEAD_KINDS:
        names = ", ".join(f"{d}_{k}" for d in HEAD_DATASETS for k in HEAD_KINDS)
        raise HeadWeightsError(f"--head-weights {name}: not a file, and not one of Meta's heads ({names})")
    hub_name = get_backbone_spec(backbone, registers).hub_name
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
        raise HeadWeightsError(f"could not load {file} ({url}): {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                               "offline, copy it into $TORCH_HOME/hub/checkpoints/ or pass its path to --head-weights") from err


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
                head[new + key[len(old):]] = tensor
    needed = {"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "classifier.weight", "classifier.bias"}
    if not needed <= head.keys():
        raise HeadWeightsError(f"{where}: not a DINOv2 BNHead checkpoint (no decode_head.bn.* / decode_head.conv_seg.* tensors)")
    return head


def check_head_fits(head: dict[str, torch.Tensor], backbone: str, registers: bool, head_layers: int | None,
                    where: str) -> int:
    """The number of blocks the head reads; a head for another backbone or layer count is an error naming the fix."""
    width = head["norm.weight"].numel()
    embed = get_backbone_spec(backbone, registers).embed_dim
    if width not in (embed * n for n in HEAD_LAYERS):
        fits = [f"--backbone {s} --head-layers {n}" for s in SIZES for n in HEAD_LAYERS
                if get_backbone_spec(s).embed_dim * n == width]
        raise HeadWeightsError(f"{where}: the head reads {width}-channel features, but --backbone {backbone} gives "
                               f"{embed} per block ({' or '.join(f'{embed * n}' for n in HEAD_LAYERS)}); "
                               f"{'pass ' + ' or '.join(fits) if fits else 'no DINOv2 size fits'}")
    layers = width // embed
    if head_layers is not None and head_layers != layers:
        kind = "linear" if layers == 1 else "multi-layer (ms)"
        raise HeadWeightsError(f"{where}: a {kind} head reading {layers} block(s), but --head-layers {head_layers}; "
                               f"pass --head-layers {layers} or leave it out")
    return layers


def read_checked_head(path_or_name: str | Path, backbone: str, registers: bool,
                      head_layers: int | None) -> tuple[dict[str, torch.Tensor], int]:
    """A released head's `LinearHead` state and the number of blocks it reads, checked against the backbone."""
    head = head_state(read_head_file(path_or_name, backbone, registers), str(path_or_name))
    return head, check_head_fits(head, backbone, registers, head_layers, str(path_or_name))


def model_with_head(path_or_name: str | Path, *, backbone: str = "small", registers: bool = False,
                    head_layers: int | None = None, **backbone_kwargs) -> tuple[Dinov2Segmentation, dict[str, Any]]:
    """A ready model (backbone + Meta's head, centred padding) and its `model_info`: classes and
    palette of VOC 2012 (21 classes) or ADE20K (150), by the head's class count."""
    where = str(path_or_name)
    head, layers = read_checked_head(path_or_name, backbone, registers, head_layers)
    num_classes = head["classifier.weight"].shape[0]
    if num_classes not in SPEC_BY_CLASSES:
        raise HeadWeightsError(f"{where}: a head for {num_classes} classes, neither VOC 2012 (21) nor ADE20K (150)")
    model = Dinov2Segmentation(num_classes, backbone=backbone, registers=registers, head_layers=layers,
                               padding="center", **backbone_kwargs)
    model.head.load_state_dict(head, strict=False)  # num_batches_tracked is optional
    return model.eval(), model_info(model, SPEC_BY_CLASSES[num_classes], META_IMGSZ)
