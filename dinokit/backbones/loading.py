"""Every way of obtaining a DINOv2 or DINOv3 backbone, behind one contract.

Sources: torch.hub (`facebookresearch/dinov2` or `/dinov3`, Meta's own code, from GitHub through
the hub cache), a local clone of that repository (`--hub-dir`), or timm (the same architectures;
builds offline with random weights and loads Meta's official `.pth` through timm's key converters).
Whatever the source, the backbone answers `get_intermediate_layers(x, n=out_indices,
reshape=True)` with a tuple of `[B, C, H/p, W/p]` patch-token maps (p: the backbone's
`patch_size`), so the rest of the code never asks where it came from. The table of backbones
(names, widths, patch sizes, tapped layers) is model_config.py; DINOv3's timm side is dinov3.py.
"""

from __future__ import annotations

import hashlib
import math
import types
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.backbones import dinov3
from dinokit.backbones.dinov3 import exporting
from dinokit.backbones.hf_weights import is_hf_weights, read_hf_backbone
from dinokit.backbones.settings import SETTING_HINT
from dinokit.backbones.weights_file import is_url
from dinokit.data.file_kinds import read_torch_file
from dinokit.errors import UserError
from dinokit.writing import atomic_write
from model_config import BACKBONES, HUB_REPOS, SOURCES, BackboneSpec, get_backbone_spec

# An explicit ref lets torch.hub use its cache without asking GitHub for the default branch.
HUB_REPO = "facebookresearch/dinov2:main"
OFFLINE_HINT = (
    "offline, use one of: (1) a complete torch.hub cache copied from a machine with internet "
    "($TORCH_HOME/hub/facebookresearch_dinov2_main and hub/checkpoints/dinov2_*_pretrain.pth); "
    "(2) --hub-dir PATH/TO/dinov2-clone with --weights PATH/TO/dinov2_vits14_pretrain.pth; "
    "(3) --source timm --weights PATH/TO/dinov2_vits14_pretrain.pth "
    "(--source timm --no-pretrained gives a random-init smoke run); " + SETTING_HINT
)


class BackboneUnavailableError(UserError):
    """The backbone's code or weights could not be obtained (typically: no network, no cache)."""


