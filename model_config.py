"""The backbones this toolkit knows, DINOv2 and DINOv3: names in each source, widths, patch size,
tapped layers, normalisation, licence, and Meta's published linear ADE20K figure.

Names are Meta's torch.hub entry points (`dinov2_vits14`, `dinov2_vitb14_reg`, `dinov3_vits16`,
`dinov3_convnext_tiny`, ...); the DINOv2 size names of earlier versions (`small` ... `giant`, with
`registers`) still resolve to the same backbones, so old commands and checkpoints keep working.
`out_indices` are the blocks whose patch tokens the linear head reads: the last four (the DINOv2
paper's multi-layer probe); `--head-layers 1` reads the last one (both papers' "lin" protocol).
A ConvNeXt has four stages of different widths and resolutions: only its last one feeds the head.
"""

from __future__ import annotations

from dataclasses import dataclass

PATCH_SIZE = 14  # DINOv2's; every size rule asks the backbone in use (BackboneSpec.patch_size)
# Where a backbone comes from (dinokit/backbones/loading.py): torch.hub, timm, or a local clone of the
# hub repository (dinov2 or dinov3).
SOURCES = ("hub", "timm", "local", "hf")
HEAD_LAYERS = (1, 4)  # 1: the last block (the papers' "lin" head); 4: the last four (DINOv2's "+ms" head input)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv3's satellite weights (SAT-493M, ViT-L and 7B) were trained with their own normalisation.
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)

LICENCES = {"dinov2": "Apache-2.0", "dinov3": "DINOv3 License"}
HUB_REPOS = {"dinov2": "facebookresearch/dinov2", "dinov3": "facebookresearch/dinov3"}


@dataclass(frozen=True)
class BackboneSpec:
    hub_name: str  # torch.hub entry point in facebookresearch/dinov2 or /dinov3
    timm_name: str  # timm architecture, without a pretrained tag
    timm_tag: str  # timm's pretrained tag (weights served from Hugging Face)
    embed_dim: int  # width of the tapped features
    depth: int  # transformer blocks (a ConvNeXt: its 4 stages)
    num_heads: int  # 0 for a ConvNeXt
    out_indices: tuple[int, ...]
    patch_size: int  # token size in pixels; a ConvNeXt's last stage has a stride of 32
    prefix_tokens: int  # class token + registers / storage tokens before the patch tokens
    params_m: float  # parameters, millions (Meta's model cards)
    ade20k_linear: float | None = None  # Meta's linear ADE20K mIoU for this backbone, if published
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def family(self) -> str:
        return self.hub_name.split("_")[0]

    @property
    def is_convnext(self) -> bool:
        return "convnext" in self.hub_name

    @property
    def licence(self) -> str:
        return LICENCES[self.family]

    @property
    def hf_repo(self) -> str:
        """The backbone's transformers snapshot on the Hugging Face Hub (DINOv3: the LVD-1689M weights)."""
        if self.family == "dinov2":
            size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[self.hub_name.split("_vit")[1][0]]
            return f"facebook/dinov2-{'with-registers-' if self.hub_name.endswith('_reg') else ''}{size}"
        return f"facebook/{self.hub_name.replace('_', '-')}-pretrain-lvd1689m"

    @property
    def timm_pretrained(self) -> str:
        return f"{self.timm_name}.{self.timm_tag}"

    @property
    def head_in_channels(self) -> int:
        return self.embed_dim * len(self.out_indices)

    def head_layers(self) -> tuple[int, ...]:
        """The `--head-layers` values this backbone can serve."""
        return (1,) if self.is_convnext else HEAD_LAYERS

    def normalization(self, weights: str | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the backbone's weights expect: SAT-493M files (their released names carry
        `sat493m`) have their own; everything else ImageNet's."""
        if weights is not None and "sat493m" in str(weights).lower():
            return SAT493M_MEAN, SAT493M_STD
        return self.mean, self.std


def _last(count: int, depth: int) -> tuple[int, ...]:
    return tuple(range(depth - count, depth))


