"""Task name -> task object, filled by `@register_task` on each task's class (one line per task, in
its own folder), as timm registers a model. `--task` choices, a checkpoint's task, the demo and
export look tasks up here; nothing outside dinokit/tasks/ compares a task's name."""

from __future__ import annotations

from typing import Any, TypeVar

from dinokit.errors import UserError

T = TypeVar("T")
TASKS: dict[str, Any] = {}
DEFAULT_TASK = "segmentation"  # what a checkpoint written before tasks were recorded holds


def register_task(cls: type[T]) -> type[T]:
    """Class decorator: one instance of the task under its `name`."""
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name!r} is registered twice")
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Any:
    """The task object registered under `name`."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; this version knows {', '.join(TASKS)}")
    return TASKS[name]


def task_of(info: dict[str, Any]) -> Any:
    """The task of a model description (`model_info`); older ones are segmentation models."""
    return get_task(info.get("task", DEFAULT_TASK))


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)
