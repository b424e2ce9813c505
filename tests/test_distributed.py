"""torchrun + DDP on CPU (gloo): exact metrics over the whole split, rank-0-only outputs, resume, failures."""

import json
import math
import os
import socket
import subprocess
import sys
from functools import partial

import cv2
import pytest
import torch

from checkpoint import build_model_from_checkpoint, load_checkpoint
from datasets import ShardSampler, build_datasets, find_pairs, make_loader
from dinokit.data.labels import load_dataset_spec
from dinokit.data.synthetic import make_dataset
from dinokit.tasks.segmentation.scoring import SegmentationScoring
from engine import LoopSettings, validate
from evaluation import evaluate_pairs
from inference import Predictor
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # every test starts torchrun processes

FLAGS = ("--imgsz", "56", "42", "--batch", "2", "--lr", "1e-3", "--source", "timm", "--no-pretrained", "--workers", "0")


def torchrun(*args, processes=2, timeout=600):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            str(ROOT / "train.py"),
            *map(str, args),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def uneven_dataset(tmp_path_factory):
    """7 validation images: 4 on rank 0, 3 on rank 1."""
    return make_dataset(tmp_path_factory.mktemp("ddp"), n_train=6, n_valid=7, size=(70, 56), seed=4)


@pytest.fixture(scope="module")
def two_process_run(uneven_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_run")
    result = torchrun("--data-dir", uneven_dataset, "--out-dir", out, "--epochs", "2", "--tensorboard", *FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.parametrize("size, world", [(7, 2), (7, 3), (2, 4), (10, 1)])
def test_shards_cover_every_sample_exactly_once(size, world):
    shards = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))


def test_two_processes_report_what_one_process_measures(two_process_run, uneven_dataset):
    out, _ = two_process_run
    report = json.loads((out / "best_validation.json").read_text())
    assert report["processes"] == 2
    checkpoint = load_checkpoint(out / report["checkpoint"])
    predictor = Predictor(build_model_from_checkpoint(checkpoint), checkpoint["model_info"], device=torch.device("cpu"))
    single = evaluate_pairs(predictor, find_pairs(uneven_dataset, "valid")).result.scores
    # The final validation at original resolution: the same confusion matrix, nothing counted twice.
    assert report["miou"] == pytest.approx(single.miou, abs=1e-12)
    assert report["pixel_accuracy"] == pytest.approx(single.pixel_accuracy, abs=1e-12)
    # JSON has no NaN: a class absent from the split is null
    assert [math.nan if v is None else v for v in report["iou"].values()] == pytest.approx(single.iou, nan_ok=True)
    # The per-epoch validation (training size, DDP loop) recorded in the checkpoint: the same too.
    _, valid_set, _ = build_datasets(uneven_dataset, (56, 42), load_dataset_spec(uneven_dataset))
    epoch = validate(
        predictor.model,
        make_loader(valid_set, 2, shuffle=False),
        LoopSettings(torch.device("cpu"), partial(SegmentationScoring, 21, 255)),
    )
    assert checkpoint["metrics"]["valid_miou"] == pytest.approx(epoch.metrics["miou"], abs=1e-12)
    assert checkpoint["metrics"]["valid_loss"] == pytest.approx(epoch.loss, rel=1e-6)  # fp32 sums, other groupings


def test_only_rank_zero_prints_and_writes(two_process_run):
    out, result = two_process_run
    assert result.stdout.count("EPOCH: 1/2") == 1
    assert "2 processes x batch 2 = global batch 4 per step (gloo)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "best_model_iou.pth",
            "best_model_loss.pth",
            "final_model.pth",
            "last.pth",
            "metrics.csv",
            "loss.png",
            "accuracy.png",
            "miou.png",
            "best_validation.json",
            "tensorboard",
        ]
    )
    events = list((out / "tensorboard").iterdir())  # one writer: rank 0's
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents.")


def test_all_ranks_resume_from_the_same_checkpoint(two_process_run, uneven_dataset, tmp_path):
    out, _ = two_process_run
    result = torchrun(
        "--data-dir", uneven_dataset, "--out-dir", tmp_path, "--epochs", "3", "--resume", out / "last.pth", *FLAGS
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stdout and result.stdout.count("EPOCH: 3/3") == 1
    assert len((tmp_path / "metrics.csv").read_text().strip().splitlines()) == 1 + 3


def test_a_failing_rank_ends_the_job_with_its_message(uneven_dataset, tmp_path):
    bad = tmp_path / "data"
    make_dataset(bad, n_train=6, n_valid=7, size=(70, 56), seed=4)
    mask_path = bad / "valid_labels" / "valid_0001.png"  # validation index 1: rank 1's share only
    mask = cv2.imread(str(mask_path))
    mask[:2, :3] = (3, 2, 1)
    cv2.imwrite(str(mask_path), mask)
    result = torchrun("--data-dir", bad, "--out-dir", tmp_path / "out", "--epochs", "1", *FLAGS, timeout=300)
    assert result.returncode != 0
    assert "error (rank 1): " in result.stderr and "valid_0001.png: colours not in the class palette" in result.stderr


RANK_ONE_FAILS = """
import sys, argparse, torch
sys.path.insert(0, sys.argv[1])
from cli import run_cli
from utils import all_reduce_sum, init_distributed, rank

def main(args):
    init_distributed("cpu", 0.5)
    if rank() == 1:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    all_reduce_sum(torch.ones(3))  # rank 0 waits here for a peer that is gone

sys.argv = sys.argv[:1]
run_cli(main, argparse.ArgumentParser())
"""


def test_each_rank_reports_its_own_error(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(RANK_ONE_FAILS)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert "error (rank 1): CUDA out of memory. Tried to allocate 2.00 GiB (simulated)" in result.stderr
    assert (
        "error (rank 0): a collective operation failed, most likely because another process failed first"
        in result.stderr
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_without_a_shared_filesystem(uneven_dataset, tmp_path):
    """Two torchrun "nodes" whose run folders are different directories, as on two machines: only
    rank 0 writes checkpoints, so the final evaluation must not need to read them on rank 1."""
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(ROOT / "train.py"),
                "--data-dir",
                str(uneven_dataset),
                "--out-dir",
                str(tmp_path / f"node{node}"),
                "--epochs",
                "1",
                *FLAGS,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for node in (0, 1)
    ]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, results):
        assert node.returncode == 0, stderr[-3000:]
    assert json.loads((tmp_path / "node0" / "best_validation.json").read_text())["processes"] == 2
    assert not (tmp_path / "node1").exists()  # nothing was written on the second machine


def test_training_views_under_torchrun_cache_each_ranks_own_shard(uneven_dataset, tmp_path):
    # 6 training images: 3 per rank, 2 views each; 7 validation images shared 4 + 3
    result = torchrun(
        "--data-dir", uneven_dataset, "--out-dir", tmp_path, "--epochs", "2", "--train-views", "2", *FLAGS
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on this process's 3 images" in result.stdout
    assert "Backbone passes: 19 images (2 processes)" in result.stdout
    assert not list(tmp_path.glob("train_views*"))
