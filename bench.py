"""Side-by-side speed and memory benchmark on a generated dataset, in one run.

    python bench.py                       # ViT-S/14, random init, 644x644, CPU or GPU (auto)
    python bench.py --weights dinov2_vits14_pretrain.pth --backbone small --device cuda

1. Frozen-backbone training, seconds per epoch (train + validate): the seed article's loop (fp32,
   the backbone re-run over the validation split every epoch) against ours (one engine, AMP where
   it helps, validation features cached after the first epoch), and ours with training features
   cached too (only valid without augmentation, so its metrics differ).
2. Inference ms/image: our whole predict path (preprocess, forward, upsample, argmax) against a
   bare backbone forward, the floor.
3. Peak memory of one training step (frozen, fine-tune, fine-tune + gradient checkpointing), each
   measured in a fresh process: RSS on CPU, torch.cuda.max_memory_allocated on CUDA.
4. Classification (classify.py): embedding extraction in images/s at --cls-imgsz, and kNN over
   --knn-stored random stored embeddings (chunked, so memory stays bounded) in ms per query batch.
5. Export (export.py): ms/image of the predict path at --imgsz, PyTorch eager float32 against the
   onnxruntime float32 / int8 / float16 files, and each one's pixel agreement with PyTorch's
   predictions on --agreement-images (default: the generated images). Needs requirements-export.txt.
6. Backbones side by side (--compare, default DINOv2 ViT-S/14, DINOv3 ViT-S/16 and ViT-B/16), random
   init from timm, at --imgsz rounded up to each one's patch size (640 -> 644 = 46x46 tokens for /14,
   640 = 40x40 for /16): a frozen training step at --batch, a forward at batch 1, and the bytes one
   cached training view takes (features in the training precision + the uint8 mask).
7. Retrieval (retrieve.py): FAISS indexes of --index-sizes generated 384-d embeddings (clustered,
   normalised): build time, size, ms per query at k = 10 (a batch of 100 queries, each index's own
   threads) and recall@10 against exact search, for exact, HNSW and IVF-PQ.
8. Near-duplicate threshold (retrieve.py duplicates), with --photos DIR: every photo against its
   own copies (resized to half, JPEG quality 50, centre crop of 90 %) and against the other photos,
   with the backbone flags given: the similarities of each, and where a threshold separates them.
9. End-to-end inference, with --pipeline (infer_image.py, infer_video.py as users run them):
   images (frames) per second over a folder (--pipeline-images, default generated) and a clip
   (--pipeline-video, default generated), the difference of a long and an 8-image run so start-up
   cancels, for --batch 1 and 8 with --workers 0 and 1, against the bare backbone's rate at batch 1
   on the same frames: how much of the network's speed survives the work around it.
10. EoMT (--task panoptic / instance): a training step (forward with masked attention, the
   mask-classification loss, backward) and an inference forward of ours against transformers'
   EomtForUniversalSegmentation of the same size (DINOv2-S with registers, --eomt-queries queries,
   random init) on the same square input of side --imgsz[0], and the inference forward against the bare
   backbone's (what the queries and the mask module add). Needs transformers (requirements-dev.txt).
11. EoMT learning, with --eomt-shapes: transformers' EomtForUniversalSegmentation (ViT-S-sized,
   patch 16, random init, --eomt-queries queries, AdamW --eomt-lr) trained --eomt-epochs epochs at
   256x256 on the shapes set of make_sample_data.py --panoptic (24 train / 8 valid, 160x120), with
   the same augmentation, masked-attention annealing and panoptic fusion as ours, scored by our PQ at
   the images' own size on both splits: the reference a train.py --task panoptic run on the same set
   is compared with (docs/panoptic.md gives both commands and figures).

12. Retrieval past one machine, with --sharded (retrieve.py embed / build as users run them):
   embedding images/s of `embed` with 1 process and with `torchrun --nproc-per-node 2`
   (--sharded-images generated images at --cls-imgsz; the rate from the difference of a full and a
   half run, so start-up cancels); then for each --sharded-sizes count of generated clustered 384-d
   vectors written as shards, a `build` per index kind (--sharded-kinds; the budget each kind's
   estimate needs, or --sharded-budget): kind, size, build time, peak RSS (the build process's own),
   recall@10 and ms/query at the tuned parameter. With --autofaiss-python (a Python with autofaiss
   installed), autofaiss builds on the same shards and budget, scored on the same queries.

13. Pretraining, with --pretrain (pretrain.py as users run it): images/s of DINOv2 self-distillation
   (2 global crops at --pretrain-imgsz, 2 local crops, DINO + iBOT + KoLeo, Sinkhorn-Knopp
   centring, --pretrain-prototypes prototypes, batch --pretrain-batch) of a random-init ViT-S/14 on
   --pretrain-images generated shape images; the rate from the difference of a 2-epoch and a 1-epoch
   run, so start-up cancels. With --lightly-python (a Python with PyPI's lightly-train), its DINOv2
   method on the same images, backbone, crops, prototypes and batch, timed the same way.

`python bench.py --summary [--backbone ...]` prints the segmentation model's layers instead (torchinfo).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

import config
from checkpoint import describe_model, save_checkpoint
from cli import (
    ArgumentParser,
    add_backbone_args,
    add_device_args,
    at_least,
    backbone_argv,
    backbone_identity,
    backbone_kwargs,
    byte_size,
    run_cli,
)
from datasets import ViewsDataset, build_datasets, make_loader, set_epoch
from dinokit.backbones.loading import load_backbone
from dinokit.classification.classifiers import knn_votes
from dinokit.classification.embeddings import ClassificationTransform, extract
from dinokit.classification.image_folders import class_images
from dinokit.data.image_files import list_image_files, read_image
from dinokit.data.labels import VOC
from dinokit.data.resize import normalisation_table, normalise, preprocess, round_to_patch
from dinokit.data.synthetic import clustered_unit_vectors, make_dataset, make_image_folders, make_shape_folders
from dinokit.prediction.modes import InferenceMode
from dinokit.prediction.videos import open_video, read_frames, write_video
from dinokit.pretraining.crops import local_crop_size
from dinokit.retrieval.collection import collect_images
from dinokit.retrieval.descriptors import DESCRIPTORS, embed_files
from dinokit.retrieval.index_folder import (
    RECALL_K,
    RECALL_QUERIES,
    exact_neighbours,
    recall_at,
    sample_ids,
    timed_search,
)
from dinokit.retrieval.index_plan import INDEX_KINDS, candidates
from dinokit.retrieval.shards import write_vector_shards
from dinokit.retrieval.vector_index import build_index, faiss_module, normalised, to_bytes
from dinokit.runs.reports import format_bytes
from dinokit.tasks import get_task
from dinokit.tasks.segmentation import segmentation_model
from dinokit.tasks.segmentation.scoring import SegmentationScoring, pixel_cross_entropy
from dinokit.training.feature_cache import FeatureCache
from engine import LoopSettings, cache_features, train_one_epoch, validate
from inference import Predictor, window_grid
from metrics import ConfusionMatrix
from model import DenseModel
from model_config import BACKBONE_NAMES
from utils import autocast, select_device, select_precision

NUM_CLASSES = len(config.CLASSES)  # the synthetic benchmark data is VOC-coloured
COMPARED_BACKBONES = ("dinov2_vits14", "dinov3_vits16", "dinov3_vitb16")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_args(parser)
    # Random init unless --weights names real DINOv2 weights: the timings do not depend on the values.
    parser.set_defaults(source="timm", no_pretrained=True)
    add_device_args(parser)
    parser.add_argument("--imgsz", type=int, nargs=2, default=(644, 644), metavar=("W", "H"))
    parser.add_argument("--train-images", type=at_least(1), default=4)
    parser.add_argument("--valid-images", type=at_least(1), default=4)
    parser.add_argument(
        "--epochs", type=at_least(1), default=20, help="the seed's 20 (shrink the images, not the epochs)"
    )
    parser.add_argument("--train-views", type=at_least(1), default=4, help="K of the --train-views row")
    parser.add_argument("--batch", type=at_least(1), default=2)
    parser.add_argument("--workers", type=at_least(0), default=2)
    parser.add_argument("--repeats", type=at_least(1), default=5, help="timed inference repetitions")
    parser.add_argument("--cls-imgsz", type=at_least(1), default=224, help="classification: crop side for extraction")
    parser.add_argument("--cls-images", type=at_least(1), default=64, help="classification: images to embed")
    parser.add_argument(
        "--knn-stored", type=at_least(1), default=100_000, help="classification: stored embeddings for kNN"
    )
    parser.add_argument(
        "--agreement-images",
        default=None,
        metavar="DIR",
        help="export: images on which each engine's predictions are compared (default: generated)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=(
            "epochs",
            "inference",
            "modes",
            "memory",
            "classification",
            "export",
            "backbones",
            "eomt",
            "retrieval",
        ),
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="the end-to-end section (starts infer_*.py 24 times: minutes)"
    )
    parser.add_argument("--pipeline-model", default=None, help="end-to-end: a checkpoint (default: the bench model)")
    parser.add_argument("--pipeline-images", default=None, metavar="DIR", help="end-to-end: an image folder")
    parser.add_argument("--pipeline-video", default=None, metavar="FILE", help="end-to-end: a clip (56 frames read)")
    parser.add_argument(
        "--index-sizes",
        type=at_least(100),
        nargs="+",
        default=[10_000, 100_000, 1_000_000],
        metavar="N",
        help="retrieval: stored embeddings per index (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the draw of a random-init backbone (--photos)")
    parser.add_argument("--eomt-queries", type=at_least(1), default=100, help="EoMT section: queries of both models")
    parser.add_argument(
        "--eomt-shapes", action="store_true", help="train transformers' EoMT on the shapes set (minutes)"
    )
    parser.add_argument("--eomt-epochs", type=at_least(1), default=40, help="--eomt-shapes: epochs")
    parser.add_argument("--eomt-lr", type=float, default=3e-4, help="--eomt-shapes: AdamW learning rate")
    parser.add_argument(
        "--photos", default=None, metavar="DIR", help="near-duplicate threshold: real photos (searched recursively)"
    )
    parser.add_argument(
        "--index-kinds", nargs="+", default=["exact", "hnsw", "ivfpq"], choices=("exact", "hnsw", "ivfpq")
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=list(COMPARED_BACKBONES),
        choices=BACKBONE_NAMES,
        metavar="NAME",
        help="backbones of the side-by-side section (default: %(default)s)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="print a torchinfo summary of the segmentation model these flags build, at --imgsz, and exit",
    )
    parser.add_argument("--sharded", action="store_true", help="retrieval past one machine: embed and build (minutes)")
    parser.add_argument("--sharded-images", type=at_least(4), default=64, help="--sharded: images embedded")
    parser.add_argument("--sharded-sizes", type=at_least(1000), nargs="+", default=[100_000, 1_000_000], metavar="N")
    parser.add_argument(
        "--sharded-kinds", nargs="+", default=list(INDEX_KINDS), choices=INDEX_KINDS, help="--sharded: index kinds"
    )
    parser.add_argument(
        "--sharded-budget", type=byte_size, default=None, help="--sharded: one --max-memory for every build"
    )
    parser.add_argument("--autofaiss-python", default=None, metavar="PYTHON", help="--sharded: a Python with autofaiss")
    parser.add_argument("--autofaiss-timeout", type=at_least(1), default=1800, help="--sharded: seconds, at most")
    parser.add_argument("--pretrain", action="store_true", help="pretrain.py images/s (and lightly-train's)")
    parser.add_argument("--pretrain-images", type=at_least(8), default=256, help="--pretrain: generated images")
    parser.add_argument("--pretrain-imgsz", type=at_least(28), default=98, help="--pretrain: global crop side")
    parser.add_argument("--pretrain-batch", type=at_least(2), default=32)
    parser.add_argument("--pretrain-prototypes", type=at_least(2), default=1024)
    parser.add_argument(
        "--lightly-python", default=None, metavar="PYTHON", help="--pretrain: a Python with lightly-train"
    )
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: one config per process
    return parser


def build_model(args: argparse.Namespace, fine_tune: bool = False) -> DenseModel:
    torch.manual_seed(0)
    return segmentation_model(NUM_CLASSES, fine_tune=fine_tune, **backbone_kwargs(args))


def save_bench_checkpoint(args: argparse.Namespace, path: Path) -> Path:
    """The benchmark model (`build_model`) as an inference checkpoint, `model` and `model_info` only."""
    model = build_model(args)
    save_checkpoint(
        {
            "model": model.state_dict(),
            "model_info": describe_model(get_task("segmentation"), model, VOC, tuple(args.imgsz)),
        },
        path,
    )
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def article_epoch(model: DenseModel, train_loader, valid_loader, optimizer, device) -> float:
    """The seed article's loop: fp32, mean CE per batch, the backbone run over both splits every
    epoch (its frozen backbone has requires_grad=False but no no_grad block). Returns validation
    mIoU, computed over the whole split like ours so that the two columns compare training, not
    metric definitions (the seed averaged per-batch mIoU)."""
    criterion = torch.nn.CrossEntropyLoss(ignore_index=config.IGNORE_INDEX)

    def logits_of(images):  # extract_features = the backbone's four blocks concatenated (and counted)
        return model.forward_head(model.extract_features(images), images.shape[-2:])

    model.train()
    for images, masks in train_loader:
        images, masks = images.to(device), masks.to(device)
        loss = criterion(logits_of(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    confmat = ConfusionMatrix(NUM_CLASSES, config.IGNORE_INDEX)
    with torch.no_grad():
        for images, masks in valid_loader:
            images, masks = images.to(device), masks.to(device)
            logits = logits_of(images)
            criterion(logits, masks)
            confmat.update(masks, logits.argmax(1))
    return confmat.compute().miou


def bench_epochs(args: argparse.Namespace, device: torch.device, data_dir: Path, out_dir: Path) -> list[str]:
    """The same frozen run three ways (same seed, data and head initialisation): the article-style
    loop, train.py's default loop, and train.py with --train-views."""
    rows = [article_run(args, device, data_dir)]
    for views in (0, args.train_views):  # train.py by default; with --train-views (augmented views computed once)
        rows.append(cached_run(args, device, data_dir, out_dir, views))
    baseline, default = sum(rows[0][1]), sum(rows[1][1])
    lines = [
        f"| loop | s/epoch (epoch 1, later mean) | total {args.epochs} epochs | vs the article's | vs default "
        "| backbone passes | training-view cache | valid mIoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, times, miou, passes, size in rows:
        later = statistics.mean(times[1:]) if len(times) > 1 else times[0]
        lines.append(
            f"| {name} | {times[0]:.1f}, {later:.1f} | {sum(times):.1f} s | {baseline / sum(times):.2f}x | "
            f"{default / sum(times):.2f}x | {passes} | {size} | {miou:.4f} |"
        )
    return lines


def bench_loaders(args: argparse.Namespace, device: torch.device, data_dir: Path) -> tuple:
    """(training set, training loader, validation loader) of the benchmark data, as train.py builds them."""
    train_set, valid_set, _ = build_datasets(data_dir, tuple(args.imgsz), VOC, seed=0)
    pin = device.type == "cuda"
    return (
        train_set,
        make_loader(train_set, args.batch, shuffle=True, workers=args.workers, pin_memory=pin),
        make_loader(valid_set, args.batch, shuffle=False, workers=args.workers, pin_memory=pin),
    )


def article_run(args: argparse.Namespace, device: torch.device, data_dir: Path) -> tuple:
    """The reference article's loop: fp32, the backbone on every batch, per-batch mIoU."""
    model = build_model(args).to(device)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-4)
    _, train_loader, valid_loader = bench_loaders(args, device, data_dir)
    times, miou = [], float("nan")
    for _ in range(args.epochs):
        sync(device)
        start = time.perf_counter()
        miou = article_epoch(model, train_loader, valid_loader, optimizer, device)
        sync(device)
        times.append(time.perf_counter() - start)
    return "article's loop (fp32, no cache)", times, miou, model.backbone_images, "-"


