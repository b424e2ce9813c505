"""What a task is: the parts that differ between tasks, as one object per task (registered in
dinokit/tasks/registry.py). The shared code asks these and never a task's name; each hook below says
who asks it. A new task subclasses `Task`, writes every hook that raises NotImplementedError here
(the defaults are what a task without classes does), and registers itself with `@register_task`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from datasets import find_pairs, pair_folders
from dinokit.backbones.choice import BackboneChoice
from dinokit.data.image_files import list_image_files


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
    """One pass over a split (engine.py): the loss of each batch and the split's metrics."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss and its weight in the split's mean."""

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None: ...

    def result(self, device: torch.device) -> tuple[dict[str, float], list[float]]:
        """The split's metrics (metrics.csv's columns) and any per-class values."""


class Evaluator(Protocol):
    """Full-resolution scores of one split (evaluation.py): each prediction against its truth."""

    def update(self, prediction: torch.Tensor, truth: torch.Tensor) -> None: ...

    def result(self, device: torch.device) -> Any: ...


class Task:
    """The base of every task. `info` below is a model's description (`model_info`, in today's
    format: dinokit/runs/checkpoint_format.py); `spec` the task's description of a dataset
    (segmentation: classes.json's DatasetSpec; depth: depth.json's DepthSpec)."""

    name: str = ""  # --task, and a checkpoint's model_info["task"]
    help: str = ""  # what --task NAME trains, in train.py --help
    data_layout: str = ""  # the dataset folder it reads, in train.py --help
    best: Best  # the metric the best checkpoint is chosen on (best_model_<label>.pth)
    curves: tuple[tuple[str, str, str], ...] = ()  # (metric, axis label, file) of the per-epoch curves
    metric_names: dict[str, str] = {}  # how the epoch line names a metric (others: by their column)
    target_dtype: torch.dtype  # what a feature cache stores the training targets as
    folder_prefix: str = ""  # a run's default folder: <prefix>transfer_learning / <prefix>fine_tuning
    target_folder: str = "labels"  # a split's targets: <split>_<target_folder>/ beside <split>_images/
    target_noun: str = "mask"  # one target file, in messages
    export_outputs: dict[str, str] = {}  # what an exported file can output, in words
    export_measure: str = ""  # how export's self-check says two outputs agree
    export_quantity: str = ""  # what export's largest difference is of

    # -- training (train.py, engine.py) ---------------------------------------------------------

    def run_folder(self, fine_tune: bool) -> str:
        return f"{self.folder_prefix}{'fine_tuning' if fine_tune else 'transfer_learning'}"

    def check_args(self, args: argparse.Namespace, backbone: BackboneChoice) -> None:
        """Refuse train.py flags this task cannot take, each with its reason."""
        raise NotImplementedError

    def load_data(self, args: argparse.Namespace, imgsz: tuple[int, int], normalization: tuple) -> tuple[Any, Any, Any]:
        """(training set, validation set, spec) of --data-dir, every file checked first; the sets
        yield (image tensor, target) as datasets.PairedDataset does."""
        raise NotImplementedError

    def build_model(self, args: argparse.Namespace, spec: Any, backbone: Any, resumed: dict[str, Any] | None) -> Any:
        """The model (model.DenseModel: the backbone's tapped blocks and this task's head); `resumed`:
        a resumed checkpoint's architecture."""
        raise NotImplementedError

    def describe(self, model: Any, spec: Any, imgsz: tuple[int, int], **extra: Any) -> dict[str, Any]:
        """This task's part of the model's description (checkpoint.describe_model adds the backbone's)."""
        raise NotImplementedError

    def targets(self, info: dict[str, Any]) -> Any:
        """What a model's outputs mean, typed, from its description (segmentation: its classes, their
        colours and the ignore index, a DatasetSpec; depth: its metres, a DepthRange)."""
        raise NotImplementedError

    def scoring(self, spec: Any, args: argparse.Namespace) -> Callable[[], Scoring]:
        """A new `Scoring` per pass over a split."""
        raise NotImplementedError

    def epoch_line(self, kind: str, loss: float, metrics: dict[str, float]) -> str:
        """The epoch's loss and the metrics its curves draw, as train.py prints them."""
        shown = [name for name, _, _ in self.curves if name != "loss"]
        scores = "".join(f", {kind} Epoch {self.metric_names.get(n, n)}: {metrics[n]:.4f}" for n in shown)
        return f"{kind} Epoch Loss: {loss:.4f}{scores}"

    def resume_fields(self, info: dict[str, Any], spec: Any) -> list[tuple[str, Any, Any]]:
        """(what, the checkpoint's, this run's) that must agree for a run to resume on this data."""
        return []

    def check_resume(self, info: dict[str, Any], spec: Any, path: str) -> None:
        """Anything else a resumed run's data must keep (segmentation: each class and colour)."""

    def drawer(self, info: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """(image, target or prediction) -> RGB image, for TensorBoard's examples."""
        raise NotImplementedError

    # -- rebuilding a model (checkpoint.py) -----------------------------------------------------

    def rebuild(self, info: dict[str, Any], **common: Any) -> Any:
        """The model `info` describes, without weights (`common`: the backbone's keywords)."""
        raise NotImplementedError

    def claims_released_head(self, path_or_name: str | Path) -> bool:
        """Whether --head-weights names or holds one of Meta's released heads of this task."""
        return False

    def released_model(self, path_or_name: str | Path, **backbone: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(model with the released head, spec, extra description) of a claimed head."""
        raise NotImplementedError

    # -- full-resolution evaluation (evaluation.py, evaluate.py) --------------------------------

    def list_targets(self, folder: Path) -> list[Path]:
        """The target files of a folder (image files by default: masks)."""
        return list_image_files(folder)

    def find_pairs(self, data_dir: str | Path, split: str) -> list[tuple[Path, Path]]:
        """(image, target) files of a split: <split>_images/ with <split>_<target_folder>/, by stem."""
        return find_pairs(data_dir, split, self.target_folder, list_targets=self.list_targets, noun=self.target_noun)

    def pair_folders(self, images: Path, targets: Path) -> list[tuple[Path, Path]]:
        """(image, target) files of evaluate.py's --images / --labels folders, by stem."""
        what = f"{images} with {targets}"
        return pair_folders(images, targets, what, list_targets=self.list_targets, noun=self.target_noun)

    def evaluation_data(
        self, info: dict[str, Any], data_dir: str | Path, pairs: list[tuple[Path, Path]], label: str
    ) -> Any:
        """What reading the truth needs beyond `info` (depth: the folder's depth.json), every file checked."""
        raise NotImplementedError

    def describe_data(self, data: Any) -> str:
        """A few words on `evaluation_data`'s result, for evaluate.py's plan line."""
        return ""

    def truth(self, pairs: list[tuple[Path, Path]], info: dict[str, Any], data: Any) -> Any:
        """A dataset of (image [H, W, 3] uint8, truth) at the files' own size (datasets.OriginalPairs)."""
        raise NotImplementedError

    def evaluator(self, info: dict[str, Any], data: Any, article_batch: int = 2) -> Evaluator:
        raise NotImplementedError

    def report_lines(self, evaluation: Any, info: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def report_json(self, evaluation: Any, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
        raise NotImplementedError

    def headline(self, evaluation: Any) -> str:
        """The one figure a title shows (mIoU, RMSE)."""
        raise NotImplementedError

    def on_device(self, prediction: Any, truth: Any, device: torch.device) -> tuple[Any, Any]:
        """A prediction and its truth as the evaluator takes them (arrays: tensors on `device`)."""
        return torch.as_tensor(prediction).to(device), truth.to(device)

    def write_predictions(self, evaluation: Any, info: dict[str, Any], out_dir: Path, split: str) -> list[Path]:
        """Files evaluate.py writes with the predictions of the split (none by default; panoptic: COCO's formats)."""
        return []

    def report_figures(self, evaluation: Any, out_dir: Path, name: str, title: str) -> list[Path]:
        """Figures evaluate.py saves beside its report eval_<name>.json (none by default)."""
        return []

    def article_metric_line(self, evaluation: Any) -> str:
        """evaluate.py --article-metric: the reference article's segmentation metric, which other tasks lack."""
        return f"note: --article-metric is the reference article's segmentation metric; a {self.name} model has none"

    # -- prediction (inference.py) --------------------------------------------------------------

    def color_map(self, info: dict[str, Any]) -> Any:
        """The palette predictions are drawn in (None: the task draws no classes)."""
        return None

    def combine_passes(self, scores: torch.Tensor) -> torch.Tensor:
        """What test-time passes average (`[C, H, W]` of one pass): the outputs themselves by default."""
        return scores

    def check_mode(self, mode: Any) -> None:
        """Refuse an InferenceMode the task cannot predict in (the Predictor asks)."""

    def reduce(self, outputs: Any, size: tuple[int, int], info: dict[str, Any]) -> list[Any]:
        """A batch's outputs (`[B, C, h, w]`; EoMT: its queries) as each image's prediction at `size` (H, W)."""
        raise NotImplementedError

    def from_scores(self, scores: torch.Tensor) -> np.ndarray:
        """`[C, H, W]` scores of one image as its prediction."""
        raise NotImplementedError

    # -- outputs (infer_image.py, infer_video.py, app.py) ---------------------------------------

    def image_writer(
        self, info: dict[str, Any], out_dir: Path, options: OutputOptions
    ) -> Callable[[Path, np.ndarray, np.ndarray], None]:
        """(image path, image, prediction) -> the files infer_image.py writes for it."""
        raise NotImplementedError

    def frame_drawer(
        self, info: dict[str, Any], size: tuple[int, int], options: OutputOptions
    ) -> tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], tuple[int, int]]:
        """(frame, prediction) -> the drawn frame, and the drawn frames' (W, H) for inputs of `size`."""
        raise NotImplementedError

    def demo_outputs(
        self, info: dict[str, Any], stem: str, image: np.ndarray, prediction: np.ndarray, write: Callable, alpha: float
    ) -> tuple[Any, ...]:
        """The web demo's four panes for one image (`write(name, save)`: a result file's path)."""
        raise NotImplementedError

    # -- export (export.py) ---------------------------------------------------------------------

    def export_output(self, info: dict[str, Any], argmax: bool, where: str) -> str:
        """What an exported file outputs (a key of `export_outputs`); refuses what cannot be exported."""
        raise NotImplementedError

    def summary(self, info: dict[str, Any]) -> str:
        """The model in a few words, for the file's description ("segmentation (21 classes)")."""
        raise NotImplementedError

    def max_difference(self, actual: Any, expected: Any) -> float:
        """Largest |difference| between an exported file's output and PyTorch's."""
        return (actual - expected).abs().max().item()

    def from_exported(self, outputs: tuple[torch.Tensor, ...], input_size: tuple[int, int], patch_size: int) -> Any:
        """An exported file's several outputs as the model's own output (tasks with one output never get here)."""
        raise NotImplementedError

    def agreement(self, actual: torch.Tensor, expected: torch.Tensor) -> float:
        """Share of pixels where an exported file's output agrees with PyTorch's."""
        raise NotImplementedError
