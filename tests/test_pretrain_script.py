"""pretrain.py as users run it: the files it writes and that the other scripts read them, an exact
resume after kill -9, distillation, and one line for each bad input."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dinokit.backbones.loading import load_backbone
from dinokit.backbones.meta_layout import meta_state
from dinokit.data.synthetic import make_shape_folders

from .conftest import OFFLINE, ROOT, one_line_error, run_script, train_cli

TINY = (
    "--backbone",
    "dinov2_vits14",
    "--source",
    "timm",
    "--no-pretrained",
    "--recipe",
    "small",
    "--imgsz",
    "28",
    "--batch",
    "4",
    "--local-crops",
    "2",
    "--prototypes",
    "16",
    "--ibot-prototypes",
    "16",
    "--head-hidden",
    "32",
    "--workers",
    "0",
    "--seed",
    "3",
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """4 shapes x (5 train + 2 val) images of 40 px in classify.py's layout."""
    return make_shape_folders(tmp_path_factory.mktemp("shapes"), per_class=5, val_per_class=2, size=40)


@pytest.fixture(scope="module")
def pretrained(images, tmp_path_factory):
    """A 2-epoch pretraining run with the kNN monitor: (run folder, stdout)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    result = run_script(
        "pretrain.py",
        "--images",
        images / "train",
        *TINY,
        "--epochs",
        "2",
        "--out-dir",
        out,
        "--monitor",
        images,
        "--tensorboard",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.slow
def test_a_run_writes_meta_layout_backbones_its_checkpoint_and_curves(pretrained):
    out, stdout = pretrained
    assert {"backbone.pth", "student.pth", "last.pth", "metrics.csv", "loss.png", "knn.png", "tensorboard"} <= {
        p.name for p in out.iterdir()
    }
    teacher = load_backbone("dinov2_vits14", source="timm", weights=out / "backbone.pth")
    student = load_backbone("dinov2_vits14", source="timm", weights=out / "student.pth")
    assert not torch.equal(teacher.vit.blocks[0].attn.qkv.weight, student.vit.blocks[0].attn.qkv.weight)
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and {"dino", "ibot", "koleo", "knn_top1", "feature_spread"} <= set(header.split(","))
    assert "random-init backbone" in stdout and "Epoch 2" in stdout


@pytest.mark.slow
def test_the_written_backbone_trains_a_segmentation_head(pretrained, dataset, tmp_path):
    out, _ = pretrained
    result = train_cli(dataset, tmp_path / "seg", "--weights", out / "backbone.pth", "--no-pretrained")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "seg" / "best_model_iou.pth").is_file()


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(images, tmp_path):
    flags = ("--images", images / "train", *TINY, "--epochs", "2", "--checkpoint-every", "1")
    reference = run_script("pretrain.py", *flags, "--out-dir", tmp_path / "whole")
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "pretrain.py"), *map(str, flags), "--out-dir", str(killed)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "metrics.csv").exists():  # epoch 1 written
        time.sleep(0.2)
    time.sleep(1.0)  # into epoch 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(killed / "last.pth", weights_only=True)["step"]
    assert 5 <= saved < 10, saved  # 20 images, batch 4: 5 steps an epoch
    resumed = run_script("pretrain.py", "--resume", killed / "last.pth")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ours, theirs = (torch.load(p / "backbone.pth", weights_only=True) for p in (killed, tmp_path / "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_distillation_trains_the_student_towards_a_frozen_teacher(images, tmp_path):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save(meta_state(load_backbone("dinov3_vits16", source="timm", pretrained=False)), teacher)
    out = tmp_path / "distilled"
    result = run_script(
        "pretrain.py",
        "--images",
        images / "train",
        *TINY,
        "--recipe",
        "distill",
        "--epochs",
        "2",
        "--distill-from",
        "dinov3_vits16",
        "--teacher-weights",
        teacher,
        "--out-dir",
        out,
        "--monitor",
        images,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "knn_agreement" in (out / "metrics.csv").read_text().splitlines()[0]
    assert not (out / "student.pth").exists()
    load_backbone("dinov2_vits14", source="timm", weights=out / "backbone.pth")


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(images, tmp_path):
    (tmp_path / "empty").mkdir()
    base = ("--out-dir", tmp_path / "out")
    one_line_error(run_script("pretrain.py", "--images", tmp_path / "empty", *TINY, *base), "empty: no image files")
    one_line_error(
        run_script("pretrain.py", "--images", images / "train", *TINY[:-4], "--imgsz", "518", *base),
        "--imgsz 518",
        "short side is 40 px",
    )
    wrong = tmp_path / "vitb.pth"
    torch.save(meta_state(load_backbone("dinov2_vitb14", source="timm", pretrained=False)), wrong)
    one_line_error(
        run_script("pretrain.py", "--images", images / "train", *TINY, "--weights", wrong, *base),
        "vitb.pth",
        "embed dim 768",
    )
    one_line_error(
        run_script("pretrain.py", "--images", images / "train", "--backbone", "dinov3_convnext_tiny", *OFFLINE, *base),
        "--distill-from",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_processes_under_torchrun_train_what_one_process_trains_on_the_same_global_batch(images, tmp_path):
    """2 processes x batch 2 against 1 x batch 4: the same batches, the centring over both processes,
    gradients averaged, one rate. KoLeo is off: like DINOv2's it looks for neighbours in each
    process's own batch, so it alone differs with the number of processes."""
    flags = ("--images", images / "train", *TINY, "--epochs", "1", "--koleo-weight", "0", "--workers", "0")
    one = run_script("pretrain.py", *flags, "--batch", "4", "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "pretrain.py"),
            *map(str, flags),
            "--batch",
            "2",
            "--out-dir",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    ours, theirs = (torch.load(tmp_path / name / "backbone.pth", weights_only=True) for name in ("two", "one"))
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-3, atol=1e-5) for k in ours)
    assert (tmp_path / "two" / "metrics.csv").read_text().count("\n") == 2  # rank 0 alone writes
