"""EoMT weights in the other layouts: transformers' `EomtForUniversalSegmentation` (DINOv2 with
registers) / `EomtDinov3ForUniversalSegmentation` (their `save_pretrained` folders and the
`model.safetensors` in them), and the original repository's checkpoints (tue-mps/eomt,
`pytorch_model.bin`: `network.*`; its DINOv3 releases are *delta weights*, the fine-tuned backbone
minus Meta's pretrained one, so they need Meta's backbone file as --weights).

The name maps below go both ways: `to_transformers` (our state dict -> transformers', used by the
parity test and by anyone who wants to publish a model there) and `from_transformers`. tue-mps's
DINOv2 checkpoints resample DINOv2 to 16-pixel patches on a 40 x 40 grid, which the toolkit's DINOv2
backbones (14-pixel patches) do not build: they are refused with that reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dinokit.errors import UserError

# (ours under backbone.vit., transformers') per family; {i}: the block index
BLOCK_NAMES = {
    "dinov2": {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.out_proj",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    "dinov3": {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.o_proj",
        "gamma_1": "layer_scale1.lambda1",
        "gamma_2": "layer_scale2.lambda1",
        "mlp.fc1": "mlp.up_proj",
        "mlp.fc2": "mlp.down_proj",
    },
}
EMBEDDING_NAMES = {
    "dinov2": {"patch_embed.proj": "embeddings.patch_embeddings.projection"},
    "dinov3": {"patch_embed.proj": "embeddings.patch_embeddings"},
}
HEAD_NAMES = {
    "head.q.weight": "query.weight",
    "head.class_head": "class_predictor",
    "head.mask_head.0": "mask_head.fc1",
    "head.mask_head.2": "mask_head.fc2",
    "head.mask_head.4": "mask_head.fc3",
    "attn_mask_probs": "attn_mask_probs",
}
UPSCALE = re.compile(r"head\.upscale\.(\d+)\.(conv1|conv2|norm)\.(.+)")
BLOCK = re.compile(r"backbone\.vit\.blocks\.(\d+)\.(.+)")


def _rename(name: str, table: dict[str, str]) -> str | None:
    for ours, theirs in table.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    return None


def to_transformers(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Our EoMT state dict (timm backbone) in transformers' names: q/k/v split out of `qkv`, the
    position embedding without its batch axis."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if (match := BLOCK.fullmatch(name)) is not None:
            index, rest = match.groups()
            prefix = f"layers.{index}."
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3)):
                    out[f"{prefix}attention.{part}.{kind}"] = chunk
            elif rest in ("attn.q_bias", "attn.v_bias"):
                out[f"{prefix}attention.{rest[5]}_proj.bias"] = tensor
            elif rest != "attn.k_bias":
                renamed = _rename(rest, BLOCK_NAMES[family])
                if renamed is None:
                    raise KeyError(f"no transformers name for {name}")
                out[prefix + renamed] = tensor
        elif (match := UPSCALE.fullmatch(name)) is not None:
            index, part, rest = match.groups()
            out[f"upscale_block.block.{index}.{'layernorm2d' if part == 'norm' else part}.{rest}"] = tensor
        elif name.startswith("backbone.vit."):
            rest = name.removeprefix("backbone.vit.")
            table = {
                "cls_token": "embeddings.cls_token",
                "reg_token": "embeddings.register_tokens",
                "norm": "layernorm",
            }
            if rest == "pos_embed":
                out["embeddings.position_embeddings.weight"] = tensor[0]
            elif (renamed := _rename(rest, {**table, **EMBEDDING_NAMES[family]})) is not None:
                out[renamed] = tensor
        elif (renamed := _rename(name, HEAD_NAMES)) is not None:
            out[renamed] = tensor
    return out


def from_transformers(
    state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], family: str
) -> dict[str, torch.Tensor]:
    """transformers' EoMT tensors as our state dict (`ours`: the model's own, for names and shapes);
    every tensor of ours must be found, with its shape."""
    expected = to_transformers(ours, family)
    theirs_to_ours = _inverse_names(ours, family)
    converted: dict[str, torch.Tensor] = {}
    for name, sources in theirs_to_ours.items():
        tensor = ours[name]
        missing = [s for s in sources if s not in state]
        if missing:
            raise UserError(
                f"the file lacks {missing[0]} (and {len(missing) - 1} more)"
                if len(missing) > 1
                else f"the file lacks {missing[0]}"
            )
        parts = [state[s] for s in sources]
        for source, part in zip(sources, parts):
            if tuple(part.shape) != tuple(expected[source].shape):
                raise UserError(
                    f"{source} is {tuple(part.shape)} in the file but {tuple(expected[source].shape)} in this model "
                    "(another backbone size, query count or class count?)"
                )
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        converted[name] = value.reshape(tensor.shape).to(tensor.dtype)
    return converted


def _inverse_names(ours: dict[str, torch.Tensor], family: str) -> dict[str, list[str]]:
    """For each of our tensors, the transformers tensors it is made of (qkv: three)."""
    inverse: dict[str, list[str]] = {}
    for name, tensor in ours.items():
        inverse[name] = list(to_transformers({name: tensor}, family))
    return {k: v for k, v in inverse.items() if v}


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A `model.safetensors` (or a folder holding one) or a torch file of tensors."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{path}: not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a file of named tensors")
    return state


def tue_mps_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original repository's DINOv3 names (`network.encoder.backbone.*` are transformers'
    DINOv3ViTModel's) as EomtDinov3ForUniversalSegmentation's."""
    head = {
        "network.q.weight": "query.weight",
        "network.class_head": "class_predictor",
        "network.mask_head.0": "mask_head.fc1",
        "network.mask_head.2": "mask_head.fc2",
        "network.mask_head.4": "mask_head.fc3",
        "network.attn_mask_probs": "attn_mask_probs",
    }
    out = {}
    for name, tensor in state.items():
        if name.startswith("network.encoder.backbone."):
            rest = name.removeprefix("network.encoder.backbone.")
            if rest.startswith("blocks.") or rest.startswith("patch_embed."):
                raise UserError(
                    "a tue-mps checkpoint of a timm DINOv2 backbone: those resample DINOv2 to 16-pixel patches "
                    "(a 40x40 grid), which the toolkit's DINOv2 backbones do not build; use its DINOv3 releases"
                )
            rest = re.sub(r"^layer\.", "layers.", rest)
            rest = re.sub(r"^norm\.", "layernorm.", rest)
            if rest != "embeddings.mask_token":
                out[rest] = tensor
        elif (match := re.fullmatch(r"network\.upscale\.(\d+)\.(conv1|conv2|norm)\.(.+)", name)) is not None:
            index, part, rest = match.groups()
            out[f"upscale_block.block.{index}.{'layernorm2d' if part == 'norm' else part}.{rest}"] = tensor
        elif (renamed := _rename(name, head)) is not None:
            out[renamed] = tensor
    return out


