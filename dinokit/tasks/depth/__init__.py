"""Depth: Meta's DINOv2 depth heads (linear bins, DPT) without mmcv, their released files, RGB-D
folders, SigLoss and the depth errors, depth maps' colours."""

from dinokit.tasks.depth.task import DepthTask, depth_model

__all__ = ["DepthTask", "depth_model"]
