"""`train.py --recipe paper`: the DINOv2 paper's augmentation, schedule and length, as one switch."""

import csv
import json

import albumentations as A
import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from dinokit.data.augmentations import (
    ClassBalancedCrop,
    PhotoMetricDistortion,
    RandomRescale,
    paper_train_transform,
    seed_augmentation,
)
from dinokit.training.schedules import build_scheduler
from tests.conftest import OFFLINE, run_script
from train import get_args_parser, settle


def largest_share(mask: np.ndarray) -> float:
    counts = np.bincount(mask[mask != 255].ravel())
    return counts.max() / counts.sum()


@pytest.mark.parametrize("height, width", [(90, 120), (375, 500), (500, 333), (300, 3000)])
def test_every_paper_training_sample_is_a_518_square(height, width):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (height, width), dtype=np.uint8)
    transform = paper_train_transform()
    for index in range(8):
        seed_augmentation(transform, 0, 0, index)
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (518, 518, 3) and out["image"].dtype == np.float32
        assert out["mask"].shape == (518, 518)


def test_crops_smaller_than_518_are_padded_bottom_right_with_the_mean_and_ignore():
    # mmseg pads after Normalize with 0 (the mean colour) and masks with the ignore index
    transform = paper_train_transform()
    transform.transforms[0] = RandomRescale(short_side=100, ratio_range=(1.0, 1.0))  # 100 x 133: smaller than the crop
    image = np.full((300, 400, 3), 200, np.uint8)
    out = transform(image=image, mask=np.ones((300, 400), np.uint8))
    assert (
        (out["mask"][:100, :133] != 255).all()
        and (out["mask"][100:] == 255).all()
        and (out["mask"][:, 133:] == 255).all()
    )
    assert np.abs(out["image"][100:]).max() == 0 and np.abs(out["image"][:100, :133]).max() > 0


def test_rescale_draws_the_short_side_from_256_to_1024_and_caps_very_long_sides():
    # mmseg Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0)): short side 512 r, long side at most 2048 r
    rescale = A.Compose([RandomRescale()])
    photo_sizes, panorama_sizes = [], []
    for seed in range(40):
        seed_augmentation(rescale, seed)
        photo_sizes.append(rescale(image=np.zeros((375, 500, 3), np.uint8))["image"].shape[:2])
        seed_augmentation(rescale, seed)
        panorama_sizes.append(rescale(image=np.zeros((100, 1000, 3), np.uint8))["image"].shape[:2])
    shorts = [height for height, _ in photo_sizes]
    assert 256 <= min(shorts) < 400 and 800 < max(shorts) <= 1024
    for (height, _), (pano_height, pano_width) in zip(photo_sizes, panorama_sizes):
        assert pano_width == pytest.approx(4 * height, abs=2) and pano_height < height / 2  # the long side bound rules


def test_the_crop_keeps_no_class_at_75_percent_when_a_crop_can_avoid_it():
    # 518 x 1000: class 1 left of column 500, class 2 right of it; about half of the random
    # windows have 75 % or more of one class, so ten redraws (mmseg's) find a balanced one
    mask = np.ones((518, 1000), np.uint8)
    mask[:, 500:] = 2
    image = np.zeros((518, 1000, 3), np.uint8)
    ruled, free = A.Compose([ClassBalancedCrop(518, 0.75)]), A.Compose([ClassBalancedCrop(518, 1.0)])
    ruled_shares, free_shares = [], []
    for seed in range(60):
        for crop, shares in ((ruled, ruled_shares), (free, free_shares)):
            seed_augmentation(crop, seed)
            shares.append(largest_share(crop(image=image, mask=mask)["mask"]))
    assert max(ruled_shares) < 0.75
    assert max(free_shares) > 0.9  # without the rule such windows do come out


def test_photometric_distortion_follows_mmseg_order_and_truncation():
    image = np.array([[[10, 100, 250]]], np.uint8)
    distortion = PhotoMetricDistortion()
    plain = dict(brightness=None, saturation=None, hue=None)
    brighter_then_contrast = distortion.apply(image, contrast_first=True, contrast=1.5, **{**plain, "brightness": 10.7})
    assert brighter_then_contrast.tolist() == [[[30, 165, 255]]]  # uint8(10 + 10.7) = 20, * 1.5 = 30; 260 clips to 255
    unchanged = distortion.apply(image, contrast_first=False, contrast=None, **plain)
    assert unchanged.tolist() == image.tolist()
    hue_turned = distortion.apply(
        np.array([[[255, 0, 0]]], np.uint8), contrast_first=True, contrast=None, **{**plain, "hue": 60}
    )  # red (hue 0) + 60 of OpenCV's 0-180 (120 degrees) = green
    assert hue_turned.tolist() == [[[0, 255, 0]]]