def cached_run(args: argparse.Namespace, device: torch.device, data_dir: Path, out_dir: Path, views: int) -> tuple:
    """train.py's loop: cached validation features, and with `views` the training views computed once."""
    settings = LoopSettings(
        device, partial(SegmentationScoring, NUM_CLASSES, config.IGNORE_INDEX), select_precision(device, args.amp)
    )
    model = build_model(args).to(device)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-4)
    train_set, train_loader, valid_loader = bench_loaders(args, device, data_dir)
    valid_cache = FeatureCache("valid", 10**12, out_dir)
    train_cache = FeatureCache("train_views", 10**12, out_dir, views=views) if views else None
    generator, times = torch.Generator(), []
    for epoch in range(args.epochs):
        sync(device)
        start = time.perf_counter()
        if train_cache is not None and not train_cache.ready:
            dataset = ViewsDataset(train_set, range(len(train_set)), views)
            view_loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers)
            cache_features(train_cache, model, view_loader, settings)
        if not valid_cache.ready:
            cache_features(valid_cache, model, valid_loader, settings)
        set_epoch(train_loader, epoch)
        generator.manual_seed(epoch)
        train_one_epoch(model, train_loader, optimizer, settings, cache=train_cache, generator=generator)
        result = validate(model, valid_loader, settings, cache=valid_cache)
        sync(device)
        times.append(time.perf_counter() - start)
    size = format_bytes(train_cache.features.nbytes + train_cache.masks.nbytes) if train_cache is not None else "-"
    for cache in (valid_cache, train_cache):
        if cache is not None:
            cache.close()
    name = (
        f"ours, --train-views {views} (augmented views)"
        if views
        else "ours, default (train.py: cached validation features)"
    )
    return name, times, result.metrics["miou"], model.backbone_images, size


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of `fn()` over `repeats` runs after one warm-up run."""
    fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def bench_inference(args: argparse.Namespace, device: torch.device, out_dir: Path) -> list[str]:
    checkpoint = save_bench_checkpoint(args, out_dir / "bench_model.pth")
    predictor = Predictor.from_checkpoint(checkpoint, str(device), args.amp, InferenceMode(imgsz=tuple(args.imgsz)))
    width, height = args.imgsz
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    width, height = predictor.mode.imgsz  # rounded up to the backbone's patch size
    tensor = preprocess(image, (height, width), predictor.info["mean"], predictor.info["std"]).to(device)
    backbone = predictor.model.backbone

    def bare():
        with torch.inference_mode(), autocast(device, predictor.amp_dtype):
            backbone.get_intermediate_layers(tensor, n=predictor.model.out_indices, reshape=True)

    floor = timed(bare, args.repeats, device)
    ours = timed(lambda: predictor.predict(image), args.repeats, device)
    return [
        "| path | ms/image | ratio |",
        "|---|---|---|",
        f"| bare backbone forward (floor) | {floor:.1f} | 1.00x |",
        f"| predict (preprocess + forward + upsample + argmax) | {ours:.1f} | {ours / floor:.2f}x |",
    ]


PIPELINE_SETTINGS = (("1", "0"), ("8", "0"), ("8", "1"))  # (--batch, --workers)


def script_seconds(script: str, *argv: str) -> float:
    """Wall seconds of one run of a repository script, as a user starts it."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *argv], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed: {result.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started


