"""What a task is: the parts that differ between tasks, as one object per task (registered in
dinokit/tasks/registry.py). The shared code asks these and never a task's name:

- training (train.py, engine.py): `check_args`, `load_data`, `build_model`, `describe`,
  `scoring` (the loss and the per-epoch metrics), `best`, `curves`, `target_dtype`,
  `resume_fields` / `check_resume`, `run_folder`;
- rebuilding a model from its description (checkpoint.py): `rebuild`, and Meta's released heads
  (`claims_released_head`, `released_model`);
- full-resolution evaluation (evaluation.py, evaluate.py): `find_pairs`, `pair_folders`,
  `evaluation_data`, `evaluator`, `report_lines`, `report_json`, `write_report_figures`;
- prediction (inference.py): `color_map`, `combine_passes`, `reduce`, `from_scores`;
- outputs (infer_image.py, infer_video.py, app.py, TensorBoard): `image_writer`, `frame_drawer`,
  `demo_outputs`, `drawer`;
- export (export.py): `export_output`, `export_summary`, `agreement`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class OutputOptions:
    """How predictions are drawn and written (the scripts' flags): overlay opacity, a depth colour
    scale other than the model's, float arrays beside the images."""

    alpha: float = 0.5
    depth_range: tuple[float, float] | None = None
    save_npy: bool = False


class Best(NamedTuple):
    """The metric a run's best checkpoint is chosen on, its file's label and which of two is better."""

    metric: str
    label: str
    better: Callable[[float, float], float]


class Scoring(Protocol):
    """One pass over a split: the loss of each batch and the split's metrics (engine.py)."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None: ...

    def result(self, device: torch.device) -> tuple[dict[str, float], list[float]]: ...


class Evaluator(Protocol):
    """Full-resolution scores of one split: each prediction against its truth (evaluation.py)."""

    def update(self, prediction: torch.Tensor, truth: torch.Tensor) -> None: ...

    def result(self, device: torch.device) -> dict[str, Any]: ...


class Task:
    """The base of every task: its name, and the hooks listed in the module docstring."""

    name: str = ""
    help: str = ""
    best: Best
    curves: tuple[tuple[str, str, str], ...]  # (metric, axis label, file) of the per-epoch curves
    target_dtype: torch.dtype  # what a feature cache stores targets as
    folder_prefix: str = ""  # a run's default folder: <prefix>transfer_learning / <prefix>fine_tuning

    def run_folder(self, fine_tune: bool) -> str:
        return f"{self.folder_prefix}{'fine_tuning' if fine_tune else 'transfer_learning'}"

    def epoch_line(self, kind: str, loss: float, metrics: dict[str, float]) -> str:
        """The epoch's loss and the metrics its curves draw, as train.py prints them."""
        shown = [name for name, _, _ in self.curves if name != "loss"]
        scores = "".join(f", {kind} Epoch {self.metric_names.get(n, n)}: {metrics[n]:.4f}" for n in shown)
        return f"{kind} Epoch Loss: {loss:.4f}{scores}"

    metric_names: dict[str, str] = {}

    def combine_passes(self, scores: torch.Tensor) -> torch.Tensor:
        """What test-time passes average (`[C, H, W]` of one pass): the scores themselves by default."""
        return scores

    def color_map(self, info: dict[str, Any]) -> Any:
        """The palette predictions are drawn in (None: the task draws no classes)."""
        return None

    def frame_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """A drawn video frame's (W, H) for input frames of `size`."""
        return size

    def report_figures(self, result: dict[str, Any]) -> dict[str, Any]:
        """Figures evaluate.py saves beside its report (none by default)."""
        return {}

    def drawer(self, info: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        raise NotImplementedError
