"""Classify images with frozen DINOv2 / DINOv3 embeddings: a weighted kNN and a linear probe, no backbone training.

    python classify.py --data-dir input/emds6                          # train/<class>/* and val/<class>/*
    python classify.py --data-dir input/photos --val-fraction 0.2      # one folder of class folders
    python classify.py --data-dir input/emds6 --features cls+avgpool --layers 4 --lr-sweep
    python classify.py --predict --model outputs/classify/classifier.pth --input new_images/

Writes to outputs/<out-dir>/ (default classify): embeddings_train.pt / embeddings_val.pt (the
embedding cache: a rerun with other classifier settings skips extraction), split.json (with
--val-fraction), metrics.json, metrics.csv, loss.png, accuracy.png (linear probe per epoch),
confusion_<method>.png, neighbours.png and classifier.pth (linear weights, classes, backbone and
feature settings, training embeddings: all that --predict needs). The folder is this workspace's:
a rerun first deletes the previous run's results (the embedding caches stay, reused while they match),
a run that fails deletes its own, and a lock keeps a second run out while one works.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import config
from checkpoint import CLASSIFIER_KIND, load_checkpoint, save_checkpoint
from cli import (
    ArgumentParser,
    add_backbone_args,
    add_device_args,
    at_least,
    backbone_identity,
    backbone_weights,
    non_negative,
    output_folder,
    positive,
    random_init_note,
    run_cli,
)
from dinokit.classification.classifiers import (
    TEMPERATURE,
    ProbeResult,
    confusion_counts,
    knn_votes,
    per_class_accuracy,
    ranked_classes,
    topk_accuracy,
    train_linear_probe,
)
from dinokit.classification.embeddings import (
    FEATURES,
    LAYERS,
    ClassificationTransform,
    EmbeddingCache,
    backbone_normalization,
    build_backbone,
    cache_key,
    extract,
    linear_input,
    stored_blocks,
)
from dinokit.classification.image_folders import ClassFolders, class_images, read_class_folders
from dinokit.runs.reports import save_confusion_matrix, save_neighbour_gallery, save_plots, write_csv
from dinokit.runs.run_folder import CLASSIFIER_RESULTS, claim_output_folder, lock_run_folder
from dinokit.writing import write_json
from model_config import get_backbone_spec
from utils import autocast, select_device, select_precision

METHODS = ("knn", "linear")
SWEEP_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
CURVES = (("loss", "Loss", "loss.png"), ("top1", "Top-1 accuracy", "accuracy.png"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(parser)
    add_backbone_args(parser)
    add_classifier_flags(parser)
    add_run_flags(parser)
    add_prediction_flags(parser)
    return parser


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=str(config.ROOT / "input" / "classification"),
        help="train/<class>/ and val/<class>/ folders, or one folder of class folders with --val-fraction",
    )
    data.add_argument(
        "--val-fraction",
        type=positive,
        default=None,
        metavar="F",
        help="split one folder of class folders: this share of each class to val (seeded by --seed)",
    )
    data.add_argument(
        "--imgsz",
        type=int,
        default=224,
        help="centre-crop side (a multiple of the patch size: 224 fits /14, /16 and ConvNeXt; 224 -> short side 256)",
    )
    data.add_argument(
        "--crop-pct", type=positive, default=0.875, help="resize the short side to imgsz / crop-pct first"
    )
    data.add_argument("--batch", type=at_least(1), default=64, help="images per forward while extracting embeddings")
    data.add_argument("--workers", type=at_least(0), default=config.WORKERS, help="image decoding processes")


def add_classifier_flags(parser: argparse.ArgumentParser) -> None:
    method = parser.add_argument_group("classifiers")
    method.add_argument(
        "--features",
        default="cls",
        choices=FEATURES,
        help="cls: class tokens; cls+avgpool: with the last block's mean patch token",
    )
    method.add_argument("--layers", type=int, default=1, choices=LAYERS, help="class tokens of the last 1 or 4 blocks")
    method.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS)
    method.add_argument("--k", type=at_least(1), nargs="+", default=[10, 20], help="kNN neighbours (each is reported)")
    method.add_argument("--temperature", type=positive, default=TEMPERATURE, help="kNN vote temperature")
    method.add_argument("--epochs", type=at_least(1), default=15, help="linear probe epochs (the best one is kept)")
    method.add_argument("--lr", type=positive, default=1e-3, help="linear probe AdamW learning rate")
    method.add_argument(
        "--lr-sweep",
        type=positive,
        nargs="*",
        default=None,
        metavar="LR",
        help=f"train one probe per learning rate at once, keep the best (no values: {SWEEP_LRS})",
    )
    method.add_argument("--weight-decay", type=non_negative, default=1e-4)
    method.add_argument("--cosine", action="store_true", help="cosine learning-rate decay over the probe's steps")
    method.add_argument("--probe-batch", type=at_least(1), default=64, help="linear probe batch size")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out-dir",
        default=None,
        help="folder under outputs/ (default classify; --predict: the model's folder); an absolute path is used as is",
    )
    add_device_args(run)
    run.add_argument("--seed", type=int, default=0, help="the split, the probe's initialisation and batch order")


def add_prediction_flags(parser: argparse.ArgumentParser) -> None:
    predict = parser.add_argument_group("prediction")
    predict.add_argument("--predict", action="store_true", help="classify --input with a classifier.pth")
    predict.add_argument("--model", default=None, help="a classifier.pth written by classify.py")
    predict.add_argument("--input", default=None, help="an image or a folder of images (searched recursively)")


def main(args: argparse.Namespace) -> None:
    check_args(args)
    if args.predict:
        predict(args)
        return
    data = read_class_folders(args.data_dir, args.val_fraction, args.seed)
    print(
        f"{len(data.classes)} classes; {len(data.train)} training and {len(data.val)} validation images"
        + (f"; {data.skipped} non-image or hidden files skipped" if data.skipped else "")
    )
    if "knn" in args.method and max(args.k) > len(data.train):
        raise ValueError(
            f"--k {max(args.k)}: larger than the training set ({len(data.train)} images in {args.data_dir})"
        )
    out_dir = output_folder(args.out_dir or "classify")
    lock = lock_run_folder(out_dir, "classifier")
    try:
        remove_results(out_dir, "the previous classifier's")  # a folder's results all come from one run
        try:
            if data.made_split:
                write_json(out_dir / "split.json", data.split_record(Path(args.data_dir)))
            train, val = embed_splits(args, data, out_dir)
            report, linear = evaluate_methods(args, data, train, val, out_dir)
            write_json(out_dir / "metrics.json", {**report, "backbone_weights": backbone_weights(args)})
            save_classifier(args, data, train, linear, out_dir / "classifier.pth")
        except BaseException:
            remove_results(out_dir, "this unfinished run's")  # no half set of results (the embedding caches stay)
            raise
        print(f"Outputs in {out_dir}")
    finally:
        lock.release()


def remove_results(out_dir: Path, whose: str) -> None:
    """Delete the result files of a classifier run in `out_dir` (not the embedding caches: they are
    keyed by what made them and reused)."""
    present = [name for name in CLASSIFIER_RESULTS if (out_dir / name).exists()]
    for name in present:
        (out_dir / name).unlink()
    if present:
        print(f"Deleted {whose} {', '.join(present)} in {out_dir}")


def check_args(args: argparse.Namespace) -> None:
    """Flag values that would only fail later, named."""
    if args.predict and (args.model is None or args.input is None):
        raise ValueError("--predict needs --model CLASSIFIER.pth and --input FILE_OR_FOLDER")
    spec = get_backbone_spec(args.backbone, args.registers)
    patch = spec.patch_size
    if args.imgsz < patch or args.imgsz % patch or not 0 < args.crop_pct <= 1:
        raise ValueError(
            f"--imgsz {args.imgsz} --crop-pct {args.crop_pct}: the crop must be a multiple of {spec.hub_name}'s "
            f"patch size {patch} ({', '.join(str(patch * n) for n in (224 // patch, 518 // patch))}, ...) "
            "and crop-pct in (0, 1]"
        )
    if args.layers > max(spec.head_layers()):
        raise ValueError(f"--layers {args.layers}: {spec.hub_name} gives one class token (its last stage); use 1")


def embed_splits(args: argparse.Namespace, data: ClassFolders, out_dir: Path) -> tuple[dict, dict]:
    """Both splits' embeddings: from the cache when its key matches, else extracted (and cached)."""
    identity = backbone_identity(args)
    transform = ClassificationTransform(args.imgsz, args.crop_pct, *backbone_normalization(identity))
    device = select_device(args.device)
    backbone, result = None, []
    for name, split in (("train", data.train), ("val", data.val)):
        cache, key = EmbeddingCache(out_dir, name), cache_key(identity, transform, split.files)
        embeddings, why = cache.load(key)
        if embeddings is not None:
            print(f"{name}: {len(split)} embeddings from the cache ({cache.path.name}); extraction skipped")
        else:
            backbone = backbone or build_backbone(identity, device)
            started = time.perf_counter()
            with autocast(device, select_precision(device, args.amp)):
                embeddings = extract(
                    backbone,
                    split.files,
                    transform,
                    device=device,
                    batch_size=args.batch,
                    workers=args.workers,
                    desc=f"Embeddings {name}",
                    blocks=stored_blocks(identity),
                )
            seconds = time.perf_counter() - started
            print(
                f"{name}: {len(split)} embeddings extracted in {seconds:.1f} s ({len(split) / seconds:.1f} images/s; "
                f"cache: {why})"
            )
            cache.save(key, embeddings)
        result.append(embeddings)
    return result[0], result[1]