def pipeline_inputs(args: argparse.Namespace, out_dir: Path) -> tuple[Path, Path, Path]:
    """(clip, image folder, its first 8 images): the given ones, else generated (768x576 frames)."""
    folder = Path(args.pipeline_images) if args.pipeline_images else None
    if folder is None:
        folder = make_dataset(out_dir / "pipeline", 0, 40, size=(500, 375), seed=1) / "valid_images"
    images = list_image_files(folder)
    few = out_dir / "pipeline_few"
    few.mkdir(exist_ok=True)
    for path in images[:8]:
        (few / path.name).symlink_to(path.resolve())
    video = Path(args.pipeline_video) if args.pipeline_video else out_dir / "pipeline.mp4"
    if not args.pipeline_video:
        frames = [cv2.resize(read_image(path), (768, 576)) for path in images]
        write_video(video, (frames[i % len(frames)] for i in range(64)), 10.0, (768, 576))
    return video, folder, few


def bench_pipeline(args: argparse.Namespace, device: torch.device, out_dir: Path) -> list[str]:
    model = args.pipeline_model or str(save_bench_checkpoint(args, out_dir / "bench_model.pth"))
    video, folder, few = pipeline_inputs(args, out_dir)
    predictor = Predictor.from_checkpoint(model, str(device), args.amp, InferenceMode(imgsz=tuple(args.imgsz)))
    capture, _ = open_video(video)
    frames = [predictor.prepare(frame).pixels for frame in read_frames(capture, 8)]
    capture.release()
    table = normalisation_table(predictor.info["mean"], predictor.info["std"])
    inputs = [normalise(torch.from_numpy(frame)[None], table).to(device) for frame in frames]
    backbone = predictor.model.backbone

    def bare():
        with torch.inference_mode(), autocast(device, predictor.amp_dtype):
            for tensor in inputs:
                backbone.get_intermediate_layers(tensor, n=predictor.model.out_indices, reshape=True)

    floor = len(inputs) / (timed(bare, args.repeats, device) / 1000)
    common = ("--model", model, "--imgsz", *map(str, args.imgsz), "--device", str(device), "--amp", args.amp)
    rows = [
        "| path | --batch | --workers | images/s | vs backbone |",
        "|---|---|---|---|---|",
        f"| bare backbone forward, batch 1 | | | {floor:.2f} | 1.00x |",
    ]
    count = len(list_image_files(folder))
    for batch, workers in PIPELINE_SETTINGS:
        flags = (*common, "--batch", batch, "--workers", workers, "--out-dir", str(out_dir / "pipeline_out"))
        clip = ("infer_video.py", "--input", str(video), *flags)
        rate = difference_rate(48, (*clip, "--max-frames", "56"), (*clip, "--max-frames", "8"), args.repeats)
        rows.append(f"| infer_video.py ({video.name}) | {batch} | {workers} | {rate} | {rate.ratio(floor)} |")
        long, short = (
            ("infer_image.py", "--input", str(folder), *flags),
            ("infer_image.py", "--input", str(few), *flags),
        )
        rate = difference_rate(count - 8, long, short, args.repeats)
        rows.append(f"| infer_image.py ({count} images) | {batch} | {workers} | {rate} | {rate.ratio(floor)} |")
    return rows


