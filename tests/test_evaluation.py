"""Evaluation at original resolution, the inference modes (whole, slide, multi-scale + flip) and
the article's metric, each against something computed by hand."""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dinokit.data.synthetic import make_dataset
from dinokit.prediction.modes import InferenceMode
from dinokit.tasks.segmentation import segmentation_model
from evaluation import evaluate_pairs
from inference import Predictor, predict_scores, slide_logits, window_grid
from metrics import ArticleIoU
from tests.conftest import ROOT, run_script

CPU = torch.device("cpu")
INFO = {  # a model description by hand: the toy network below stands where a backbone + head would
    "task": "segmentation",
    "arch": {"backbone": "small", "registers": False, "source": "timm"},
    "classes": ["background", "red", "green"],
    "colors": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
    "ignore_colors": [],
    "ignore_index": 255,
    "mask_format": "auto",
    "imgsz": [28, 28],
    "mean": [0, 0, 0],
    "std": [1, 1, 1],
}


def pointwise_model() -> nn.Module:
    """Per-pixel logits (0.5, red, green): class 1 where red > 0.5, class 2 where green wins.
    Acts on each pixel alone, so it is exactly flip-equivariant."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[1, 0] = conv.weight[2, 1] = 1.0
        conv.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
    return conv.eval()


def write_pair(folder, name, image, mask):
    cv2.imwrite(str(folder / "images" / f"{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "labels" / f"{name}.png"), mask)


def test_full_resolution_metrics_equal_a_hand_built_confusion_matrix(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    predictions, truths = [], []
    for name, (height, width) in (("a", (20, 30)), ("b", (23, 17))):  # different sizes, not multiples of 14
        image = np.zeros((height, width, 3), np.uint8)
        image[..., 0] = rng.integers(0, 2, (height, width)) * 255  # red where the model says class 1
        image[..., 1] = (rng.random((height, width)) < 0.2) * 200
        mask = rng.integers(0, 3, (height, width)).astype(np.uint8)
        mask[:2] = 255  # ignored rows
        write_pair(tmp_path, name, image, mask)
        logits = np.stack([np.full((height, width), 0.5), image[..., 0] / 255, image[..., 1] / 255])
        predictions.append(logits.argmax(0))
        truths.append(mask)
    predictor = Predictor(pointwise_model(), INFO, device=CPU, mode=InferenceMode(native=True))
    pairs = [(tmp_path / "images" / f"{n}.png", tmp_path / "labels" / f"{n}.png") for n in "ab"]
    evaluation = evaluate_pairs(predictor, pairs)
    result = evaluation.result
    truth, prediction = np.concatenate([t.ravel() for t in truths]), np.concatenate([p.ravel() for p in predictions])
    keep = truth != 255
    expected = np.bincount(truth[keep] * 3 + prediction[keep], minlength=9).reshape(3, 3)
    assert np.array_equal(result.confusion.numpy(), expected)
    iou = np.diag(expected) / (expected.sum(0) + expected.sum(1) - np.diag(expected))
    share = expected.sum(1) / expected.sum()
    assert result.scores.miou == pytest.approx(iou.mean())
    assert result.scores.fwiou == pytest.approx((share * iou).sum())
    assert result.scores.mean_class_accuracy == pytest.approx((np.diag(expected) / expected.sum(1)).mean())
    assert evaluation.images == 2


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return segmentation_model(3, source="timm", pretrained=False).eval()


def test_one_window_covering_the_image_is_whole(vit):
    image = np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    kwargs = dict(mean=[0.5] * 3, std=[0.25] * 3, device=CPU)
    with torch.no_grad():
        whole = predict_scores(vit, image, InferenceMode(native=True), **kwargs)
        slide = predict_scores(vit, image, InferenceMode("slide", short_side=30, crop=42, stride=14), **kwargs)
    assert torch.allclose(whole, slide, atol=1e-6)


def test_overlapping_windows_average_their_logits(vit):
    images = torch.randn(1, 3, 28, 56)
    assert window_grid(28, 56, 28, 14) == [(0, 28, 0, 28), (0, 28, 14, 42), (0, 28, 28, 56)]
    with torch.no_grad():
        slid = slide_logits(vit, images, crop=28, stride=14)
        windows = [vit(images[..., :, left : left + 28]) for left in (0, 14, 28)]
    # pixel (5, 20): in windows 1 and 2 at columns 20 and 6; pixel (5, 3): window 1 alone
    assert torch.allclose(slid[0, :, 5, 20], (windows[0][0, :, 5, 20] + windows[1][0, :, 5, 6]) / 2, atol=1e-5)
    assert torch.allclose(slid[0, :, 5, 3], windows[0][0, :, 5, 3], atol=1e-5)


def test_flip_and_scale_averaging_of_a_flip_equivariant_model_changes_nothing():
    image = np.random.default_rng(2).integers(0, 255, (21, 33, 3), dtype=np.uint8)
    kwargs = dict(mean=[0, 0, 0], std=[1, 1, 1], device=CPU)
    plain = predict_scores(pointwise_model(), image, InferenceMode(native=True), **kwargs)
    flipped = predict_scores(pointwise_model(), image, InferenceMode(native=True, flip=True), **kwargs)
    assert torch.allclose(flipped, plain.softmax(0), atol=1e-6)  # two identical passes, softmax-averaged
    assert torch.equal(flipped.argmax(0), plain.argmax(0))


def test_seed_style_metric_on_a_hand_computed_two_batch_case():
    seed = ArticleIoU(num_classes=3, ignore_index=255, batch_images=1)
    # batch 1: truth [0 0 1 1], prediction [0 1 1 1] -> IoU 0: 1/2, 1: 2/3, 2: absent -> 0; mean 7/18
    seed.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 1, 1]]))
    # batch 2: truth [2 2 255 0], prediction [2 0 1 0]; the ignored pixel drops the only 1 -> IoU 0: 1/2, 1: 0, 2: 1/2
    seed.update(torch.tensor([[2, 2, 255, 0]]), torch.tensor([[2, 0, 1, 0]]))
    assert seed.compute() == pytest.approx((7 / 18 + 1 / 3) / 2, abs=1e-12)


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    """A dataset whose held-out split is named test (7 images: 4 + 3 across two processes)."""
    root = make_dataset(tmp_path_factory.mktemp("test_split"), n_train=1, n_valid=7, size=(70, 56), seed=5)
    for kind in ("images", "labels"):
        shutil.move(root / f"valid_{kind}", root / f"test_{kind}")
    return root


@pytest.mark.slow
def test_evaluate_py_on_a_test_split_under_torchrun_equals_one_process(trained_run, test_split, tmp_path):
    checkpoint = trained_run[0] / "best_model_iou.pth"
    flags = ("--model", checkpoint, "--data-dir", test_split, "--split", "test", "--workers", "0", "--article-metric")
    single = run_script("evaluate.py", *flags, "--out-dir", tmp_path / "one")
    assert single.returncode == 0, single.stderr[-3000:]
    assert "mean class accuracy" in single.stdout and "article-style mIoU" in single.stdout
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "evaluate.py"),
            *map(str, flags),
            "--out-dir",
            str(tmp_path / "two"),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr[-3000:]
    name = "transfer_learning-best_model_iou.pth_test_whole-126x98"  # the run folder's name first: --out-dir elsewhere
    one_report = json.loads((tmp_path / "one" / f"eval_{name}.json").read_text())
    two_report = json.loads((tmp_path / "two" / f"eval_{name}.json").read_text())
    assert two_report["processes"] == 2 and two_report["images"] == one_report["images"] == 7
    for key in ("miou", "pixel_accuracy", "mean_class_accuracy", "fwiou"):
        assert two_report[key] == pytest.approx(one_report[key], abs=1e-12)
    assert (tmp_path / "one" / f"confusion_{name}.png").stat().st_size > 1000
