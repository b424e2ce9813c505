"""DINOv2 backbone + linear segmentation head.

The backbone comes from torch.hub (`facebookresearch/dinov2`, as in Meta's README) or from timm
(the same architecture; builds offline with random weights, and loads Meta's official `.pth`).
Either way it exposes one contract, `get_intermediate_layers(x, n=out_indices, reshape=True)`
-> tuple of `[B, C, H/14, W/14]` patch-token maps, so the rest of the code never asks where it
came from.

Run `python model.py` to print a torchinfo summary of the model at 644x644.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from cli import UserError, run_cli
from model_config import SIZES, BackboneSpec, get_backbone_spec

# An explicit ref lets torch.hub use its cache without asking GitHub for the default branch.
HUB_REPO = "facebookresearch/dinov2:main"
SOURCES = ("hub", "timm", "local")  # local: a clone of the dinov2 repository (--hub-dir)
OFFLINE_HINT = (
    "offline, use one of: (1) a complete torch.hub cache copied from a machine with internet "
    "($TORCH_HOME/hub/facebookresearch_dinov2_main and hub/checkpoints/dinov2_*_pretrain.pth); "
    "(2) --hub-dir PATH/TO/dinov2-clone with --weights PATH/TO/dinov2_vits14_pretrain.pth; "
    "(3) --source timm --weights PATH/TO/dinov2_vits14_pretrain.pth "
    "(--source timm --no-pretrained gives a random-init smoke run)"
)


class BackboneUnavailableError(UserError):
    """The backbone's code or weights could not be obtained (typically: no network, no cache)."""


class TimmDinov2(nn.Module):
    """Adapts timm's DINOv2 ViT to the torch.hub model's `get_intermediate_layers` contract."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False, norm: bool = True
    ) -> tuple[torch.Tensor, ...]:
        # timm skips the final LayerNorm unless asked; the hub model applies it by default.
        return tuple(self.vit.get_intermediate_layers(x, n=n, reshape=reshape, norm=norm))


def _load_hub(spec: BackboneSpec, pretrained: bool, hub_dir: str | Path | None = None) -> nn.Module:
    """Meta's own model code: from GitHub through the torch.hub cache, or from a local clone."""
    if hub_dir is not None:
        if not (Path(hub_dir) / "hubconf.py").is_file():
            raise BackboneUnavailableError(
                f"{hub_dir}: not a torch.hub directory (no hubconf.py); "
                "git clone https://github.com/facebookresearch/dinov2 there, or use --source hub/timm"
            )
        repo, where = str(hub_dir), "local"
    else:
        repo, where = HUB_REPO, "github"
    try:
        return torch.hub.load(repo, spec.hub_name, source=where, pretrained=pretrained, trust_repo=True)
    except Exception as err:  # URLError, HTTPError, RuntimeError("no internet ..."), ...
        raise BackboneUnavailableError(
            f"could not load {spec.hub_name} from torch.hub ({repo}): {_first_line(err)}; {OFFLINE_HINT}"
        ) from err