@dataclass
class Rates:
    """Images per second over repeated runs: the median, and the range in brackets."""

    values: list[float]

    def __str__(self) -> str:
        return f"{statistics.median(self.values):.2f} ({min(self.values):.2f}-{max(self.values):.2f})"

    def ratio(self, floor: float) -> str:
        return f"{statistics.median(self.values) / floor:.2f}x"


def difference_rate(images: int, long: tuple[str, ...], short: tuple[str, ...], repeats: int) -> Rates:
    """`images` over the extra time a run of `long` takes beyond `short` (start-up cancels), `repeats` pairs."""
    return Rates([images / (script_seconds(*long) - script_seconds(*short)) for _ in range(repeats)])


def bench_modes(args: argparse.Namespace, device: torch.device, out_dir: Path) -> list[str]:
    """ms/image of each inference mode on one 500x375 image (a typical VOC size), median of --repeats."""
    checkpoint = save_bench_checkpoint(args, out_dir / "bench_modes.pth")
    image = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    modes = [
        InferenceMode(imgsz=tuple(args.imgsz)),
        InferenceMode(native=True),
        InferenceMode("slide"),
        InferenceMode("slide", scales=(0.75, 1.0, 1.25), flip=True),
    ]
    lines = ["| mode | forwards | ms/image |", "|---|---|---|"]
    for mode in modes:
        predictor = Predictor.from_checkpoint(checkpoint, str(device), args.amp, mode)
        mode = predictor.mode  # with the backbone's window size
        forwards = sum(
            len(window_grid(*mode.pass_size(375, 500, scale), mode.crop, mode.stride)) if mode.mode == "slide" else 1
            for scale in mode.scales
        ) * (2 if mode.flip else 1)
        ms = timed(lambda: predictor.scores(image), args.repeats, device)
        lines.append(f"| {mode.describe()} | {forwards} | {ms:.0f} |")
    return lines