def released_layout(state: dict[str, torch.Tensor]) -> str:
    """ "transformers" or "tue-mps" (or an error naming what the file holds)."""
    if any(name.startswith("network.") for name in state):
        return "tue-mps"
    if "query.weight" in state and "class_predictor.weight" in state:
        return "transformers"
    raise UserError("not an EoMT checkpoint (neither transformers' EoMT names nor tue-mps' network.*)")


def load_released_eomt(model: torch.nn.Module, path: str | Path, family: str, *, delta: bool | None = None) -> str:
    """Load a released EoMT file into `model` (its backbone already holds Meta's pretrained weights
    where the file is a delta). `delta`: None decides by layout (tue-mps DINOv3 releases are
    deltas; transformers exports are whole). Returns what was loaded, in words."""
    state = read_state(path)
    layout = released_layout(state)
    if layout == "tue-mps":
        state = tue_mps_to_transformers(state)
        if family != "dinov3":
            raise UserError(
                f"{path}: a tue-mps DINOv3 checkpoint needs a DINOv3 backbone (--backbone dinov3_vits16, ...)"
            )
    is_delta = layout == "tue-mps" if delta is None else delta
    own = model.state_dict()
    try:
        converted = from_transformers(state, own, family)
    except UserError as err:
        raise UserError(f"{path}: {err}") from err
    if is_delta:
        converted = {
            name: own[name] + value if name.startswith("backbone.") else value for name, value in converted.items()
        }
    model.load_state_dict(converted, strict=False)
    return f"{layout} EoMT weights{' (delta over the backbone file)' if is_delta else ''}"