def _load_timm(spec: BackboneSpec, pretrained: bool) -> nn.Module:
    import timm

    try:
        vit = timm.create_model(spec.timm_name, pretrained=pretrained, dynamic_img_size=True, num_classes=0)
    except Exception as err:  # huggingface_hub connection / not-found errors
        raise BackboneUnavailableError(
            f"could not load {spec.timm_name} from timm: {_first_line(err)}; {OFFLINE_HINT}"
        ) from err
    return TimmDinov2(vit)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def read_official_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A Meta-format DINOv2 backbone state dict from `path`: the released `dinov2_*_pretrain.pth`,
    or the teacher backbone of a DINOv2 training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({_first_line(err)})") from err
    if isinstance(state, dict) and "model_info" in state:
        raise ValueError(f"{path}: is a segmentation checkpoint from train.py, not backbone weights; "
                         "use it with --resume or with infer_*.py --model")
    if isinstance(state, dict) and isinstance(state.get("teacher"), dict):
        state = {k[len("backbone."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}
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
        sizes = [s for s in SIZES if (get_backbone_spec(s).embed_dim, get_backbone_spec(s).depth) == (found["embed_dim"], found["depth"])]
        fix = f"; pass --backbone {sizes[0]}" if sizes else ""
        raise ValueError(f"{path}: weights of a ViT with embed dim {found['embed_dim']} and {found['depth']} blocks, "
                         f"but the model is {spec.hub_name} (embed dim {spec.embed_dim}, {spec.depth} blocks){fix}")
    if found["registers"] != registers:
        fix = "add --registers" if found["registers"] else "drop --registers"
        raise ValueError(f"{path}: weights {'with' if found['registers'] else 'without'} register tokens "
                         f"but the model is {spec.hub_name}; {fix}")


def load_official_weights(backbone: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load Meta-format DINOv2 weights into a backbone of either source (timm converts the keys)."""
    target = backbone
    if isinstance(backbone, TimmDinov2):
        from timm.models.vision_transformer import checkpoint_filter_fn

        state, target = checkpoint_filter_fn(state, backbone.vit), backbone.vit
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: does not match the backbone architecture ({_first_line(err)})") from err


def hub_state_to_timm(state: dict[str, torch.Tensor], model: "Dinov2Segmentation") -> dict[str, torch.Tensor]:
    """Convert a segmentation state dict with a hub (Meta-format) backbone to one for a timm backbone."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    prefix = "backbone."
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    converted = checkpoint_filter_fn(backbone, model.backbone.vit)
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return {**rest, **{f"{prefix}vit.{k}": v for k, v in converted.items()}}


def load_backbone(
    size: str = "small",
    registers: bool = False,
    source: str = "hub",
    weights: str | Path | None = None,
    pretrained: bool = True,
    hub_dir: str | Path | None = None,
) -> nn.Module:
    """Build a DINOv2 backbone. Weights: `weights` file if given, else the source's pretrained ones
    if `pretrained`, else random init (the architecture alone, e.g. for offline tests).
    Sources: `hub` (torch.hub, GitHub + cache), `local` (a dinov2 clone at `hub_dir`), `timm`."""
    spec = get_backbone_spec(size, registers)
    if hub_dir is not None:
        source = "local"
    state = None
    if weights is not None:  # read and check the file before building anything
        state = read_official_weights(weights)
        check_weights_match(state, spec, registers, weights)
    download = pretrained and weights is None
    if source in ("hub", "local"):
        if source == "local" and hub_dir is None:
            raise ValueError("--source local needs --hub-dir PATH (a clone of facebookresearch/dinov2)")
        backbone = _load_hub(spec, download, hub_dir if source == "local" else None)
    elif source == "timm":
        backbone = _load_timm(spec, download)
    else:
        raise ValueError(f"unknown backbone source {source!r}; choose one of {', '.join(SOURCES)}")
    if state is not None:
        load_official_weights(backbone, state, weights)
    return backbone


class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv over the concatenated patch features: DINOv2's linear probe ("BNHead")."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = features.shape
        if self.training and batch * height * width == 1 and type(self.norm) is nn.BatchNorm2d:
            # One value per channel (one image with a 1x1 token grid, e.g. a last batch of one at
            # --imgsz 14) has no batch statistics: normalise it with the running ones instead of
            # failing. SyncBatchNorm pools the values of every process and needs no such care.
            norm = self.norm
            normed = F.batch_norm(features, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
            return self.classifier(normed)
        return self.classifier(self.norm(features))


class Dinov2Segmentation(nn.Module):
    """DINOv2 features from four blocks, concatenated, classified per patch, upsampled to the image.

    Any input size works: the image is zero-padded (after normalisation) to a multiple of the
    patch size and the logits are cropped back, so the output is always `[B, num_classes, H, W]`.
    With `fine_tune=False` the backbone is frozen: no gradients, always in eval mode, and its
    forward builds no autograd graph.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "small",
        fine_tune: bool = False,
        registers: bool = False,
        source: str = "hub",
        weights: str | Path | None = None,
        pretrained: bool = True,
        hub_dir: str | Path | None = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        spec = get_backbone_spec(backbone, registers)
        if hub_dir is not None:  # a local clone of the hub repository
            source = "local"
        # What it takes to rebuild this architecture; stored in every checkpoint.
        self.arch = {"num_classes": num_classes, "backbone": backbone, "registers": registers, "source": source}
        self.patch_size = spec.patch_size
        self.out_indices = list(spec.out_indices)
        self.hub_dir = str(hub_dir) if hub_dir is not None else None
        self.backbone = load_backbone(backbone, registers, source, weights, pretrained, hub_dir)
        self.head = LinearHead(spec.head_in_channels, num_classes)
        self.fine_tune = fine_tune
        self.backbone.requires_grad_(fine_tune)
        if hasattr(self.backbone, "mask_token"):  # Meta's iBOT mask token: unused outside pretraining
            self.backbone.mask_token.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "Dinov2Segmentation":
        super().train(mode)
        if not self.fine_tune:
            self.backbone.eval()
        return self

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated `[B, 4C, ceil(H/14), ceil(W/14)]` patch features of normalised images."""
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.patch_size, -width % self.patch_size
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        with torch.set_grad_enabled(self.fine_tune and torch.is_grad_enabled()):
            maps = self.backbone.get_intermediate_layers(images, n=self.out_indices, reshape=True)
        return torch.cat(maps, dim=1)

    def forward_head(
        self, features: torch.Tensor, image_size: Sequence[int], output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Logits from `extract_features` output for images of `image_size` (H, W): the head alone,
        which is all a frozen-backbone epoch needs once features are cached."""
        height, width = image_size
        logits = self.head(features)
        padded = (logits.shape[-2] * self.patch_size, logits.shape[-1] * self.patch_size)
        if padded != (height, width):
            logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
            logits = logits[..., :height, :width]
        target = tuple(output_size) if output_size is not None else (height, width)
        if tuple(logits.shape[-2:]) != target:
            logits = F.interpolate(logits, size=target, mode="bilinear", align_corners=False)
        return logits

    def forward(
        self,
        images: torch.Tensor | None = None,
        output_size: Sequence[int] | None = None,
        *,
        features: torch.Tensor | None = None,
        image_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits `[B, num_classes, H, W]`, or at `output_size` (H, W): inference on a resized image
        upsamples the token-grid logits straight to the original size, interpolating once.
        `features=` (of images of `image_size`) runs the head alone; it is a forward argument rather
        than a separate method so that DistributedDataParallel sees the call."""
        if features is None:
            features, image_size = self.extract_features(images), images.shape[-2:]
        return self.forward_head(features, image_size, output_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass instead of storing
        them: fine-tuning memory drops to about one block's worth, for ~30% more compute."""
        blocks = self.backbone.vit.blocks if isinstance(self.backbone, TimmDinov2) else self.backbone.blocks
        for block in blocks:
            block.__dict__.pop("forward", None)  # back to the class's forward
            if enable:
                block.forward = _checkpointed(block.forward)

    def compile_backbone(self) -> None:
        """torch.compile the backbone's feature extraction (the parameters and state dict are unchanged)."""
        self.backbone.get_intermediate_layers = torch.compile(self.backbone.get_intermediate_layers)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Print a summary of the DINOv2 segmentation model.")
    parser.add_argument("--backbone", default="small", choices=SIZES)
    parser.add_argument("--registers", action="store_true", help="use the 4-register variant")
    parser.add_argument("--source", default="hub", choices=SOURCES)
    parser.add_argument("--hub-dir", default=None, help="local clone of facebookresearch/dinov2 (implies --source local)")
    parser.add_argument("--weights", default=None, help="local DINOv2 backbone state dict (.pth)")
    parser.add_argument("--no-pretrained", action="store_true", help="random-init backbone (offline)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--imgsz", type=int, nargs=2, default=(644, 644), metavar=("W", "H"))
    parser.add_argument("--fine-tune", action="store_true")
    return parser


def main(args: argparse.Namespace) -> None:
    from torchinfo import summary

    model = Dinov2Segmentation(
        args.num_classes, args.backbone, args.fine_tune, args.registers, args.source,
        args.weights, pretrained=not args.no_pretrained, hub_dir=args.hub_dir,
    ).eval()
    width, height = args.imgsz
    summary(model, input_size=(1, 3, height, width), depth=2, col_names=("input_size", "output_size", "num_params", "trainable"))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