def memory_probe(args: argparse.Namespace, mode: str) -> dict[str, float]:
    """One training step at --batch x --imgsz in this (fresh) process; peak memory in MB."""
    device = select_device(args.device)
    amp_dtype = select_precision(device, args.amp)
    model = build_model(args, fine_tune=mode != "frozen").to(device)
    if mode == "fine-tune+checkpointing":
        model.set_grad_checkpointing()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    width, height = args.imgsz
    images = torch.randn(args.batch, 3, height, width, device=device)
    target = torch.randint(0, NUM_CLASSES, (args.batch, height, width), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for _ in range(2):  # the second step includes the optimizer state
        with autocast(device, amp_dtype):
            loss, _ = pixel_cross_entropy(model(images), target, config.IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        return {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak, "step_mb": peak - before}


def bench_memory(args: argparse.Namespace, device: torch.device) -> list[str]:
    lines = ["| step | peak memory |", "|---|---|"]
    for mode in ("frozen", "fine-tune", "fine-tune+checkpointing"):
        command = [
            sys.executable,
            __file__,
            "--memory-probe",
            mode,
            *backbone_argv(args),
            "--device",
            str(device),
            "--amp",
            args.amp,
            "--batch",
            str(args.batch),
            "--imgsz",
            *map(str, args.imgsz),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines.append(f"| {mode} | failed: {result.stderr.strip().splitlines()[-1]} |")
            continue
        probe = json.loads(result.stdout.strip().splitlines()[-1])
        what = "max_memory_allocated" if device.type == "cuda" else "process RSS"
        extra = f" (step adds {probe['step_mb']:.0f} MB)" if "step_mb" in probe else ""
        lines.append(f"| {mode} | {probe['peak_mb']:.0f} MB {what}{extra} |")
    return lines


def bench_classification(args: argparse.Namespace, device: torch.device, out_dir: Path) -> list[str]:
    """Extraction throughput (after one warm-up batch) and kNN time over many stored embeddings."""
    root = make_image_folders(out_dir / "folders", classes=4, n_train=args.cls_images // 4, n_val=0, size=(500, 375))
    files, _ = class_images(root / "train")
    torch.manual_seed(0)
    kwargs = backbone_kwargs(args)
    backbone = load_backbone(kwargs.pop("backbone"), **kwargs).to(device).eval()
    transform = ClassificationTransform(args.cls_imgsz)
    amp_dtype = select_precision(device, args.amp)
    with autocast(device, amp_dtype):
        extract(backbone, files[: args.batch * 4], transform, device=device, batch_size=args.batch * 4)
        sync(device)
        start = time.perf_counter()
        stored = extract(backbone, files, transform, device=device, batch_size=64, workers=args.workers)
        sync(device)
    seconds = time.perf_counter() - start
    dim = stored["cls"].shape[-1]
    g = torch.Generator().manual_seed(0)
    train, labels = (
        torch.randn(args.knn_stored, dim, generator=g),
        torch.randint(0, 21, (args.knn_stored,), generator=g),
    )
    queries = torch.randn(1000, dim, generator=g)
    knn_ms = timed(lambda: knn_votes(train, labels, queries, 20, 21), max(1, args.repeats // 2), torch.device("cpu"))
    return [
        "| step | figure |",
        "|---|---|",
        f"| embedding extraction, {len(files)} images (500x375 JPEG -> {args.cls_imgsz}^2), batch 64 | "
        f"{len(files) / seconds:.1f} images/s ({seconds:.1f} s) |",
        f"| kNN, k=20, 1000 queries over {args.knn_stored:,} stored {dim}-d embeddings (CPU, chunked) | "
        f"{knn_ms:.0f} ms ({knn_ms / 1000:.2f} ms per query) |",
    ]


def bench_export(args: argparse.Namespace, device: torch.device, out_dir: Path) -> list[str]:
    """Export the benchmark model with export.py (as a user would), then time each engine's predict
    path on one image and compare its predictions with PyTorch's on the agreement images."""
    checkpoint = save_bench_checkpoint(args, out_dir / "bench_export.pth")
    folder = (
        Path(args.agreement_images)
        if args.agreement_images
        else make_dataset(out_dir / "agreement", 1, 4, size=(500, 375), seed=1) / "valid_images"
    )
    images = [read_image(path) for path in list_image_files(folder)]
    mode = InferenceMode(imgsz=tuple(args.imgsz))
    eager = Predictor.from_checkpoint(checkpoint, str(device), args.amp, mode)
    reference = [eager.predict(image) for image in images]
    lines = ["| engine | file | export s | ms/image | speed-up | pixels as PyTorch's |", "|---|---|---|---|---|---|"]
    eager_ms = timed(lambda: eager.predict(images[0]), args.repeats, device)
    lines.append(f"| {eager.engine} | .pth | - | {eager_ms:.0f} | 1.00x | 100 % |")
    for precision in ("fp32", "int8", "fp16"):
        path = out_dir / f"bench_{precision}.onnx"
        started = time.perf_counter()
        flags = [] if precision == "fp32" else [f"--{precision}"]
        result = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).with_name("export.py")),
                "--model",
                str(checkpoint),
                "--out",
                str(path),
                "--check-images",
                str(folder),
                *flags,
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            lines.append(
                f"| onnxruntime {precision} | export failed: {result.stderr.strip().splitlines()[-1]} | | | | |"
            )
            continue
        seconds = time.perf_counter() - started
        predictor = Predictor.from_onnx(path, "cpu", mode)
        same = np.mean([(predictor.predict(image) == expected).mean() for image, expected in zip(images, reference)])
        ms = timed(lambda: predictor.predict(images[0]), args.repeats, torch.device("cpu"))
        lines.append(
            f"| {predictor.engine} | {format_bytes(path.stat().st_size)} | {seconds:.0f} | {ms:.0f} | "
            f"{eager_ms / ms:.2f}x | {100 * same:.2f} % |"
        )
    return lines + [f"\n({len(images)} agreement images from {folder}; export s includes its self-check)"]


def bench_backbones(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Section 6 (module docstring): each --compare backbone at --imgsz rounded to its patch size."""
    lines = [
        "| backbone | patch | input | tokens | params | frozen train step ms | forward ms/image | cache bytes/view |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [backbone_row(name, args, device) for name in args.compare]
    return lines + ["\n(random-init timm backbones: the timings do not depend on the weights' values)"]


def backbone_row(name: str, args: argparse.Namespace, device: torch.device) -> str:
    """One backbone's row of `bench_backbones`: a frozen training step, a batch-1 forward, a cached view's bytes."""
    amp_dtype = select_precision(device, args.amp)
    torch.manual_seed(0)
    model = segmentation_model(NUM_CLASSES, backbone=name, source="timm", pretrained=False).to(device)
    width, height = round_to_patch(args.imgsz, model.patch_size)
    images = torch.randn(args.batch, 3, height, width, device=device)
    target = torch.randint(0, NUM_CLASSES, (args.batch, height, width), device=device)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-5)

    def step():
        with autocast(device, amp_dtype):
            loss, _ = pixel_cross_entropy(model.train()(images), target, config.IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def forward():
        with torch.inference_mode(), autocast(device, amp_dtype):
            model.eval()(images[:1])

    step(), forward()  # warm-up
    train_ms, forward_ms = timed(step, args.repeats, device), timed(forward, args.repeats, device)
    channels, rows, cols = model.feature_shape(height, width)
    view = channels * rows * cols * (amp_dtype or torch.float32).itemsize + height * width
    params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
    return (
        f"| {model.spec.hub_name} | {model.patch_size} | {width}x{height} | {cols}x{rows} | {params:.0f}M "
        f"| {train_ms:.0f} | {forward_ms:.0f} | {format_bytes(view)} |"
    )


def bench_retrieval(args: argparse.Namespace) -> None:
    """Build, size, query latency and recall@10 of each index kind at each collection size, a row
    printed as each is measured (a million-vector build takes minutes)."""
    print("| stored | index | build (s) | size | ms/query (k=10) | recall@10 |\n|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    queries_count, dim = 100, 384
    for count in args.index_sizes:
        centres = rng.normal(size=(1000, dim)).astype(np.float32)
        vectors = normalised(centres[rng.integers(0, 1000, count)] + rng.normal(size=(count, dim)).astype(np.float32))
        queries = normalised(
            vectors[rng.choice(count, queries_count, replace=False)] + 0.1 * rng.normal(size=(queries_count, dim))
        )
        exact = None
        for kind in args.index_kinds:
            started = time.perf_counter()
            index = build_index(vectors, kind)
            built = time.perf_counter() - started
            started = time.perf_counter()
            _, found = index.search(queries, 10)
            per_query = 1000 * (time.perf_counter() - started) / queries_count
            if exact is None:
                _, exact = build_index(vectors, "exact").search(queries, 10) if kind != "exact" else (None, found)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.tolist(), found.tolist())])
            size = format_bytes(len(to_bytes(index)))
            print(f"| {count:,} | {kind} | {built:.1f} | {size} | {per_query:.2f} | {recall:.3f} |", flush=True)
            del index


def embed_rate(args: argparse.Namespace, images: Path, out: Path, launcher: list[str]) -> float:
    """Images/s of `retrieve.py embed` over `images`: the difference of a run over all and one over
    the first half (one shard each), so the start-up of the processes cancels."""
    files = sorted(images.rglob("*.jpg"))
    out.mkdir(parents=True)
    lists = {}
    for name, part in (("all", files), ("half", files[: len(files) // 2])):
        lists[name] = out / f"{name}.txt"
        lists[name].write_text("\n".join(map(str, part)))
    seconds = {}
    for name, listed in lists.items():
        started = time.perf_counter()
        command = [*launcher, str(Path(__file__).with_name("retrieve.py")), "embed", "--list", str(listed)]
        command += ["--out", str(out / f"emb_{name}"), "--imgsz", str(args.cls_imgsz), "--batch", "16"]
        command += ["--shard-size", str(max(1, len(files) // 4)), *backbone_argv(args), "--device", args.device]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"retrieve.py embed failed: {result.stderr.strip().splitlines()[-1:]}")
        seconds[name] = time.perf_counter() - started
    return (len(files) - len(files) // 2) / max(seconds["all"] - seconds["half"], 1e-9)


def bench_sharded_embed(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Embedding images/s with one process and with two under torchrun."""
    images = make_image_folders(tmp / "embed_images", 4, args.sharded_images // 4, 0, size=(320, 240))
    rows = ["| processes | images/s |", "|---|---|"]
    for processes in (1, 2):
        launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run"]
        launcher += [] if processes == 1 else ["--nproc-per-node", str(processes)]
        rate = embed_rate(args, images, tmp / f"embed_{processes}", launcher)
        rows.append(f"| {processes} | {rate:.1f} |")
    return rows


LIGHTLY_PRETRAIN = """
import sys, lightly_train
out, data, epochs, batch, prototypes, imgsz, local = sys.argv[1:]
lightly_train.train(
    out=out, data=data, model="dinov2/vits14-noreg-notpretrained", method="dinov2", epochs=int(epochs),
    batch_size=int(batch), accelerator="cpu", devices=1, num_workers=1, overwrite=True, seed=0, precision="32-true",
    method_args={"output_dim": int(prototypes), "center_method": "sinkhorn_knopp"},
    transform_args={"image_size": (int(imgsz), int(imgsz)),
                    "local_view": {"num_views": 2, "view_size": (int(local), int(local))}},
)
"""


def bench_pretrain(args: argparse.Namespace, tmp: Path) -> list[str]:
    """pretrain.py's images/s, and lightly-train's DINOv2 on the same images and settings."""
    images = (
        make_shape_folders(tmp / "pretrain_images", args.pretrain_images // 4, 0, size=args.pretrain_imgsz) / "train"
    )
    count = args.pretrain_images // 4 * 4
    local = local_crop_size(args.pretrain_imgsz, 14)
    ours = [
        sys.executable,
        str(config.ROOT / "pretrain.py"),
        "--images",
        str(images),
        "--backbone",
        "dinov2_vits14",
        "--source",
        "timm",
        "--no-pretrained",
        "--recipe",
        "small",
        "--imgsz",
        str(args.pretrain_imgsz),
        "--local-crops",
        "2",
        "--batch",
        str(args.pretrain_batch),
        "--prototypes",
        str(args.pretrain_prototypes),
        "--ibot-prototypes",
        str(args.pretrain_prototypes),
        "--head-hidden",
        "2048",
        "--workers",
        "1",
        "--exist-ok",
    ]
    steps = count // args.pretrain_batch
    rows = ["| implementation | images/s | seconds per epoch |", "|---|---|---|"]
    seconds = epoch_seconds(lambda epochs: [*ours, "--epochs", str(epochs), "--out-dir", str(tmp / f"ours_{epochs}")])
    rows.append(f"| pretrain.py | {steps * args.pretrain_batch / seconds:.1f} | {seconds:.1f} |")
    if args.lightly_python:

        def lightly(epochs: int) -> list[str]:
            return [
                args.lightly_python,
                "-c",
                LIGHTLY_PRETRAIN,
                str(tmp / f"lightly_{epochs}"),
                str(images),
                str(epochs),
                str(args.pretrain_batch),
                str(args.pretrain_prototypes),
                str(args.pretrain_imgsz),
                str(local),
            ]

        try:
            seconds = epoch_seconds(lightly)
            rows.append(
                f"| lightly-train {lightly_version(args.lightly_python)} (DINOv2) | "
                f"{steps * args.pretrain_batch / seconds:.1f} | {seconds:.1f} |"
            )
        except subprocess.CalledProcessError as err:
            rows.append(f"| lightly-train | failed: {(err.stderr or '').strip().splitlines()[-1:]} | |")
    return rows


def epoch_seconds(command) -> float:
    """Seconds one epoch adds: a 2-epoch run's time less a 1-epoch run's (start-up cancels)."""
    times = []
    for epochs in (1, 2):
        started = time.perf_counter()
        subprocess.run(command(epochs), check=True, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
    return times[1] - times[0]


def lightly_version(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import lightly_train; print(lightly_train.__version__)"], capture_output=True, text=True
    ).stdout.strip()


AUTOFAISS_BUILD = """
import json, sys, time
from autofaiss import build_index
started = time.perf_counter()
build_index(embeddings=sys.argv[1], index_path=sys.argv[2], index_infos_path=sys.argv[3], metric_type="ip",
            max_index_memory_usage=sys.argv[4], current_memory_available="4G", verbose=30)
status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]  # maxrss would count the parent's
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss": int(status) * 1024}))
"""


def bench_sharded_builds(args: argparse.Namespace, tmp: Path) -> None:
    """retrieve.py build per kind and size (and autofaiss beside it), a row printed as each ends."""
    print(
        "| vectors | builder | --max-memory | index | size | build (s) | peak RSS | recall@10 | ms/query "
        f"| HTTP ({SERVE_CLIENTS} clients): queries/s, p95 ms |\n|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    key = {"format": 1, "backbone": {"backbone": "generated"}, "imgsz": 0, "features": "clustered", "scales": [1.0]}
    measured: dict[str, dict] = {}  # kind -> its report at the largest count
    for count in args.sharded_sizes:
        folder = tmp / f"vectors_{count}"
        embeddings = write_vector_shards(folder, clustered_unit_vectors(count, 384), key, shard_size=100_000)
        options = {}
        for choice in candidates(count, 384):
            options.setdefault(choice.kind, choice)  # the first (largest, best recall) of each kind
        for kind in [k for k in args.sharded_kinds if k in options]:
            budget = args.sharded_budget or math.ceil(options[kind].bytes * 1.02 / 10**6) * 10**6
            index = tmp / f"index_{count}_{kind}"
            seconds = script_seconds("retrieve.py", "build", "--embeddings", str(folder), "--index", str(index),
                                     "--max-memory", str(budget), "--kind", kind)  # fmt: skip
            report = json.loads((index / "index.json").read_text())
            measured[kind] = {**report, "cells": options[kind].cells}
            print(
                f"| {count:,} | retrieve.py | {format_bytes(budget)} | {report['factory']} "
                f"{report['parameter'] or ''} {report['value'] or ''} | {format_bytes(report['index_bytes'])} "
                f"| {report['build_seconds']:.0f} ({report['train_seconds']:.0f} training; {seconds:.0f} with tuning) "
                f"| {format_bytes(report['peak_rss_bytes'])} ({format_bytes(report['start_rss_bytes'])} before) "
                f"| {report['recall']:.3f} | {report['query_ms']:.3f} | {serve_load(index, embeddings)} |",
                flush=True,
            )
            shutil.rmtree(index)
            if args.autofaiss_python and kind == "ivf-sq8":
                print(autofaiss_row(args, embeddings, budget, tmp / f"autofaiss_{count}"), flush=True)
        shutil.rmtree(folder)
    print("\n" + "\n".join(on_paper(measured)), flush=True)


def on_paper(measured: dict[str, dict]) -> list[str]:
    """10^8 and 10^9 vectors, extrapolated from each kind's largest measured build: the index the
    planner would build, its estimated size, filling time linear in N (the HNSW coarse quantizer
    keeps a vector's assignment cost nearly flat as cells grow), training time as cells² (k-means on
    64 points a cell against every centroid). Estimates, not measurements."""
    rows = ["| vectors | index (planned) | size (estimate) | training (estimate) | filling (estimate) |",
            "|---|---|---|---|---|"]  # fmt: skip
    for count in (10**8, 10**9):
        for kind, report in measured.items():
            planned = next((c for c in candidates(count, 384) if c.kind == kind), None)
            if planned is None:
                rows.append(f"| {count:.0e} | {kind}: not built at this size | | | |")
                continue
            fill = (report["build_seconds"] - report["train_seconds"]) * count / report["vectors"]
            train = report["train_seconds"] * (planned.cells / report["cells"]) ** 2 if report["cells"] else 0
            trained = f"{train / 3600:.1f} h"
            if kind == "opq-ivf-pq":  # the rotation dominates and trains on at most 65,536 vectors at any N
                trained = "not extrapolated (the rotation's training does not grow with N)"
            rows.append(
                f"| {count:.0e} | {planned.factory} | {format_bytes(planned.bytes)} | {trained} | {fill / 3600:.1f} h |"
            )
    return rows


SERVE_CLIENTS, SERVE_REQUESTS = 8, 400


def serve_load(index: Path, embeddings) -> str:
    """`retrieve.py serve --vectors-only` on `index`, SERVE_CLIENTS threads posting SERVE_REQUESTS
    stored vectors (k = 10, a new connection each): queries/s and the 95th-percentile latency."""
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("retrieve.py")), "serve", "--index", str(index), "--port", "0",
         "--vectors-only"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        if " at http://" not in line:
            return f"server failed: {server.stderr.read().strip().splitlines()[-1:]}"
        url = line.split(" at ")[1].split()[0] + "/search"
        queries = embeddings.rows_at(sample_ids(embeddings.count, SERVE_REQUESTS, 2))
        latencies: list[float] = []

        def client(rows: range) -> None:
            for row in rows:
                body = json.dumps({"vector": queries[row].tolist(), "k": 10}).encode()
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                started = time.perf_counter()
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                latencies.append(time.perf_counter() - started)

        threads = [
            threading.Thread(target=client, args=(range(i, len(queries), SERVE_CLIENTS),)) for i in range(SERVE_CLIENTS)
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        return f"{len(latencies) / elapsed:.0f}, {1000 * np.percentile(latencies, 95):.1f}"
    finally:
        server.terminate()
        server.wait(timeout=60)


def autofaiss_row(args: argparse.Namespace, embeddings, budget: int, out: Path) -> str:
    """autofaiss on the same shards (it reads every .npy of the folder) and budget, scored here."""
    out.mkdir()
    try:
        result = subprocess.run(
            [args.autofaiss_python, "-c", AUTOFAISS_BUILD, str(embeddings.folders[0]), str(out / "knn.index"),
             str(out / "infos.json"), f"{budget // 10**6}MB"],
            capture_output=True, text=True, timeout=args.autofaiss_timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        shutil.rmtree(out)
        return f"| {embeddings.count:,} | autofaiss | {format_bytes(budget)} | not done in {args.autofaiss_timeout} s |"
    if result.returncode != 0:
        return f"| {embeddings.count:,} | autofaiss | failed: {result.stderr.strip().splitlines()[-1:]} |"
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    index = faiss_module().read_index(str(out / "knn.index"))
    own = sample_ids(embeddings.count, RECALL_QUERIES, 1)  # the queries retrieve.py build scored with
    queries = embeddings.rows_at(own)
    truth = exact_neighbours(embeddings, queries, own, RECALL_K)
    found, ms = timed_search(index, queries)
    infos = json.loads((out / "infos.json").read_text())
    size = (out / "knn.index").stat().st_size
    shutil.rmtree(out)
    return (
        f"| {embeddings.count:,} | autofaiss | {format_bytes(budget)} | {infos.get('index_key')} "
        f"{infos.get('index_param', '')} | {format_bytes(size)} | {measured['seconds']:.0f} "
        f"| {format_bytes(measured['peak_rss'])} | {recall_at(found, truth, own, RECALL_K):.3f} | {ms:.3f} |"
    )


COPIES = {
    "resized to 50 %": lambda image: cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), cv2.INTER_AREA),
    "JPEG quality 50": lambda image: cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 50])[1], 1),
    "centre crop 90 %": lambda image: image[
        image.shape[0] // 20 : -image.shape[0] // 20, image.shape[1] // 20 : -image.shape[1] // 20
    ],
}


def bench_duplicates(args: argparse.Namespace, device: torch.device, out_dir: Path) -> list[str]:
    """Similarities of photos to their own copies and to each other, for each retrieve.py descriptor
    (at 224, classify.py's crop), and the threshold that separates copies from other photos."""
    photos = collect_images([args.photos])
    copies = []
    for number, path in enumerate(photos):
        image = cv2.imread(str(path))
        for kind, make in enumerate(COPIES.values()):
            copies.append(out_dir / f"copy_{number}_{kind}.png")
            cv2.imwrite(str(copies[-1]), make(image))
    rows = [f"{len(photos)} photos from {args.photos}, cosine similarity:", ""]
    rows += ["| descriptor | pair | min | median | max |", "|---|---|---|---|---|"]
    verdicts = []
    for features in DESCRIPTORS:
        key = {"backbone": backbone_identity(args), "imgsz": 224, "crop_pct": 0.875, "features": features}
        vectors, _, _ = embed_files({**key, "scales": [1.0]}, photos + copies, device=device, batch=16)
        originals, copied = vectors[: len(photos)], vectors[len(photos) :].reshape(len(photos), len(COPIES), -1)
        own = np.einsum("nd,nkd->nk", originals, copied)
        others = (originals @ originals.T)[~np.eye(len(photos), dtype=bool)]
        for column, name in enumerate(COPIES):
            values = own[:, column]
            rows.append(
                f"| {features} | its copy {name} | {values.min():.4f} | {np.median(values):.4f} | {values.max():.4f} |"
            )
        rows.append(
            f"| {features} | another photo | {others.min():.4f} | {np.median(others):.4f} | {others.max():.4f} |"
        )
        verdicts.append(
            f"{features}: any threshold in ({others.max():.4f}, {own.min():.4f}] separates every copy from "
            "every other photo"
            if own.min() > others.max()
            else f"{features}: no threshold separates them: {int((own <= others.max()).sum())} of {own.size} copies "
            f"score at or below the most similar pair of different photos ({others.max():.4f})"
        )
    return rows + [""] + verdicts


def bench_eomt(args: argparse.Namespace, device: torch.device, side: int) -> list[str]:
    """Ours against transformers' EoMT of the same architecture, and against the bare backbone."""
    try:
        import transformers
    except ImportError:
        return ["(transformers is not installed: pip install -r requirements-dev.txt)"]
    from dinokit.tasks.panoptic.coco import LABEL_DIVISOR
    from dinokit.tasks.panoptic.eomt import EomtModel
    from dinokit.tasks.panoptic.loss import MaskClassificationLoss, target_segments

    classes, queries = 5, args.eomt_queries
    ours = EomtModel(classes, queries=queries, registers=True, source="timm", pretrained=False, fine_tune=True)
    ours = ours.to(device)
    config = transformers.EomtConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        image_size=side,
        patch_size=14,
        num_upscale_blocks=1,
        num_queries=queries,
        num_labels=classes,
    )
    theirs = transformers.EomtForUniversalSegmentation(config).to(device)
    images = torch.randn(args.batch, 3, side, side, device=device)
    target = torch.full((args.batch, side, side), 3 * LABEL_DIVISOR, dtype=torch.int32, device=device)
    target[:, : side // 2, : side // 2] = 1  # a disc
    target[:, side // 2 :, side // 2 :] = 1 * LABEL_DIVISOR + 1  # a square
    loss = MaskClassificationLoss(classes, [True, True, True, False, False])
    segments = [target_segments(t, torch.tensor([True, True, True, False, False], device=device)) for t in target]
    mask_labels = [s.masks for s in segments]
    class_labels = [s.classes for s in segments]

    def our_step() -> None:
        ours.zero_grad(set_to_none=True)
        loss(ours(images), target)[0].backward()

    def their_step() -> None:
        theirs.zero_grad(set_to_none=True)
        theirs(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels).loss.backward()

    ours.train(), theirs.train()
    rows = ["| | ours | transformers | ratio |", "|---|---:|---:|---:|"]
    ours_ms, theirs_ms = timed(our_step, args.repeats, device), timed(their_step, args.repeats, device)
    rows.append(
        f"| training step, batch {args.batch} (ms) | {ours_ms:.0f} | {theirs_ms:.0f} | {ours_ms / theirs_ms:.2f} |"
    )
    ours.eval(), theirs.eval()
    ours.attn_mask_probs.zero_(), theirs.attn_mask_probs.zero_()  # after training: plain forward
    one = images[:1]
    with torch.inference_mode():
        ours_ms = timed(lambda: ours(one), args.repeats, device)
        theirs_ms = timed(lambda: theirs(pixel_values=one), args.repeats, device)
        bare_ms = timed(lambda: ours.backbone.get_intermediate_layers(one, n=[11]), args.repeats, device)
    rows.append(f"| inference forward, batch 1 (ms) | {ours_ms:.0f} | {theirs_ms:.0f} | {ours_ms / theirs_ms:.2f} |")
    rows.append(f"| bare backbone forward, batch 1 (ms) | {bare_ms:.0f} | | EoMT / bare {ours_ms / bare_ms:.2f} |")
    return rows


def bench_eomt_shapes(args: argparse.Namespace, device: torch.device, out_dir: Path) -> list[str]:
    """transformers' EoMT trained on the shapes set as ours is, scored as ours is."""
    import transformers

    from datasets import PairedDataset
    from dinokit.data.augmentations import train_transform
    from dinokit.data.synthetic import make_panoptic_dataset
    from dinokit.tasks.panoptic.coco import VOID, CocoReader, TruthReader, find_split, read_split
    from dinokit.tasks.panoptic.eomt import QueryOutputs, anneal_spans, mask_probability
    from dinokit.tasks.panoptic.loss import target_segments
    from dinokit.tasks.panoptic.predictions import predict_objects
    from dinokit.tasks.panoptic.scoring import ObjectScores

    root = make_panoptic_dataset(out_dir / "shapes", 24, 8, (160, 120), seed=0)
    splits = {s: read_split(find_split(root, s, ["panoptic"])) for s in ("train", "valid")}
    categories = splits["train"][0]
    isthing = torch.tensor(categories.isthing)
    side = 256
    hf_config = transformers.EomtConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        image_size=side,
        patch_size=16,
        num_queries=args.eomt_queries,
        num_labels=len(categories.names),
    )
    torch.manual_seed(args.seed)
    model = transformers.EomtForUniversalSegmentation(hf_config).to(device)
    records = splits["train"][1]
    pairs = [(r.image, r.image) for r in records]
    data = PairedDataset(
        pairs,
        CocoReader(records, categories),
        train_transform("article", (side, side), VOID),
        target_dtype=np.int32,
        seed=args.seed,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.eomt_lr)
    total, step, started = args.eomt_epochs * len(loader), 0, time.perf_counter()
    spans = anneal_spans(hf_config.num_blocks)
    for epoch in range(args.eomt_epochs):
        data.epoch = epoch
        model.train()
        for images, targets in loader:
            segments = [target_segments(t, isthing) for t in targets]
            outputs = model(
                pixel_values=images.to(device),
                mask_labels=[s.masks.to(device) for s in segments],
                class_labels=[s.classes.to(device) for s in segments],
            )
            optimizer.zero_grad(set_to_none=True)
            outputs.loss.backward()
            optimizer.step()
            step += 1
            for index, (start, end) in enumerate(spans):
                model.attn_mask_probs[index] = mask_probability(step, round(start * total), round(end * total))
    minutes = (time.perf_counter() - started) / 60
    model.eval()
    rows = ["| split | PQ | PQ things | PQ stuff | mask AP | mIoU |", "|---|---:|---:|---:|---:|---:|"]
    for split, (_, split_records) in splits.items():
        scores = ObjectScores(list(categories.names), list(categories.isthing))
        reader = TruthReader(split_records, categories)
        for record in split_records:
            image, truth = reader(record.image, record.image)
            pixels = preprocess(image, (side, side), config.MEAN, config.STD).to(device)
            with torch.inference_mode():
                out = model(pixel_values=pixels)
            queries = QueryOutputs(out.masks_queries_logits, out.class_queries_logits, (), (side, side), (side, side))
            masks = queries.image_masks(image.shape[:2])[0]
            prediction = predict_objects(masks, out.class_queries_logits[0], list(categories.isthing))
            scores.update(truth.target, prediction, truth.instances, truth.image_id)
        result = scores.result()
        rows.append(
            f"| {split} | {result.pq:.3f} | {result.pq_things:.3f} | {result.pq_stuff:.3f} | {result.mask_ap:.3f} "
            f"| {result.miou:.3f} |"
        )
    return rows + [f"({total} steps in {minutes:.1f} min)"]


def print_summary(args: argparse.Namespace) -> None:
    """The model's layers, shapes and parameter counts (torchinfo), trainable or frozen."""
    from torchinfo import summary

    width, height = args.imgsz
    summary(
        build_model(args).eval(),
        input_size=(1, 3, height, width),
        depth=2,
        col_names=("input_size", "output_size", "num_params", "trainable"),
    )


def main(args: argparse.Namespace) -> None:
    if args.summary:
        return print_summary(args)
    if args.memory_probe:
        print(json.dumps(memory_probe(args, args.memory_probe)))
        return
    device = select_device(args.device)
    amp_dtype = select_precision(device, args.amp)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# bench: {args.backbone} ({args.source}, "
        f"{'weights ' + args.weights if args.weights else 'random init'}), "
        f"{args.imgsz[0]}x{args.imgsz[1]}, batch {args.batch}, {name}, "
        f"precision {str(amp_dtype).removeprefix('torch.') if amp_dtype else 'fp32'}, torch {torch.__version__}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "epochs" not in args.skip:
            data_dir = make_dataset(tmp / "data", args.train_images, args.valid_images, size=(500, 375), seed=0)
            print(
                f"## Frozen backbone, {args.train_images} train + {args.valid_images} valid images, "
                f"{args.epochs} epochs\n"
            )
            print("\n".join(bench_epochs(args, device, data_dir, tmp)) + "\n", flush=True)
        if "inference" not in args.skip:
            print(f"## Inference at {args.imgsz[0]}x{args.imgsz[1]} (median of {args.repeats})\n")
            print("\n".join(bench_inference(args, device, tmp)) + "\n", flush=True)
        if "modes" not in args.skip:
            print(f"## Inference modes on a 500x375 image (median of {args.repeats})\n")
            print("\n".join(bench_modes(args, device, tmp)) + "\n", flush=True)
        if "memory" not in args.skip:
            print(f"## Peak memory of a training step, batch {args.batch}\n")
            print("\n".join(bench_memory(args, device)) + "\n", flush=True)
        if "classification" not in args.skip:
            print("## Classification embeddings (classify.py)\n")
            print("\n".join(bench_classification(args, device, tmp)) + "\n", flush=True)
        if "export" not in args.skip:
            print(
                f"## Export: PyTorch against onnxruntime at {args.imgsz[0]}x{args.imgsz[1]} "
                f"(median of {args.repeats})\n"
            )
            print("\n".join(bench_export(args, device, tmp)) + "\n", flush=True)
        if "backbones" not in args.skip:
            print(f"## Backbones side by side at {args.imgsz[0]}x{args.imgsz[1]} (median of {args.repeats})\n")
            print("\n".join(bench_backbones(args, device)) + "\n")
        if args.photos:
            print("## Near-duplicate threshold: photos against their copies and each other\n")
            print("\n".join(bench_duplicates(args, device, tmp)) + "\n")
        if args.pipeline:
            print(f"## End to end: infer_video.py and infer_image.py at {args.imgsz[0]}x{args.imgsz[1]}\n")
            print("\n".join(bench_pipeline(args, device, tmp)) + "\n", flush=True)
        if "eomt" not in args.skip:
            side = round_to_patch((args.imgsz[0], args.imgsz[0]), 14)[0]
            print(
                f"## EoMT against transformers' EomtForUniversalSegmentation at {side}x{side} "
                f"(median of {args.repeats})\n"
            )
            print("\n".join(bench_eomt(args, device, side)) + "\n", flush=True)
        if args.eomt_shapes:
            print(f"## transformers' EoMT trained on the shapes set, {args.eomt_epochs} epochs at 256x256\n")
            print("\n".join(bench_eomt_shapes(args, device, tmp)) + "\n", flush=True)
        if "retrieval" not in args.skip:
            print("## Retrieval indexes (retrieve.py), 384-d embeddings, 100 queries\n")
            bench_retrieval(args)
        if args.sharded:
            print(f"## Sharded embedding: retrieve.py embed, {args.sharded_images} images at {args.cls_imgsz}\n")
            print("\n".join(bench_sharded_embed(args, tmp)) + "\n", flush=True)
            print("## Index builds from shards: retrieve.py build (recall target 0.9)\n")
            bench_sharded_builds(args, tmp)
        if args.pretrain:
            print(
                f"## Pretraining: DINOv2 self-distillation of a random-init ViT-S/14, {args.pretrain_images} images, "
                f"{args.pretrain_imgsz} px, batch {args.pretrain_batch}, {args.pretrain_prototypes} prototypes\n"
            )
            print("\n".join(bench_pretrain(args, tmp)) + "\n", flush=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
