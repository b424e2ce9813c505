"""Obtaining a DINOv2 backbone (hub, local clone, timm, weights file); Meta's released heads; patch-feature PCA."""
