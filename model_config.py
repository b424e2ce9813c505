"""The DINOv2 backbones this toolkit knows: names in each source, widths and the tapped layers.

`out_indices` are the four blocks whose patch tokens the linear head reads, as in the
DINOv2 paper's multi-layer linear segmentation probe (the last four blocks).
"""

from dataclasses import dataclass

PATCH_SIZE = 14
# Where a backbone comes from (dinokit/backbones/loading.py): torch.hub, timm, or a local clone of the
# dinov2 repository.
SOURCES = ("hub", "timm", "local")


@dataclass(frozen=True)
class BackboneSpec:
    hub_name: str  # torch.hub entry point in facebookresearch/dinov2
    timm_name: str  # timm model name with the .lvd142m pretrained tag
    embed_dim: int
    depth: int
    num_heads: int
    out_indices: tuple[int, ...]
    patch_size: int = PATCH_SIZE

    @property
    def head_in_channels(self) -> int:
        return self.embed_dim * len(self.out_indices)


_SIZES = {
    # size: (hub stem, timm stem, embed_dim, depth, heads, out_indices)
    "small": ("dinov2_vits14", "vit_small_patch14", 384, 12, 6, (8, 9, 10, 11)),
    "base": ("dinov2_vitb14", "vit_base_patch14", 768, 12, 12, (8, 9, 10, 11)),
    "large": ("dinov2_vitl14", "vit_large_patch14", 1024, 24, 16, (20, 21, 22, 23)),
    "giant": ("dinov2_vitg14", "vit_giant_patch14", 1536, 40, 24, (36, 37, 38, 39)),
}
SIZES = tuple(_SIZES)


def get_backbone_spec(size: str, registers: bool = False) -> BackboneSpec:
    """Look up a backbone by size name; `registers=True` picks the 4-register variant."""
    if size not in _SIZES:
        raise ValueError(f"unknown backbone size {size!r}; choose one of {', '.join(SIZES)}")
    hub, timm_stem, dim, depth, heads, out_indices = _SIZES[size]
    if registers:
        return BackboneSpec(f"{hub}_reg", f"{timm_stem}_reg4_dinov2.lvd142m", dim, depth, heads, out_indices)
    return BackboneSpec(hub, f"{timm_stem}_dinov2.lvd142m", dim, depth, heads, out_indices)


HEAD_LAYERS = (1, 4)  # 1: the last block (the paper's "lin" head); 4: the last four (its "+ms" head input)