def evaluate_methods(
    args: argparse.Namespace, data: ClassFolders, train: dict, val: dict, out_dir: Path
) -> tuple[dict[str, Any], torch.nn.Linear | None]:
    """Run every --method on the validation split: printed and plotted; returns the figures for
    metrics.json and the linear probe (None without it)."""
    train_x, val_x = linear_input(train, args.features, args.layers), linear_input(val, args.features, args.layers)
    train_y, val_y = torch.tensor(data.train.labels), torch.tensor(data.val.labels)
    num_classes = len(data.classes)
    report: dict[str, Any] = {
        "classes": data.classes,
        "features": args.features,
        "layers": args.layers,
        "dim": train_x.shape[1],
        "train_images": len(train_y),
        "val_images": len(val_y),
    }
    print(f"Features: {args.features}, last {args.layers} block(s), {train_x.shape[1]} dimensions")
    linear = None
    if "knn" in args.method:
        report["knn"] = {}
        for k in args.k:
            votes, neighbours, sims = knn_votes(train_x, train_y, val_x, k, num_classes, args.temperature)
            report["knn"][str(k)] = scores(votes, val_y, data.classes, f"kNN k={k}")
        save_confusion_matrix(
            confusion_counts(ranked_classes(votes)[:, 0], val_y, num_classes),
            data.classes,
            out_dir / "confusion_knn.png",
            title=f"kNN, k={args.k[-1]} (rows normalised)",
        )
        save_neighbour_gallery(gallery_rows(data, val_y, neighbours, sims), out_dir / "neighbours.png")
    if "linear" in args.method:
        probe = train_probe(args, train_x, train_y, val_x, val_y, num_classes)
        with torch.no_grad():
            logits = probe.linear(val_x)
        report["linear"] = {
            **scores(logits, val_y, data.classes, f"linear (lr {probe.lr:g}, epoch {probe.epoch})"),
            "lr": probe.lr,
            "epoch": probe.epoch,
            "sweep": {f"{lr:g}": top1 for lr, top1 in probe.sweep.items()},
        }
        write_csv(probe.history, out_dir / "metrics.csv")
        save_plots(probe.history, out_dir, curves=CURVES, splits=("train", "val"), title=random_init_note(args))
        save_confusion_matrix(
            confusion_counts(logits.argmax(1), val_y, num_classes),
            data.classes,
            out_dir / "confusion_linear.png",
            title="linear probe (rows normalised)",
        )
        linear = probe.linear
    return report, linear


