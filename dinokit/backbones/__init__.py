"""Obtaining a DINOv2 or DINOv3 backbone (hub, local clone, timm, weights file); Meta's released heads;
patch-feature PCA."""
