"""torchrun + DDP on CPU (gloo): exact metrics over the whole split, rank-0-only outputs, resume, failures."""
import json
import os
import subprocess
import sys

import cv2
import pytest
import torch

from datasets import ShardSampler, build_datasets, load_dataset_spec, make_loader
from engine import validate
from make_sample_data import make_dataset
from tests.conftest import ROOT
from utils import build_model_from_checkpoint, load_checkpoint

FLAGS = ("--imgsz", "56", "42", "--batch", "2", "--lr", "1e-3", "--source", "timm", "--no-pretrained", "--workers", "0")


def torchrun(*args, processes=2, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                           str(ROOT / "train.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def uneven_dataset(tmp_path_factory):
    """7 validation images: 4 on rank 0, 3 on rank 1."""
    return make_dataset(tmp_path_factory.mktemp("ddp"), n_train=6, n_valid=7, size=(70, 56), seed=4)


@pytest.fixture(scope="module")
def two_process_run(uneven_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_run")
    result = torchrun("--data-dir", uneven_dataset, "--out-dir", out, "--epochs", "2", *FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.parametrize("size, world", [(7, 2), (7, 3), (2, 4), (10, 1)])
def test_shards_cover_every_sample_exactly_once(size, world):
    shards = [list(ShardSampler(size, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))


def test_two_processes_report_what_one_process_measures(two_process_run, uneven_dataset):
    out, _ = two_process_run
    report = json.loads((out / "test_metrics.json").read_text())
    assert report["processes"] == 2
    model = build_model_from_checkpoint(load_checkpoint(out / report["checkpoint"]))
    _, valid_set = build_datasets(uneven_dataset, (56, 42), load_dataset_spec(uneven_dataset))
    single = validate(model, make_loader(valid_set, 2, False, 0, 0), torch.device("cpu"), 21)
    assert report["miou"] == pytest.approx(single.miou, abs=1e-12)  # same confusion matrix, no double counting
    assert report["pixel_accuracy"] == pytest.approx(single.pixel_accuracy, abs=1e-12)
    assert report["loss"] == pytest.approx(single.loss, rel=1e-6)  # fp32 per-batch sums, other batch groupings
    assert list(report["iou"].values()) == pytest.approx(single.iou, nan_ok=True)


def test_only_rank_zero_prints_and_writes(two_process_run):
    out, result = two_process_run
    assert result.stdout.count("EPOCH: 1/2") == 1
    assert "2 processes x batch 2 = global batch 4 per step (gloo)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "best_model_iou.pth", "best_model_loss.pth", "final_model.pth", "last.pth", "metrics.csv",
        "loss.png", "accuracy.png", "miou.png", "test_metrics.json"])


def test_all_ranks_resume_from_the_same_checkpoint(two_process_run, uneven_dataset, tmp_path):
    out, _ = two_process_run
    result = torchrun("--data-dir", uneven_dataset, "--out-dir", tmp_path, "--epochs", "3", "--resume", out / "last.pth", *FLAGS)
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
