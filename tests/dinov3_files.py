"""DINOv3 test material built offline: Meta-layout weight files synthesised from random-init timm
ViTs, and a local torch.hub directory whose hubconf.py takes Meta's arguments (`pretrained`,
`weights` = file or URL) and fetches the weights through torch.hub as Meta's code does."""

import textwrap
from pathlib import Path

import torch

from dinokit.backbones.dinov3 import TimmDinov3

# Mirrors facebookresearch/dinov3's hubconf: the entry points take `weights` (a file or a signed
# URL), turn a path into a file:// URL and load it through torch.hub's checkpoint cache. The model
# itself is timm's (there is no dinov3 package to install), in Meta's file layout on disk.
HUBCONF = textwrap.dedent("""
    dependencies = ["torch"]
    from pathlib import Path

    import torch

    from dinokit.backbones.dinov3 import build_timm, to_timm_state
    from model_config import get_backbone_spec


    def _make(name, pretrained, weights):
        model = build_timm(get_backbone_spec(name), pretrained=False)
        if pretrained:
            url = weights if "://" in str(weights) else Path(weights).expanduser().resolve().as_uri()
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
            model.vit.load_state_dict(to_timm_state(state, model))
        return model


    def dinov3_vits16(*, pretrained=True, weights="LVD1689M", **kwargs):
        return _make("dinov3_vits16", pretrained, weights)


    def dinov3_vitl16(*, pretrained=True, weights="LVD1689M", **kwargs):
        return _make("dinov3_vitl16", pretrained, weights)
""")


def write_hub_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "hubconf.py").write_text(HUBCONF)
    return path


def meta_layout(backbone: TimmDinov3) -> dict[str, torch.Tensor]:
    """A timm DINOv3 ViT's weights as Meta releases them (dinov3_vits16_pretrain_lvd1689m-*.pth):
    storage_tokens, ls1/ls2.gamma, one qkv.bias with the key part zero and its bias_mask, the
    pretraining mask_token and the RoPE periods buffer."""
    state = backbone.vit.state_dict()
    meta = {}
    for key, value in state.items():
        if key.endswith("attn.v_bias"):
            continue
        if key.endswith("attn.q_bias"):
            v_bias = state[key.replace("q_bias", "v_bias")]
            meta[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
            mask = torch.ones_like(value)
            meta[key.replace("q_bias", "qkv.bias_mask")] = torch.cat([mask, torch.zeros_like(mask), mask])
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        meta[key] = value.clone()
    meta["mask_token"] = torch.zeros(1, backbone.embed_dim)
    meta["rope_embed.periods"] = backbone.vit.rope.periods.clone()
    return meta


def random_biases(backbone: TimmDinov3, seed: int = 0) -> TimmDinov3:
    """Non-zero query/value biases (timm initialises them to zero; Meta's S and S+ files have them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in backbone.vit.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return backbone


def meta_convnext_layout(backbone) -> dict[str, torch.Tensor]:
    """A timm DINOv3 ConvNeXt's weights in Meta's (the original ConvNeXt's) names: the inverse of
    timm's `convnext.checkpoint_filter_fn` (downsample_layers, stages.i.j, dwconv, pwconv, norm)."""
    import re

    meta = {}
    for key, value in backbone.convnext.state_dict().items():
        if key.startswith("head.") and not key.startswith("head.norm."):
            continue
        key = key.replace("stem.", "downsample_layers.0.")
        key = re.sub(r"stages\.([0-9]+)\.downsample\.([0-9]+)", r"downsample_layers.\1.\2", key)
        key = re.sub(r"stages\.([0-9]+)\.blocks\.([0-9]+)", r"stages.\1.\2", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm.", "norm.")
        meta[key] = value.clone()
    return meta
