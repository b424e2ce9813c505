"""--train-views K: a frozen backbone runs K times per training image in a whole run, augmentation kept."""

import csv
import os
import signal
import subprocess
import sys
from functools import partial

import pytest
import torch

import train
from datasets import ViewsDataset, build_datasets, shard_indices
from dinokit.tasks.segmentation import segmentation_model
from dinokit.tasks.segmentation.scoring import SegmentationScoring
from dinokit.training import feature_cache
from dinokit.training.feature_cache import FeatureCache
from dinokit.writing import write_json
from engine import LoopSettings, cache_features
from tests.conftest import OFFLINE, ROOT, run_script

FLAGS = ("--imgsz", "56", "42", "--batch", "4", "--lr", "1e-3", "--seed", "7", "--source", "timm", "--no-pretrained")
CPU = LoopSettings(torch.device("cpu"), partial(SegmentationScoring, 21, 255))


@pytest.mark.slow
def test_the_backbone_runs_k_times_per_training_image_and_once_per_validation_image(
    tiny_dataset, trained_run, tmp_path
):
    # 12 training and 5 validation images, 3 epochs: 2 x 12 + 5 passes, against 3 x 12 + 5 without views
    views = run_script(
        "train.py",
        "--data-dir",
        tiny_dataset,
        "--out-dir",
        tmp_path / "views",
        "--epochs",
        "3",
        "--train-views",
        "2",
        *FLAGS,
        "--workers",
        "0",
    )
    assert views.returncode == 0, views.stderr[-3000:]
    assert "Caching training features: 2 augmented views per image, 24 backbone passes" in views.stdout
    assert "Backbone passes: 29 images" in views.stdout
    assert "Backbone passes: 41 images" in trained_run[1]  # the same data and epochs, default loop
    assert not list((tmp_path / "views").glob("train_views*"))  # a finished run deletes its views


def test_a_cached_view_is_the_seeded_augmentation_computed_afresh(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    model = segmentation_model(21, source="timm", pretrained=False).eval()
    train_set, _, _ = build_datasets(tiny_dataset, (56, 42), seed=3)
    dataset = ViewsDataset(train_set, [0, 4, 7], views=3)
    cache = FeatureCache("train_views", 10**9, tmp_path)
    cache_features(cache, model, torch.utils.data.DataLoader(dataset, batch_size=4), CPU)
    for position, index in enumerate([0, 4, 7]):
        for view in range(3):
            image, mask = train_set.sample(index, view)  # the augmentation epoch `view` would give it
            with torch.no_grad():
                fresh = model.extract_features(image[None])[0]
            assert torch.allclose(cache.features[position * 3 + view], fresh, atol=1e-5)
            assert torch.equal(cache.masks[position * 3 + view].long(), mask)
    assert not torch.equal(cache.features[0], cache.features[1])  # the views do differ


def test_each_pass_draws_one_view_per_image_reproducibly():
    cache = FeatureCache("train_views", 10**9, ".", views=3)
    cache.features = torch.arange(12.0)[:, None]  # 4 images x 3 views
    cache.masks = torch.zeros(12, 1, dtype=torch.uint8)

    def drawn(seed):
        batches = cache.batches(2, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return torch.cat([features[:, 0] for features, _ in batches]).long().tolist()

    first = drawn(1)
    assert drawn(1) == first and sorted(v // 3 for v in first) == [0, 1, 2, 3]  # every image once, one view each
    assert len({tuple(drawn(seed)) for seed in range(20)}) > 10


def test_shards_are_padded_to_equal_counts():
    assert shard_indices(7, 0, 2) == [0, 2, 4, 6] and shard_indices(7, 1, 2) == [1, 3, 5, 0]
    assert [shard_indices(1, r, 3) for r in range(3)] == [[0], [0], [0]]


def test_only_a_complete_cache_with_the_same_key_is_reused(tmp_path):
    shapes = (6, (8, 2, 3), torch.float32, (28, 42))
    first = FeatureCache("train_views", 0, tmp_path, key={"views": 2, "seed": 1})
    first.allocate(*shapes)  # killed while building: no record of completion
    assert not FeatureCache("train_views", 0, tmp_path, key={"views": 2, "seed": 1}).reuse(*shapes)
    first.features[:] = 1.5
    write_json(tmp_path / "train_views.rank0.json", first.key)  # what finish() writes last
    again = FeatureCache("train_views", 0, tmp_path, key={"views": 2, "seed": 1})
    assert again.reuse(*shapes) and again.ready and float(again.features[5, 7, 1, 2]) == 1.5
    assert not FeatureCache("train_views", 0, tmp_path, key={"views": 3, "seed": 1}).reuse(*shapes)
    again.close()
    assert list(tmp_path.iterdir()) == []


def test_a_views_cache_the_disk_cannot_hold_is_refused_before_any_backbone_pass(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    args = train.get_args_parser().parse_args(
        [
            "--data-dir",
            str(tiny_dataset),
            "--out-dir",
            str(tmp_path),
            "--epochs",
            "2",
            "--train-views",
            "4",
            *FLAGS,
            "--workers",
            "0",
        ]
    )
    with pytest.raises(
        OSError,
        match=r"the train_views feature cache needs .* on disk but 1.00 kB are free; free space or lower --train-views",
    ):
        train.main(args)
    assert "Caching train_views features" not in capsys.readouterr().err
    assert not list(tmp_path.glob("train_views*"))


@pytest.mark.slow
def test_a_killed_views_run_reuses_its_cache_and_resumes_to_the_same_metrics(tiny_dataset, tmp_path):
    common = ["--data-dir", str(tiny_dataset), "--epochs", "3", "--train-views", "3", *FLAGS, "--workers", "1"]
    straight = run_script("train.py", *common, "--out-dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *common, "--out-dir", str(tmp_path / "killed")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:
        if "EPOCH: 3/3" in line:  # epochs 1 and 2 saved: kill it in the middle of epoch 3
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / "killed" / "train_views.rank0.json").is_file()
    resumed = run_script(
        "train.py", *common, "--out-dir", tmp_path / "killed", "--resume", tmp_path / "killed" / "last.pth"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train_views feature cache: 36 images reused from" in resumed.stdout
    assert "Backbone passes: 5 images" in resumed.stdout  # only the validation split, once

    def rows(folder):
        with open(folder / "metrics.csv") as f:
            return [{k: float(v) for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

    for expected, got in zip(rows(tmp_path / "straight"), rows(tmp_path / "killed"), strict=True):
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_views_are_refused_with_fine_tuning_and_with_one_view_of_the_paper_recipe(tmp_path):
    for flags, message in (
        (["--fine-tune", "--train-views", "2"], "--train-views / --cache-train-features need a frozen backbone"),
        (["--recipe", "paper", "--cache-train-features"], "--recipe paper needs random crops: give --train-views 2"),
    ):
        result = run_script(
            "train.py", "--data-dir", tmp_path / "missing", "--out-dir", tmp_path / "out", *flags, *OFFLINE
        )
        assert result.returncode == 1 and message in result.stderr