class TimmDinov2(nn.Module):
    """Adapts timm's DINOv2 ViT to the torch.hub model's `get_intermediate_layers` contract, and to
    its features: the position embeddings are interpolated as Meta's code does (see
    `official_pos_embed`), so both sources give the same features at every input size."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]
        vit._pos_embed = types.MethodType(official_pos_embed, vit)  # an instance attribute: the state dict is unchanged

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[torch.Tensor, ...] | tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        # timm skips the final LayerNorm unless asked; the hub model applies it by default. With
        # return_class_token each entry is (patch tokens, class token [B, C]), as the hub model's.
        outputs = self.vit.get_intermediate_layers(
            x, n=n, reshape=reshape, norm=norm, return_prefix_tokens=return_class_token
        )
        if return_class_token:
            return tuple((patches, prefix[:, 0]) for patches, prefix in outputs)
        return tuple(outputs)


# DinoVisionTransformer.interpolate_pos_encoding of facebookresearch/dinov2 (hub models:
# interpolate_offset=0.1, interpolate_antialias=False): bicubic, scale factor (grid + 0.1) / 37 per
# axis, in float32, and no interpolation at all at the 37 x 37 grid of 518 x 518 inputs. timm
# resamples to a target size instead, which gave 0.43 % different features at 644^2 and 2.65 % at
# 224^2 (measured); Meta's heads, and ours, are trained on the hub's features.
POS_EMBED_OFFSET = 0.1


def official_pos_embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Replacement for timm's `VisionTransformer._pos_embed` (x: `[B, H, W, C]` patch embeddings with
    dynamic_img_size): Meta's interpolation, then timm's own prefix-token handling."""
    batch, height, width, dim = x.shape
    prefix_count = 0 if vit.no_embed_class else vit.num_prefix_tokens
    pos = vit.pos_embed.float()
    prefix, patch = pos[:, :prefix_count], pos[:, prefix_count:]
    side = int(math.sqrt(patch.shape[1]))
    if exporting():  # symbolic height/width: the same resampling as tensor operations, no branch on the size
        grid = patch.reshape(side, side, dim).permute(2, 0, 1)
        grid = bicubic_matrix(height, side) @ grid @ bicubic_matrix(width, side).T
        patch = grid.permute(1, 2, 0).reshape(1, height * width, dim)
    elif (height, width) != (side, side):
        patch = F.interpolate(
            patch.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=False,
            scale_factor=((height + POS_EMBED_OFFSET) / side, (width + POS_EMBED_OFFSET) / side),
        )
        patch = patch.permute(0, 2, 3, 1).reshape(1, height * width, dim)
    pos_embed = torch.cat([prefix, patch], dim=1).to(x.dtype)
    x = x.view(batch, -1, dim)
    tokens = [t.expand(batch, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if vit.no_embed_class:  # register models: prefix tokens carry no position embedding here
        x = torch.cat(tokens + [x + pos_embed], dim=1)
    else:
        x = torch.cat(tokens + [x], dim=1) + pos_embed
    return vit.pos_drop(x)


def backbone_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The transformer blocks (a ConvNeXt: its stages) of a backbone from any source, in order."""
    inner = getattr(backbone, "vit", None) or getattr(backbone, "convnext", None) or backbone
    return inner.blocks if hasattr(inner, "blocks") else inner.stages


def bicubic_matrix(out_size: int | torch.SymInt, in_size: int) -> torch.Tensor:
    """`[out_size, in_size]` matrix M such that M @ v resamples v as `official_pos_embed`'s
    F.interpolate does along one axis: PyTorch's bicubic (A = -0.75, align_corners=False, edge taps
    clamped) with scale factor (out + 0.1) / in, and the identity at out == in. Written as tensor
    operations on the size so that an exported graph computes it for every input size: torch.export
    bakes a scale factor derived from a symbolic size into a constant (the exported model then failed
    at every other size). Matches F.interpolate to ~1e-6 (float rounding of the source coordinate)."""
    target = torch.arange(out_size, dtype=torch.float64)
    size = target.new_zeros(()) + out_size  # the size as a tensor, so the identity case is a select, not a branch
    scale = torch.where(size == in_size, 1.0, (size + POS_EMBED_OFFSET) / in_size)
    source = (1.0 / scale).float() * (target.float() + 0.5) - 0.5  # PyTorch: float(1 / scale) * (dst + 0.5) - 0.5
    first = source.floor()
    t = (source - first).unsqueeze(1)
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    weights = torch.cat([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=1)
    taps = (first.long().unsqueeze(1) + torch.arange(-1, 3)).clamp(0, in_size - 1)  # [out, 4]
    # Sum of one-hot rows rather than scatter_add, which onnxruntime's CPU provider lacks in float16.
    return ((taps.unsqueeze(2) == torch.arange(in_size)) * weights.unsqueeze(2)).sum(1)


def _load_hub(
    spec: BackboneSpec, pretrained: bool, hub_dir: str | Path | None = None, **hub_kwargs: object
) -> nn.Module:
    """Meta's own model code: from GitHub through the torch.hub cache, or from a local clone."""
    if hub_dir is not None:
        if not (Path(hub_dir) / "hubconf.py").is_file():
            raise BackboneUnavailableError(
                f"{hub_dir}: not a torch.hub directory (no hubconf.py); "
                f"git clone https://github.com/{HUB_REPOS[spec.family]} there, or use --source hub/timm"
            )
        repo, where = str(hub_dir), "local"
    else:
        repo, where = f"{HUB_REPOS[spec.family]}:main", "github"
    try:
        return torch.hub.load(repo, spec.hub_name, source=where, pretrained=pretrained, trust_repo=True, **hub_kwargs)
    except Exception as err:  # URLError, HTTPError, RuntimeError("no internet ..."), ...
        raise unavailable(f"could not load {spec.hub_name} from torch.hub ({repo})", err, spec) from err


def _load_timm(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    try:
        if spec.family == "dinov3":
            return dinov3.build_timm(spec, pretrained)
        import timm

        vit = timm.create_model(spec.timm_pretrained, pretrained=pretrained, dynamic_img_size=True, num_classes=0)
    except Exception as err:  # huggingface_hub connection / not-found / gated-repository errors
        raise unavailable(f"could not load {spec.timm_pretrained} from timm", err, spec) from err
    return TimmDinov2(vit)


def hf_snapshot(spec: BackboneSpec) -> Path:
    """The backbone's snapshot folder from the Hugging Face Hub (or its cache), through huggingface_hub;
    the token comes from HF_TOKEN or the login cache, as huggingface_hub reads them."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as err:
        raise BackboneUnavailableError("--source hf needs huggingface_hub: pip install huggingface_hub") from err
    repo = spec.hf_repo
    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", "*.safetensors", "*.json"]))
    except GatedRepoError as err:
        raise BackboneUnavailableError(
            f"{repo} is gated: accept the licence on https://huggingface.co/{repo} and log in (hf auth login, or "
            "set HF_TOKEN)"
        ) from err
    except RepositoryNotFoundError as err:
        raise BackboneUnavailableError(f"{repo}: no such repository on the Hugging Face Hub (or no access)") from err
    except (LocalEntryNotFoundError, OSError) as err:
        raise BackboneUnavailableError(
            f"could not download {repo} (offline?): copy the snapshot folder here and pass it as --weights FOLDER "
            f"(any --source), or {offline_hint(spec)}"
        ) from err


def offline_hint(spec: BackboneSpec) -> str:
    """The ways to a backbone without network access, for an error message."""
    if spec.family == "dinov2":
        return OFFLINE_HINT
    return (
        f"{spec.hub_name} weights are gated: request access at {dinov3.REQUEST_ACCESS}, then use one of: "
        f"(1) --weights SIGNED_URL_OR_FILE (torch.hub); (2) --hub-dir PATH/TO/dinov3-clone --weights FILE; "
        f"(3) --source timm --weights FILE (--source timm --no-pretrained gives a random-init smoke run); "
        + SETTING_HINT
    )


def unavailable(what: str, err: BaseException, spec: BackboneSpec) -> BackboneUnavailableError:
    """One line: what failed, why, and the fix (an expired signed URL gets its own)."""
    reason = _first_line(err)
    if "403" in reason and spec.family == "dinov3":
        return BackboneUnavailableError(
            f"{what}: {reason}; Meta's signed DINOv3 download URLs expire after some days: request a new link "
            f"at {dinov3.REQUEST_ACCESS} (or download the .pth once and pass its path to --weights)"
        )
    return BackboneUnavailableError(f"{what}: {reason}; {offline_hint(spec)}")


def downloaded_weights(weights: str | Path, spec: BackboneSpec) -> Path:
    """A weights argument as a local file: a URL is downloaded once into torch.hub's checkpoint
    folder under its file name (signed URLs carry their signature in the query, not the name)."""
    if not is_url(weights):
        return Path(weights)
    from urllib.parse import urlparse

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(str(weights)).path).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(str(weights), str(path), progress=True)
        except Exception as err:
            raise unavailable(f"could not download {path.name}", err, spec) from err
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_official_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A Meta-format DINOv2 backbone state dict from `path`: the released `dinov2_*_pretrain.pth`,
    or the teacher backbone of a DINOv2 training checkpoint."""
    path = Path(path)
    if is_hf_weights(path):
        return read_hf_backbone(path, "dinov2")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    state = read_torch_file(path, "backbone weights")
    if isinstance(state, dict) and isinstance(state.get("teacher"), dict):
        state = {k[len("backbone.") :]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    if not isinstance(state, dict) or "cls_token" not in state or "pos_embed" not in state:
        raise ValueError(f"{path}: not a DINOv2 backbone state dict (no cls_token / pos_embed)")
    return state


def describe_official_weights(state: dict[str, torch.Tensor]) -> dict[str, int | bool]:
    """Embed dim, depth and registers of a Meta-format state dict."""
    blocks = set()
    for key in state:
        parts = key.split(".")
        if parts[0] == "blocks" and len(parts) > 2:
            # blocks.N.* normally; blocks.C.N.* when the model was built with block chunks
            blocks.add(int(parts[2]) if parts[2].isdigit() else int(parts[1]))
    return {"embed_dim": state["cls_token"].shape[-1], "depth": len(blocks), "registers": "register_tokens" in state}


def check_weights_match(state: dict[str, torch.Tensor], spec: BackboneSpec, registers: bool, path: str | Path) -> None:
    """A clear error naming the field when weights of one backbone are given for another."""
    found = describe_official_weights(state)
    if (found["embed_dim"], found["depth"]) != (spec.embed_dim, spec.depth):
        sizes = [
            s.hub_name
            for s in BACKBONES.values()
            if (s.family, s.embed_dim, s.depth) == ("dinov2", found["embed_dim"], found["depth"])
        ]
        fix = f"; pass --backbone {sizes[0]}" if sizes else ""
        raise ValueError(
            f"{path}: weights of a ViT with embed dim {found['embed_dim']} and {found['depth']} blocks, "
            f"but the model is {spec.hub_name} (embed dim {spec.embed_dim}, {spec.depth} blocks){fix}"
        )
    if found["registers"] != registers:
        fix = "add --registers" if found["registers"] else "drop --registers"
        raise ValueError(
            f"{path}: weights {'with' if found['registers'] else 'without'} register tokens "
            f"but the model is {spec.hub_name}; {fix}"
        )


def load_official_weights(backbone: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load Meta-format DINOv2 weights into a backbone of either source (timm converts the keys)."""
    target = backbone
    if isinstance(backbone, TimmDinov2):
        from timm.models.vision_transformer import checkpoint_filter_fn

        state, target = checkpoint_filter_fn(state, backbone.vit), backbone.vit
    _load_state(target, state, path)


def _load_state(target: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Strict loading with a one-line error naming the file."""
    if isinstance(target, (dinov3.TimmDinov3, dinov3.TimmConvNext)):
        target = target.vit if isinstance(target, dinov3.TimmDinov3) else target.convnext
    own = target.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})"] if unexpected else []
        raise ValueError(
            f"{path}: does not match the backbone architecture: tensors {'; '.join(parts)}; nothing loaded"
        )
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: does not match the backbone architecture ({_first_line(err)})") from err


def hub_state_to_timm(state: dict[str, torch.Tensor], timm_backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a segmentation state dict with a hub (Meta-format) backbone to one for a timm backbone."""
    prefix = "backbone."
    backbone = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if isinstance(timm_backbone, TimmDinov2):
        from timm.models.vision_transformer import checkpoint_filter_fn

        converted, inner = checkpoint_filter_fn(backbone, timm_backbone.vit), "vit."
    else:
        converted = dinov3.to_timm_state(backbone, timm_backbone)
        inner = "convnext." if isinstance(timm_backbone, dinov3.TimmConvNext) else "vit."
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return {**rest, **{f"{prefix}{inner}{k}": v for k, v in converted.items()}}


def weights_digest(module: nn.Module, samples: int = 4096) -> str:
    """A cheap identity of a module's weights: every tensor's shape and up to `samples` evenly
    spaced values (hashing all of ViT-g's 4 GB would take seconds for nothing)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().flatten()
        step = max(1, flat.numel() // samples)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def load_backbone(
    name: str = "small",
    *,
    registers: bool = False,
    source: str = "hub",
    weights: str | Path | None = None,
    pretrained: bool = True,
    hub_dir: str | Path | None = None,
) -> nn.Module:
    """Build a DINOv2 or DINOv3 backbone (`name`: Meta's hub name, or a DINOv2 size + `registers`).
    Weights: `weights` (a file; for DINOv3 also a signed URL) if given, else the source's pretrained
    ones if `pretrained`, else random init (the architecture alone, e.g. for offline tests).
    Sources: `hub` (torch.hub, GitHub + cache), `local` (a clone at `hub_dir`), `timm`."""
    spec = get_backbone_spec(name, registers)
    if hub_dir is not None:
        source = "local"
    if source == "hf":  # the architecture from timm, the weights from a transformers snapshot
        source = "timm"
        if weights is None and pretrained:
            weights = hf_snapshot(spec)
    if source not in SOURCES:
        raise ValueError(f"unknown backbone source {source!r}; choose one of {', '.join(SOURCES)}")
    if source == "local" and hub_dir is None:
        raise ValueError(f"--source local needs --hub-dir PATH (a clone of {HUB_REPOS[spec.family]})")
    if spec.family == "dinov3":
        return _load_dinov3(spec, source, weights, pretrained, hub_dir)
    state = None
    if weights is not None:  # read and check the file before building anything
        state = read_official_weights(weights)
        check_weights_match(state, spec, spec.hub_name.endswith("_reg"), weights)
    download = pretrained and weights is None
    if source == "timm":
        backbone = _load_timm(spec, download)
    else:
        backbone = _load_hub(spec, download, hub_dir)
    if state is not None:
        load_official_weights(backbone, state, weights)
    return backbone


def meta_layout_file(state: dict[str, torch.Tensor], spec: BackboneSpec, source: str | Path) -> Path:
    """A transformers snapshot converted to Meta's file layout, for Meta's own loading code: written
    once per snapshot under the torch.hub folder, named as Meta names its files."""
    digest = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:8]
    tag = (
        dinov3.VITL_TAGS["sat" if "sat493m" in str(source).lower() else "lvd"]
        if spec.hub_name == "dinov3_vitl16"
        else ""
    )
    target = Path(torch.hub.get_dir()) / "dinokit_converted" / f"{spec.hub_name}_pretrain_{tag or 'hf-' + digest}.pth"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: torch.save(state, tmp))
    return target


def _load_dinov3(
    spec: BackboneSpec, source: str, weights: str | Path | None, pretrained: bool, hub_dir: str | Path | None
) -> nn.Module:
    """DINOv3: Meta's hub code takes the gated file or signed URL itself (`weights=`); timm builds the
    architecture and our converter loads Meta's file into it."""
    if source == "timm":
        if weights is None:
            return _load_timm(spec, pretrained)
        path = downloaded_weights(weights, spec)
        if not path.exists():
            raise FileNotFoundError(f"{path}: backbone weights file not found")
        state = dinov3.read_dinov3_weights(path, spec)
        backbone = _load_timm(spec, pretrained=False)
        _load_state(backbone, dinov3.to_timm_state(state, backbone), path)
        return backbone
    if weights is None:
        if pretrained:
            raise UserError(f"{spec.hub_name} from torch.hub needs --weights SIGNED_URL_OR_FILE: {offline_hint(spec)}")
        return _load_hub(spec, False, hub_dir)
    if not is_url(weights) and is_hf_weights(weights):  # Meta's hub code reads Meta's layout only
        weights = meta_layout_file(dinov3.read_dinov3_weights(weights, spec), spec, weights)
    dinov3.check_hub_weights_name(spec, str(weights))
    if not is_url(weights):
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: backbone weights file not found")
        dinov3.read_dinov3_weights(weights, spec)  # a clear error before Meta's strict load
        weights = str(Path(weights).resolve())
    return _load_hub(spec, True, hub_dir, weights=str(weights))
