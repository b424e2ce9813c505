"""The periodic kNN check of a pretraining run (`--monitor DIR`): the backbone being trained
embeds a labelled folder in classify.py's layout, and each validation image is classified by
its 20 nearest training images — the number `classify.py --weights backbone.pth` prints for the
written file (same preprocessing, features and vote). With a distillation teacher it also says
how often the student's nearest training image is the teacher's (`knn_agreement`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dinokit.classification.classifiers import TEMPERATURE, knn_votes, ranked_classes
from dinokit.classification.embeddings import ClassificationTransform, extract, linear_input
from dinokit.classification.image_folders import read_class_folders
from dinokit.errors import UserError

MONITOR_K = 20


class KnnMonitor:
    """kNN top-1 of a backbone on a labelled folder (train/ and val/ class folders, or one folder
    of class folders split 80/20 per class)."""

    def __init__(
        self,
        folder: str | Path,
        imgsz: int,
        normalization: tuple[Sequence[float], Sequence[float]],
        device: torch.device,
        workers: int = 0,
    ):
        root = Path(folder)
        has_splits = (root / "train").is_dir() and (root / "val").is_dir()
        data = read_class_folders(root, None if has_splits else 0.2)
        if len(data.train) < 1 or len(data.val) < 1:
            raise UserError(f"{root}: --monitor needs labelled training and validation images")
        self.data, self.device, self.workers = data, device, workers
        self.transform = ClassificationTransform(imgsz, 0.875, *normalization)
        self.k = min(MONITOR_K, len(data.train))
        self.teacher_neighbours: torch.Tensor | None = None

    def embed(
        self, backbone: nn.Module, transform: ClassificationTransform | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(training, validation) class tokens of the last block."""
        features = []
        for split in (self.data.train, self.data.val):
            stored = extract(
                backbone, split.files, transform or self.transform, device=self.device, workers=self.workers, blocks=1
            )
            features.append(linear_input(stored, "cls", 1))
        return features[0], features[1]

    def score(self, backbone: nn.Module) -> dict[str, float]:
        """{"knn_top1": …} (and with a teacher set, "knn_agreement": …) of `backbone` now."""
        was_training = backbone.training
        train, val = self.embed(backbone)
        backbone.train(was_training)
        labels = torch.tensor(self.data.train.labels)
        votes, neighbours, _ = knn_votes(train, labels, val, self.k, len(self.data.classes), TEMPERATURE)
        top1 = float((ranked_classes(votes)[:, 0] == torch.tensor(self.data.val.labels)).float().mean())
        scores = {"knn_top1": top1}
        if self.teacher_neighbours is not None:
            scores["knn_agreement"] = float((neighbours[:, 0] == self.teacher_neighbours).float().mean())
        return scores

    def set_teacher(self, teacher: nn.Module, imgsz: int) -> float:
        """Remember a distillation teacher's nearest training image of each validation image (at `imgsz`,
        a size its patch divides); its kNN top-1."""
        transform = ClassificationTransform(
            imgsz,
            self.transform.crop_pct,
            self.transform.mean.flatten().tolist(),
            self.transform.std.flatten().tolist(),
        )
        train, val = self.embed(teacher, transform)
        labels = torch.tensor(self.data.train.labels)
        votes, neighbours, _ = knn_votes(train, labels, val, self.k, len(self.data.classes), TEMPERATURE)
        self.teacher_neighbours = neighbours[:, 0]
        return float((ranked_classes(votes)[:, 0] == torch.tensor(self.data.val.labels)).float().mean())