def _dinov2(size: str, timm_stem: str, dim: int, depth: int, heads: int, params: float, ade: float) -> dict:
    hub = f"dinov2_vit{size}14"
    common = dict(
        embed_dim=dim, depth=depth, num_heads=heads, out_indices=_last(4, depth), patch_size=14, params_m=params
    )
    return {
        hub: BackboneSpec(hub, f"{timm_stem}_dinov2", "lvd142m", prefix_tokens=1, ade20k_linear=ade, **common),
        f"{hub}_reg": BackboneSpec(f"{hub}_reg", f"{timm_stem}_reg4_dinov2", "lvd142m", prefix_tokens=5, **common),
    }


def _dinov3_vit(size: str, timm_stem: str, dim: int, depth: int, heads: int, params: float, ade: float) -> dict:
    hub = f"dinov3_vit{size}"
    # timm's `_qkvb` variants keep Meta's query/value biases (its others drop them: exact only where
    # they are zero); the 7B has none.
    timm_name = f"{timm_stem}_dinov3" + ("" if size == "7b16" else "_qkvb")
    spec = BackboneSpec(hub, timm_name, "lvd1689m", dim, depth, heads, _last(4, depth), 16, 5, params, ade)
    return {hub: spec}


def _dinov3_convnext(size: str, dim: int, params: float, ade: float) -> dict:
    hub = f"dinov3_convnext_{size}"
    return {hub: BackboneSpec(hub, f"convnext_{size}", "dinov3_lvd1689m", dim, 4, 0, (3,), 32, 0, params, ade)}


# DINOv2: the paper's Table 10 linear ADE20K ("lin"); DINOv3: Meta's model card (linear, LVD-1689M).
BACKBONES: dict[str, BackboneSpec] = {
    **_dinov2("s", "vit_small_patch14", 384, 12, 6, 21, 44.3),
    **_dinov2("b", "vit_base_patch14", 768, 12, 12, 86, 47.3),
    **_dinov2("l", "vit_large_patch14", 1024, 24, 16, 300, 47.7),
    **_dinov2("g", "vit_giant_patch14", 1536, 40, 24, 1100, 49.0),
    **_dinov3_vit("s16", "vit_small_patch16", 384, 12, 6, 21, 47.0),
    **_dinov3_vit("s16plus", "vit_small_plus_patch16", 384, 12, 6, 29, 48.8),
    **_dinov3_vit("b16", "vit_base_patch16", 768, 12, 12, 86, 51.8),
    **_dinov3_vit("l16", "vit_large_patch16", 1024, 24, 16, 300, 54.9),
    **_dinov3_vit("h16plus", "vit_huge_plus_patch16", 1280, 32, 20, 840, 54.8),
    **_dinov3_vit("7b16", "vit_7b_patch16", 4096, 40, 32, 6716, 55.9),
    **_dinov3_convnext("tiny", 768, 29, 42.7),
    **_dinov3_convnext("small", 768, 50, 44.8),
    **_dinov3_convnext("base", 1024, 89, 46.3),
    **_dinov3_convnext("large", 1536, 198, 47.8),
}
# The DINOv2 size names of earlier versions: `--backbone small` is dinov2_vits14 (+ `--registers`: _reg).
SIZE_NAMES = {"small": "dinov2_vits14", "base": "dinov2_vitb14", "large": "dinov2_vitl14", "giant": "dinov2_vitg14"}
SIZES = tuple(SIZE_NAMES)
BACKBONE_NAMES = SIZES + tuple(BACKBONES)


def get_backbone_spec(name: str, registers: bool = False) -> BackboneSpec:
    """Look up a backbone by Meta's hub name or a DINOv2 size name; `registers=True` picks a DINOv2
    backbone's 4-register variant (DINOv3 ViTs always have their 4 storage tokens)."""
    hub_name = SIZE_NAMES.get(name, name)
    if hub_name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if registers and not hub_name.endswith("_reg"):
        if not hub_name.startswith("dinov2"):
            raise ValueError(f"--registers is for DINOv2 backbones; {hub_name} has its own storage tokens")
        hub_name += "_reg"
    return BACKBONES[hub_name]


def canonical_name(name: str, registers: bool = False) -> str:
    """The hub name behind any accepted spelling (`small` + registers -> `dinov2_vits14_reg`)."""
    return get_backbone_spec(name, registers).hub_name