def train_probe(
    args: argparse.Namespace,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
) -> ProbeResult:
    lrs = args.lr_sweep if args.lr_sweep else SWEEP_LRS if args.lr_sweep is not None else [args.lr]
    started = time.perf_counter()
    probe = train_linear_probe(
        train_x,
        train_y,
        val_x,
        val_y,
        num_classes,
        lrs=lrs,
        epochs=args.epochs,
        batch_size=args.probe_batch,
        weight_decay=args.weight_decay,
        cosine=args.cosine,
        seed=args.seed,
    )
    print(
        f"Linear probe: {len(lrs)} learning rate(s) x {args.epochs} epochs in {time.perf_counter() - started:.1f} s; "
        f"best: lr {probe.lr:g}, epoch {probe.epoch}"
        + (
            ""
            if len(lrs) == 1
            else "; sweep top-1: " + ", ".join(f"{lr:g} {top1:.3f}" for lr, top1 in probe.sweep.items())
        )
    )
    return probe


def scores(class_scores: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str) -> dict[str, Any]:
    """Top-1 (top-5 with at least 5 classes) and per-class accuracy, printed and returned."""
    result: dict[str, Any] = {"top1": topk_accuracy(class_scores, labels, 1)}
    if len(classes) >= 5:
        result["top5"] = topk_accuracy(class_scores, labels, 5)
    per_class = per_class_accuracy(ranked_classes(class_scores)[:, 0], labels, len(classes))
    result["per_class"] = dict(zip(classes, per_class))
    print(f"{name}: top-1 {result['top1']:.4f}" + (f", top-5 {result['top5']:.4f}" if "top5" in result else ""))
    print("  per class: " + ", ".join(f"{c} {a:.2f}" for c, a in zip(classes, per_class) if a is not None))
    return result


