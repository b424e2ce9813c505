"""Backbone weights in Hugging Face's layout: a transformers snapshot folder (`config.json` +
`model.safetensors`, sharded `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`, or
`pytorch_model.bin`) of `Dinov2Model`, `Dinov2WithRegistersModel`, `DINOv3ViTModel` or
`DINOv3ConvNextModel`, or one of those files alone. Read into Meta's layout (the inverse of
transformers' conversion scripts), after which the toolkit's Meta path loads them into any
`--source` and checks them against `--backbone`.

Every tensor of the file must be used and every tensor the backbone needs found, shapes checked,
or the load is refused in one line naming how many were missing or unexpected and the first few
names: never a partial load. DINOv3's key bias (absent in transformers: Meta's is masked to zero)
comes back as zeros with Meta's bias mask; the RoPE periods, a buffer transformers recomputes from
`rope_theta`, are recomputed the way Meta's code does.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from dinokit.errors import UserError

SNAPSHOT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SHOWN = 3  # names listed in a refusal


class HfWeightsError(UserError, ValueError):
    """A snapshot that cannot be read or does not fit (one line, naming the file)."""


def is_hf_weights(path: str | Path) -> bool:
    """A snapshot folder, or a file named as a snapshot's (model.safetensors, its index,
    pytorch_model.bin) or any .safetensors file."""
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in SNAPSHOT_FILES)
    if path.name in SNAPSHOT_FILES or path.suffix == ".safetensors":
        return True
    return False


def read_hf_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path]:
    """(tensors, config.json or None, the file read) of a snapshot folder or file."""
    path = Path(path)
    if not path.exists():
        raise HfWeightsError(f"{path}: backbone weights not found")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [folder / name for name in SNAPSHOT_FILES if (folder / name).is_file()]
        if not found:
            raise HfWeightsError(f"{path}: a folder without {', '.join(SNAPSHOT_FILES)}")
        path = found[0]
    config = None
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise HfWeightsError(f"{folder / 'config.json'}: not readable JSON ({err})") from err
    return read_tensors(path), config, path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file, a sharded set through its index, or a torch file of tensors."""
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as err:
            raise HfWeightsError(f"{path}: not a safetensors index (no weight_map)") from err
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_tensors(path.parent / shard))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise HfWeightsError(
                f"{path}: {len(missing)} tensors of the index are in no shard ({', '.join(missing[:SHOWN])})"
            )
        return state
    if not path.is_file():
        raise HfWeightsError(f"{path}: not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise HfWeightsError(
                f"{path}: not a readable safetensors file, truncated? ({str(err).splitlines()[0][:120]})"
            ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of a cut or foreign file
        raise HfWeightsError(f"{path}: not a readable torch file ({str(err).splitlines()[0][:120]})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HfWeightsError(f"{path}: not a file of named tensors")
    return state


def layout_of(state: dict[str, torch.Tensor]) -> str:
    """ "dinov2", "dinov3" or "convnext" (transformers' names), or "meta" (Meta's own, e.g. a
    Meta-layout .safetensors)."""
    if "cls_token" in state or "downsample_layers.0.0.weight" in state:
        return "meta"
    if any(k.startswith("encoder.layer.") for k in state):
        return "dinov2"
    if any(k.startswith("layer.") for k in state) and "embeddings.cls_token" in state:
        return "dinov3"
    if any(k.startswith("stages.") and ".downsample_layers." in k for k in state):
        return "convnext"
    raise HfWeightsError("neither transformers' DINOv2 / DINOv3 names nor Meta's")


def to_meta(state: dict[str, torch.Tensor], config: dict[str, Any] | None, where: Path) -> dict[str, torch.Tensor]:
    """The tensors in Meta's layout; every one used, or a one-line refusal."""
    kind = layout_of(state)
    if kind == "meta":
        return state
    convert = {"dinov2": dinov2_to_meta, "dinov3": dinov3_to_meta, "convnext": convnext_to_meta}[kind]
    used: set[str] = set()
    missing: list[str] = []
    with warnings.catch_warnings():  # an absent tensor is an empty one until the refusal below
        warnings.simplefilter("ignore")
        meta = convert(Tensors(state, used, missing), config or {}, used)
    if missing:
        raise HfWeightsError(
            f"{where}: {len(missing)} tensors a {kind} backbone needs are not in the file "
            f"({', '.join(missing[:SHOWN])}); nothing was loaded"
        )
    unused = sorted(set(state) - used)
    if unused:
        raise HfWeightsError(
            f"{where}: {len(unused)} tensors of the file have no place in a {kind} backbone "
            f"({', '.join(unused[:SHOWN])}); nothing was loaded"
        )
    return meta


class Tensors(dict):
    """The file's tensors, recording which a conversion took and which it looked for in vain."""

    def __init__(self, state: dict[str, torch.Tensor], used: set[str], missing: list[str]):
        super().__init__(state)
        self.used, self.missing = used, missing


def _take(state: dict[str, torch.Tensor], used: set[str], name: str) -> torch.Tensor:
    if name not in state:
        state.missing.append(name)
        return torch.empty(0)
    used.add(name)
    return state[name]


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def dinov2_to_meta(state: dict[str, torch.Tensor], config: dict[str, Any], used: set[str]) -> dict[str, torch.Tensor]:
    """transformers' Dinov2Model / Dinov2WithRegistersModel -> Meta's DinoVisionTransformer."""
    take = lambda name: _take(state, used, name)  # noqa: E731
    meta = {
        "cls_token": take("embeddings.cls_token"),
        "pos_embed": take("embeddings.position_embeddings"),
        "mask_token": take("embeddings.mask_token"),
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    if "embeddings.register_tokens" in state:
        meta["register_tokens"] = take("embeddings.register_tokens")
    for i in _blocks(state, "encoder.layer."):
        hf, out = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [take(f"{hf}attention.attention.{p}.{kind}") for p in ("query", "key", "value")]
            meta[f"{out}attn.qkv.{kind}"] = torch.cat(parts)
            meta[f"{out}attn.proj.{kind}"] = take(f"{hf}attention.output.dense.{kind}")
            for norm in ("norm1", "norm2"):
                meta[f"{out}{norm}.{kind}"] = take(f"{hf}{norm}.{kind}")
            if f"{hf}mlp.weights_in.{kind}" in state:  # ViT-g's SwiGLU: w12 = gate and up, w3 = down
                meta[f"{out}mlp.w12.{kind}"] = take(f"{hf}mlp.weights_in.{kind}")
                meta[f"{out}mlp.w3.{kind}"] = take(f"{hf}mlp.weights_out.{kind}")
            else:
                meta[f"{out}mlp.fc1.{kind}"] = take(f"{hf}mlp.fc1.{kind}")
                meta[f"{out}mlp.fc2.{kind}"] = take(f"{hf}mlp.fc2.{kind}")
        meta[f"{out}ls1.gamma"] = take(f"{hf}layer_scale1.lambda1")
        meta[f"{out}ls2.gamma"] = take(f"{hf}layer_scale2.lambda1")
    return meta


def dinov3_to_meta(state: dict[str, torch.Tensor], config: dict[str, Any], used: set[str]) -> dict[str, torch.Tensor]:
    """transformers' DINOv3ViTModel -> Meta's DINOv3 ViT: q/k/v into one qkv (the key bias zero,
    with Meta's bias mask), SwiGLU gate/up/down as w1/w2/w3, the RoPE periods recomputed."""
    take = lambda name: _take(state, used, name)  # noqa: E731
    dim = state["embeddings.cls_token"].shape[-1]
    heads = int(config.get("num_attention_heads", dim // 64))
    theta = float((config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 100.0)))
    mask = take("embeddings.mask_token")
    meta = {
        "cls_token": take("embeddings.cls_token"),
        "storage_tokens": take("embeddings.register_tokens"),
        "mask_token": mask.reshape(1, dim),
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.bias"),
        "norm.weight": take("norm.weight"),
        "norm.bias": take("norm.bias"),
        "rope_embed.periods": rope_periods(dim // heads, theta),
    }
    for i in _blocks(state, "layer."):
        hf, out = f"layer.{i}.", f"blocks.{i}."
        q, k, v = (take(f"{hf}attention.{p}_proj.weight") for p in ("q", "k", "v"))
        meta[f"{out}attn.qkv.weight"] = torch.cat([q, k, v])
        if f"{hf}attention.q_proj.bias" in state:
            q_bias, v_bias = take(f"{hf}attention.q_proj.bias"), take(f"{hf}attention.v_proj.bias")
            meta[f"{out}attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
            ones = torch.ones_like(q_bias)
            meta[f"{out}attn.qkv.bias_mask"] = torch.cat([ones, torch.zeros_like(ones), ones])
        for kind in ("weight", "bias"):
            meta[f"{out}attn.proj.{kind}"] = take(f"{hf}attention.o_proj.{kind}")
            for norm in ("norm1", "norm2"):
                meta[f"{out}{norm}.{kind}"] = take(f"{hf}{norm}.{kind}")
            if f"{hf}mlp.gate_proj.{kind}" in state:
                for theirs, ours in (("gate_proj", "w1"), ("up_proj", "w2"), ("down_proj", "w3")):
                    meta[f"{out}mlp.{ours}.{kind}"] = take(f"{hf}mlp.{theirs}.{kind}")
            else:
                meta[f"{out}mlp.fc1.{kind}"] = take(f"{hf}mlp.up_proj.{kind}")
                meta[f"{out}mlp.fc2.{kind}"] = take(f"{hf}mlp.down_proj.{kind}")
        meta[f"{out}ls1.gamma"] = take(f"{hf}layer_scale1.lambda1")
        meta[f"{out}ls2.gamma"] = take(f"{hf}layer_scale2.lambda1")
    return meta


def rope_periods(head_dim: int, base: float) -> torch.Tensor:
    """Meta's RopePositionEmbedding periods: base ** (2 i / (head_dim / 2)), i < head_dim / 4."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def convnext_to_meta(state: dict[str, torch.Tensor], config: dict[str, Any], used: set[str]) -> dict[str, torch.Tensor]:
    """transformers' DINOv3ConvNextModel -> Meta's ConvNeXt (downsample_layers, stages, norm)."""
    names = {
        "depthwise_conv": "dwconv",
        "layer_norm": "norm",
        "pointwise_conv1": "pwconv1",
        "pointwise_conv2": "pwconv2",
    }
    meta = {}
    for name in list(state):
        if (m := re.fullmatch(r"stages\.(\d+)\.downsample_layers\.(\d+)\.(.+)", name)) is not None:
            meta[f"downsample_layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = _take(state, used, name)
        elif (m := re.fullmatch(r"stages\.(\d+)\.layers\.(\d+)\.(\w+)(\..+)?", name)) is not None:
            stage, block, part, rest = m.groups()
            meta[f"stages.{stage}.{block}.{names.get(part, part)}{rest or ''}"] = _take(state, used, name)
        elif name.startswith("layer_norm."):
            meta["norm." + name.removeprefix("layer_norm.")] = _take(state, used, name)
    return meta


def config_architecture(config: dict[str, Any] | None) -> dict[str, Any]:
    """What config.json says of the architecture (model type, width, depth, patch, registers)."""
    if not config:
        return {}
    out = {"model_type": config.get("model_type")}
    for key in ("hidden_size", "num_hidden_layers", "patch_size", "num_register_tokens", "hidden_sizes", "depths"):
        if key in config:
            out[key] = config[key]
    return out


FAMILY_OF_LAYOUT = {"dinov2": "dinov2", "dinov3": "dinov3", "convnext": "dinov3"}


def read_hf_backbone(path: str | Path, family: str) -> dict[str, torch.Tensor]:
    """A snapshot (or one of its files) as Meta's state dict of a `family` backbone ("dinov2" /
    "dinov3"), refused in one line when it holds the other family."""
    tensors, config, file = read_hf_weights(path)
    kind = layout_of(tensors)
    if kind != "meta" and FAMILY_OF_LAYOUT[kind] != family:
        said = config_architecture(config)
        raise HfWeightsError(
            f"{path}: a transformers {kind} snapshot ({said.get('model_type', 'no config.json')}) but the backbone "
            f"is a {family} one: choose --backbone of its family"
        )
    return to_meta(tensors, config, file)
