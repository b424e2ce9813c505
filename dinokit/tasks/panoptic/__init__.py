"""Panoptic and instance segmentation with EoMT on COCO-format folders: see task.py."""

from dinokit.tasks.panoptic import task  # noqa: F401  (registers panoptic and instance)
