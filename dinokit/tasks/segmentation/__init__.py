"""Segmentation: the papers' linear head, its data, scores, drawings and Meta's released heads."""

from dinokit.tasks.segmentation.task import SegmentationTask, segmentation_model

__all__ = ["SegmentationTask", "segmentation_model"]
