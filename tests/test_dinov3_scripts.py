"""Every script with a DINOv3 backbone, run as a user runs it (`python script.py ...`), offline:
`--backbone dinov3_vits16 --source timm --no-pretrained` on the tiny dataset (120x90: not a
multiple of 16)."""

import pytest
import torch

from checkpoint import load_checkpoint
from dinokit.data.synthetic import make_image_folders
from inference import Predictor
from tests.conftest import run_script
from tests.test_distributed import torchrun
from tests.test_inference import make_video, run_notebook

pytestmark = pytest.mark.slow  # end-to-end runs

DINOV3 = ("--backbone", "dinov3_vits16", "--source", "timm", "--no-pretrained")


@pytest.fixture(scope="module")
def dinov3_run(tiny_dataset, tmp_path_factory):
    """train.py with a frozen DINOv3 ViT-S/16 and two cached training views per image."""
    out = tmp_path_factory.mktemp("dinov3") / "run"
    result = run_script(
        "train.py",
        *("--data-dir", tiny_dataset, "--epochs", "2", "--imgsz", "120", "90", "--batch", "4", "--lr", "1e-3"),
        *("--train-views", "2", "--out-dir", out, "--workers", "0", *DINOV3),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_training_rounds_to_16_and_records_the_backbone(dinov3_run):
    out, stdout = dinov3_run
    assert "rounded up to 128 96 (a multiple of the backbone's patch size 16)" in stdout
    assert "Backbone dinov3_vits16: patch 16, weights under the DINOv3 License" in stdout
    info = load_checkpoint(out / "best_model_iou.pth")["model_info"]
    assert info["arch"]["backbone"] == "dinov3_vits16" and info["imgsz"] == [128, 96]
    assert (info["patch_size"], info["prefix_tokens"], info["mean"]) == (16, 5, [0.485, 0.456, 0.406])


def test_evaluate_infer_image_and_video(dinov3_run, tiny_dataset, tmp_path):
    checkpoint = dinov3_run[0] / "best_model_iou.pth"
    result = run_script(
        "evaluate.py", "--model", checkpoint, "--data-dir", tiny_dataset, "--mode", "slide", "--short-side", "100"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "slide (short side 100, crop 512, stride 341)" in result.stdout  # DINOv3's window by default
    result = run_script(
        "infer_image.py", "--model", checkpoint, "--input", tiny_dataset / "valid_images", "--out-dir", tmp_path / "i"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "i").rglob("*.png"))) >= 5 and "whole at 128x96" in result.stdout
    make_video(tmp_path / "clip.mp4", frames=4)
    result = run_script(
        "infer_video.py", "--model", checkpoint, "--input", tmp_path / "clip.mp4", "--out-dir", tmp_path / "v"
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_export_computes_rope_for_sizes_that_are_not_multiples_of_16(dinov3_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
    out = tmp_path / "model.onnx"
    result = run_script("export.py", "--model", dinov3_run[0] / "best_model_iou.pth", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check passed" in result.stdout and "97x72" in result.stdout  # the traced 128x96, then 97x72
    predictor = Predictor.from_onnx(out)
    assert predictor.predict(torch.randint(0, 255, (50, 70, 3), dtype=torch.uint8).numpy()).shape == (50, 70)


def test_dinov3_recipe_sets_metas_protocol(tiny_dataset, tmp_path):
    result = run_script(
        "train.py",
        *("--data-dir", tiny_dataset, "--recipe", "dinov3", "--steps", "2", "--batch", "2", "--imgsz", "64", "64"),
        *("--train-views", "2", "--short-side", "64", "--out-dir", tmp_path / "r", "--workers", "0", *DINOV3),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "Recipe dinov3: 2 steps of batch 2 (1 epoch of 6), AdamW lr 0.001 weight decay 0.001, onecycle schedule "
        "after 1500 warmup steps, Dropout2d 0.1 before the head." in result.stdout
    )
    assert "slide (short side 64, crop 512, stride 341)" in result.stdout
    arch = load_checkpoint(tmp_path / "r" / "final_model.pth")["model_info"]["arch"]
    assert arch["dropout"] == 0.1 and arch["padding"] == "bottom_right"


def test_fine_tune_with_gradient_checkpointing(tiny_dataset, tmp_path):
    result = run_script(
        "train.py",
        *("--data-dir", tiny_dataset, "--epochs", "1", "--imgsz", "64", "48", "--batch", "4", "--fine-tune"),
        *("--grad-checkpointing", "--out-dir", tmp_path / "ft", "--workers", "0", *DINOV3),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuning" in result.stdout


def test_convnext_trains_from_its_last_stage(tiny_dataset, tmp_path):
    flags = ("--data-dir", tiny_dataset, "--epochs", "1", "--imgsz", "64", "48", "--batch", "4", "--workers", "0")
    convnext = ("--backbone", "dinov3_convnext_tiny", "--source", "timm", "--no-pretrained")
    result = run_script("train.py", *flags, "--out-dir", tmp_path / "cnx", *convnext)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rounded up to 64 64 (a multiple of the backbone's patch size 32)" in result.stdout
    refused = run_script("train.py", *flags, "--out-dir", tmp_path / "cnx4", "--head-layers", "4", *convnext)
    assert refused.returncode == 1 and "use --head-layers 1" in refused.stderr and "Traceback" not in refused.stderr


def test_torchrun_two_processes(tiny_dataset, tmp_path):
    result = torchrun(
        *("--data-dir", tiny_dataset, "--epochs", "1", "--imgsz", "64", "48", "--batch", "2"),
        *("--out-dir", tmp_path / "ddp", "--workers", "0", *DINOV3),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ddp" / "best_model_iou.pth").is_file()


def test_visualize_features_and_classify(tiny_dataset, tmp_path):
    result = run_script(
        "visualize_features.py", "--input", tiny_dataset / "valid_images", "--imgsz", "70", "56",
        "--out-dir", tmp_path / "maps", *DINOV3,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "5x4 patches" in result.stdout  # ceil(70 / 16) x ceil(56 / 16)
    folders = make_image_folders(tmp_path / "classes", classes=3, n_train=4, n_val=2)
    result = run_script(
        "classify.py", "--data-dir", folders, "--out-dir", tmp_path / "cls", "--imgsz", "64", "--crop-pct", "1.0",
        "--workers", "0", "--k", "3", "--epochs", "2", "--features", "cls+avgpool", "--layers", "4", *DINOV3,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Features: cls+avgpool, last 4 block(s), 1920 dimensions" in result.stdout  # 4 x 384 + 384
    refused = run_script("classify.py", "--data-dir", folders, "--imgsz", "56", "--out-dir", tmp_path / "x", *DINOV3)
    assert refused.returncode == 1 and "multiple of dinov3_vits16's patch size 16" in refused.stderr


def test_notebook_and_demo_take_the_checkpoint(dinov3_run, tiny_dataset, tmp_path):
    checkpoint = dinov3_run[0] / "best_model_iou.pth"
    outputs = run_notebook(
        f"DATA_DIR = {str(tiny_dataset)!r}\nCHECKPOINT = {str(checkpoint)!r}\n"
        "HEAD_WEIGHTS = None\nNUM_SAMPLES = 2\nDEVICE = 'cpu'\nMODE = 'whole'\nSCALES = [1.0]\nFLIP = False"
    )
    assert any("mIoU" in o.get("text", "") for o in outputs)
    import app

    (tmp_path / "results").mkdir()
    predictor = Predictor.from_checkpoint(checkpoint, "cpu", "off")
    demo = app.Demo({"dinov3": predictor}, tmp_path / "results", max_pixels=50_000, max_frames=4)
    path = sorted((tiny_dataset / "valid_images").iterdir())[0]
    *_, png, status = demo.segment_image(str(path), "dinov3", "slide", 0.5)
    assert status.startswith("120x90, ") and "crop 512" in status


def test_bench_compares_backbones_side_by_side(tmp_path):
    skip = ("epochs", "inference", "modes", "memory", "classification", "export", "eomt", "retrieval")
    result = run_script(
        "bench.py", "--skip", *skip, "--imgsz", "64", "64", "--batch", "1", "--repeats", "1",
        "--compare", "dinov2_vits14", "dinov3_vits16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| dinov")]
    assert rows[0].startswith("| dinov2_vits14 | 14 | 70x70 | 5x5 |")
    assert rows[1].startswith("| dinov3_vits16 | 16 | 64x64 | 4x4 |")