def gallery_rows(
    data: ClassFolders, val_y: torch.Tensor, neighbours: torch.Tensor, sims: torch.Tensor, count: int = 4
) -> list[tuple[Path, str, list[tuple[Path, str, float]]]]:
    """Validation images of `count` different classes, each with its 5 nearest training images."""
    rows, seen = [], set()
    for index, label in enumerate(val_y.tolist()):
        if label in seen or len(rows) == count:
            continue
        seen.add(label)
        near = [
            (data.train.files[j], data.classes[data.train.labels[j]], s)
            for j, s in zip(neighbours[index, :5].tolist(), sims[index, :5].tolist())
        ]
        rows.append((data.val.files[index], data.classes[label], near))
    return rows


def save_classifier(
    args: argparse.Namespace, data: ClassFolders, train: dict, linear: torch.nn.Linear | None, path: Path
) -> None:
    """classifier.pth: everything --predict needs, with no dataset and no run folder."""
    save_checkpoint(
        {
            "kind": CLASSIFIER_KIND,
            "format": 1,
            "classes": data.classes,
            "backbone": backbone_identity(args),
            "features": {
                "features": args.features,
                "layers": args.layers,
                "imgsz": args.imgsz,
                "crop_pct": args.crop_pct,
                "mean": list(backbone_normalization(backbone_identity(args))[0]),
                "std": list(backbone_normalization(backbone_identity(args))[1]),
            },
            "linear": linear.state_dict() if linear is not None else None,
            "knn": {"k": args.k, "temperature": args.temperature},
            "train_embeddings": linear_input(train, args.features, args.layers),
            "train_labels": torch.tensor(data.train.labels),
        },
        path,
    )


def predict(args: argparse.Namespace) -> None:
    """Classify --input with a classifier.pth: predictions.csv and a summary."""
    classifier = load_checkpoint(args.model, kind=CLASSIFIER_KIND)
    source = Path(args.input)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    files = [source] if source.is_file() else class_images(source)[0]
    if not files:
        raise ValueError(f"{source}: no image files")
    out_dir = output_folder(args.out_dir) if args.out_dir else Path(args.model).parent
    claim_output_folder(out_dir, run="classifier", beside=args.model, inputs=files)
    settings, classes = classifier["features"], classifier["classes"]
    device = select_device(args.device)
    transform = ClassificationTransform(settings["imgsz"], settings["crop_pct"], settings["mean"], settings["std"])
    with autocast(device, select_precision(device, args.amp)):
        embeddings = extract(
            build_backbone(
                classifier["backbone"],
                device,
                made=f"{args.model} was trained",
                fix="train the classifier again with classify.py --weights FILE",
            ),
            files,
            transform,
            device=device,
            batch_size=args.batch,
            workers=args.workers,
            blocks=stored_blocks(classifier["backbone"]),
        )
    x = linear_input(embeddings, settings["features"], settings["layers"])
    rows = [{"file": str(f)} for f in files]
    if classifier["linear"] is not None:
        linear = torch.nn.Linear(x.shape[1], len(classes))
        linear.load_state_dict(classifier["linear"])
        with torch.no_grad():
            probabilities = linear(x).softmax(1)
        for row, p in zip(rows, probabilities):
            row.update(linear_class=classes[int(p.argmax())], linear_probability=round(float(p.max()), 4))
    k = min(classifier["knn"]["k"][0], len(classifier["train_labels"]))
    votes, _, _ = knn_votes(
        classifier["train_embeddings"], classifier["train_labels"], x, k, len(classes), classifier["knn"]["temperature"]
    )
    shares = votes / votes.sum(1, keepdim=True)
    for row, share in zip(rows, shares):
        best = int(ranked_classes(share[None])[0, 0])
        row.update(knn_class=classes[best], knn_vote_share=round(float(share[best]), 4))
    write_csv(rows, out_dir / "predictions.csv")
    print_summary(rows, out_dir / "predictions.csv")


def print_summary(rows: list[dict[str, Any]], path: Path) -> None:
    key = "linear_class" if "linear_class" in rows[0] else "knn_class"
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[key]] = counts.get(row[key], 0) + 1
    print(f"{len(rows)} images -> {path}")
    print(
        f"  {key.split('_')[0]}: "
        + ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    )
    if "linear_class" in rows[0]:  # a kNN-only classifier has nothing to agree with
        agree = sum(row["linear_class"] == row["knn_class"] for row in rows)
        print(f"  linear and kNN agree on {agree}/{len(rows)}")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