def paper_args(*flags: str):
    args = get_args_parser().parse_args(["--recipe", "paper", *flags])
    settle(args, resumed=None)
    return args


def test_the_paper_recipe_sets_the_papers_optimisation_and_flags_given_win():
    args = paper_args()
    assert (args.batch, args.imgsz, args.lr, args.weight_decay) == (16, [518, 518], 1e-3, 1e-4)
    assert (args.scheduler, args.warmup_steps, args.steps, args.epochs, args.mode) == (
        "poly",
        1500,
        40000,
        None,
        "slide",
    )
    given = paper_args("--batch", "8", "--epochs", "3")
    assert (given.batch, given.epochs, given.steps) == (
        8,
        3,
        None,
    )  # --epochs counts the run instead of the recipe's steps
    article = get_args_parser().parse_args([])
    settle(article, resumed=None)
    assert (article.recipe, article.batch, article.epochs, article.steps, article.scheduler, article.mode) == (
        "article",
        2,
        20,
        None,
        "multistep",
        "whole",
    )


def test_the_paper_schedule_by_hand_at_steps_0_1500_and_40000():
    args = paper_args()
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=args.lr, weight_decay=args.weight_decay)
    schedule = build_scheduler(optimizer, args.scheduler, total_steps=args.steps, warmup_steps=args.warmup_steps)
    lrs = {}
    for step in range(args.steps + 1):
        if step in (0, 1500, 40000):
            lrs[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(1e-3 * 1e-6)  # mmcv linear warmup from warmup_ratio 1e-6
    assert lrs[1500] == pytest.approx(1e-3 * (1 - 1500 / 40000))  # warmup over: poly, power 1
    assert lrs[40000] == 0.0


@pytest.mark.slow
def test_train_py_counts_a_paper_run_in_steps_and_resumes_to_a_longer_one(tiny_dataset, tmp_path):
    # 12 images, batch 4: 3 steps per epoch; --steps 5 is one full epoch and one of 2 steps
    flags = [
        "--data-dir",
        tiny_dataset,
        "--out-dir",
        tmp_path,
        "--imgsz",
        "56",
        "56",
        "--batch",
        "4",
        "--warmup-steps",
        "0",
        "--short-side",
        "56",
        "--crop",
        "56",
        "--stride",
        "28",
        *OFFLINE,
    ]
    result = run_script("train.py", "--recipe", "paper", "--steps", "5", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Recipe paper: 5 steps of batch 4 (2 epochs of 3)" in result.stdout
    assert (
        "slide (short side 56, crop 56, stride 28)"
        in json.loads((tmp_path / "best_validation.json").read_text())["mode"]
    )
    checkpoint = load_checkpoint(tmp_path / "last.pth")
    assert checkpoint["args"]["recipe"] == "paper" and checkpoint["model_info"]["arch"]["padding"] == "center"
    resumed = run_script("train.py", "--resume", tmp_path / "last.pth", "--steps", "8", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(tmp_path / "metrics.csv") as f:
        rows = [(int(row["epoch"]), int(row["step"]), float(row["lr"])) for row in csv.DictReader(f)]
    # poly from 1e-3 to 0 over 5 steps, then, resumed at step 5 of 8, on to the new end
    assert rows == [(1, 3, pytest.approx(1e-3 * 2 / 5)), (2, 5, 0.0), (3, 8, 0.0)]
    assert "--steps 8 (was 5)" in resumed.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recipe", "paper", "--imgsz", "518", "392"], "--recipe paper trains on square crops"),
        (
            ["--recipe", "paper", "--cache-train-features"],
            "--recipe paper needs random crops: give --train-views 2 or more",
        ),
        (["--epochs", "3", "--steps", "10"], "--epochs and --steps exclude each other"),
        (["--warmup-steps", "10"], "--warmup-steps needs --scheduler poly or cosine"),
    ],
)
def test_flags_that_contradict_the_recipe_stop_before_any_data_is_read(flags, message, tmp_path):
    result = run_script("train.py", "--data-dir", tmp_path / "missing", "--out-dir", tmp_path / "out", *flags, *OFFLINE)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
