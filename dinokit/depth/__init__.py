"""Depth: Meta's DINOv2 depth heads (linear bins, DPT) without mmcv, their released files, depth maps' colours."""
