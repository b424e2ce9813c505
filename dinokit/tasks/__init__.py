"""Tasks: one folder per task, each a registered task object that owns what differs between
tasks (its head, data, loss and scores, full-resolution evaluation, what a prediction is and how it
is written and drawn, what export and the checkpoint's description need). The loop, checkpoints,
the prediction path, devices, file writing, the demo and the notebooks are shared (the root's
modules) and ask the task. A new task: README.md, "Adding a task"."""

from dinokit.tasks import depth, panoptic, segmentation  # noqa: F401  (each registers its task)
from dinokit.tasks.registry import TASKS, get_task, register_task, task_names, task_of

__all__ = ["TASKS", "get_task", "register_task", "task_names", "task_of"]
