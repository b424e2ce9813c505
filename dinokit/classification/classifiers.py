"""Classifiers on frozen embeddings: weighted kNN (DINO / DINOv2's) and a linear probe trained with
several learning rates at once, plus their accuracy figures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.training.schedules import build_scheduler

TEMPERATURE = 0.07  # dinov2/eval/knn.py and DINO's eval_knn.py
KNN_MEMORY = 256 * 1024**2  # bytes of similarities per query chunk


def knn_votes(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = TEMPERATURE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temperature-weighted kNN votes of every query: the k most cosine-similar training embeddings
    each vote exp(similarity / T) for their class. Returns (votes [Q, classes], neighbour indices
    [Q, k], their similarities [Q, k]). Queries go in chunks of KNN_MEMORY bytes of similarities,
    so 100k stored embeddings never need a Q x N matrix at once."""
    if not 1 <= k <= len(train):
        raise ValueError(f"--k {k}: must be between 1 and the number of training images ({len(train)})")
    train = F.normalize(train.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    chunk = max(1, KNN_MEMORY // (4 * len(train)))
    votes, indices, sims = [], [], []
    for start in range(0, len(queries), chunk):
        similarity = queries[start : start + chunk] @ train.T
        top_sims, top_idx = similarity.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        chunk_votes = torch.zeros(len(top_idx), num_classes, dtype=weights.dtype)
        chunk_votes.scatter_add_(1, train_labels[top_idx], weights)
        votes.append(chunk_votes)
        indices.append(top_idx)
        sims.append(top_sims)
    return torch.cat(votes), torch.cat(indices), torch.cat(sims)


def ranked_classes(scores: torch.Tensor) -> torch.Tensor:
    """Classes of each row from best to worst; equal scores rank the lower class index first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the k best-ranked classes."""
    top = ranked_classes(scores)[:, :k]
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class over its images (None for a class without any)."""
    result = []
    for label in range(num_classes):
        mine = labels == label
        result.append((predictions[mine] == label).float().mean().item() if mine.any() else None)
    return result


def confusion_counts(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true, predicted] counts."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


@dataclass
class ProbeResult:
    linear: nn.Linear  # the best classifier (by validation top-1, then loss)
    lr: float
    epoch: int
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch, of the best learning rate
    sweep: dict[float, float] = field(default_factory=dict)  # best validation top-1 of every learning rate


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    *,
    lrs: list[float],
    epochs: int,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    cosine: bool = False,
    seed: int = 0,
) -> ProbeResult:
    """AdamW + cross-entropy on cached embeddings, one linear classifier per entry of `lrs`, all
    trained on the same batches (as dinov2/eval/linear.py trains its grid); after every epoch each
    is scored on the validation embeddings and the best (validation top-1, then loss) is kept."""
    generator = torch.Generator().manual_seed(seed)
    probes = [_new_probe(train_x.shape[1], num_classes, generator) for _ in lrs]
    optimizer = torch.optim.AdamW(
        [{"params": probe, "lr": lr} for probe, lr in zip(probes, lrs)], weight_decay=weight_decay
    )
    steps_per_epoch = -(-len(train_x) // batch_size)
    schedule = build_scheduler(optimizer, "cosine", total_steps=epochs * steps_per_epoch) if cosine else None
    best_score, best, histories = None, None, [[] for _ in lrs]
    for epoch in range(1, epochs + 1):
        train_loss, train_correct = torch.zeros(len(lrs)), torch.zeros(len(lrs))
        for batch in torch.randperm(len(train_x), generator=generator).split(batch_size):
            logits = [train_x[batch] @ weight + bias for weight, bias in probes]
            losses = torch.stack([F.cross_entropy(scores, train_y[batch]) for scores in logits])
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()  # the classifiers share no parameter: each gets its own gradient
            optimizer.step()
            if schedule is not None:
                schedule.step()
            train_loss += losses.detach() * len(batch)
            train_correct += torch.stack([(scores.detach().argmax(-1) == train_y[batch]).sum() for scores in logits])
        with torch.no_grad():
            val_logits = [val_x @ weight + bias for weight, bias in probes]
        for i, (history, logits) in enumerate(zip(histories, val_logits)):
            row = {
                "epoch": epoch,
                "train_loss": train_loss[i].item() / len(train_x),
                "train_top1": train_correct[i].item() / len(train_x),
                "val_loss": F.cross_entropy(logits, val_y).item(),
                "val_top1": (logits.argmax(-1) == val_y).float().mean().item(),
            }
            history.append(row)
            if best_score is None or (row["val_top1"], -row["val_loss"]) > best_score:
                best_score = (row["val_top1"], -row["val_loss"])
                best = (i, epoch, [p.detach().clone() for p in probes[i]])
    index, epoch, (weight, bias) = best
    linear = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        linear.bias.copy_(bias)
    sweep = {lr: max(row["val_top1"] for row in history) for lr, history in zip(lrs, histories)}
    return ProbeResult(linear=linear, lr=lrs[index], epoch=epoch, history=histories[index], sweep=sweep)


def _new_probe(dim: int, num_classes: int, generator: torch.Generator) -> list[nn.Parameter]:
    """Weight [dim, classes] ~ N(0, 0.01) and zero bias, dinov2/eval/linear.py's initialisation."""
    return [
        nn.Parameter(torch.randn(dim, num_classes, generator=generator) * 0.01),
        nn.Parameter(torch.zeros(num_classes)),
    ]
