"""The speed features change how fast results come, never what they are."""

from functools import partial

import pytest
import torch

from datasets import build_datasets, make_loader
from dinokit.tasks.segmentation import segmentation_model
from dinokit.tasks.segmentation.scoring import SegmentationScoring, pixel_cross_entropy
from dinokit.training.feature_cache import FeatureCache
from engine import LoopSettings, cache_features, train_one_epoch, validate
from tests.conftest import OFFLINE, run_script
from train import build_optimizer, get_args_parser, settle
from utils import select_precision

CPU = torch.device("cpu")
FP32 = LoopSettings(CPU, partial(SegmentationScoring, 21, 255))
BF16 = LoopSettings(CPU, partial(SegmentationScoring, 21, 255), amp_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def frozen_model():
    torch.manual_seed(0)
    return segmentation_model(21, source="timm", pretrained=False)


@pytest.fixture(scope="module")
def loaders(tiny_dataset):
    train_set, valid_set, _ = build_datasets(tiny_dataset, (56, 42))
    return make_loader(train_set, 4, shuffle=True, workers=0), make_loader(valid_set, 2, shuffle=False, workers=0)


@pytest.mark.parametrize("budget", [10**10, 0], ids=["in-memory", "on-disk"])
def test_cached_validation_equals_uncached(frozen_model, loaders, tmp_path, budget):
    valid_loader = loaders[1]
    uncached = validate(frozen_model, valid_loader, FP32)
    cache = FeatureCache("valid", budget, tmp_path)
    cache_features(cache, frozen_model, valid_loader, FP32)
    assert cache.ready and bool(cache.files) == (budget == 0)
    first = validate(frozen_model, valid_loader, FP32, cache=cache)
    again = validate(frozen_model, valid_loader, FP32, cache=cache)
    for result in (first, again):
        assert result.loss == pytest.approx(uncached.loss, rel=1e-6)
        assert result.metrics["miou"] == pytest.approx(uncached.metrics["miou"], abs=1e-9)
        assert result.metrics["pixacc"] == pytest.approx(uncached.metrics["pixacc"], abs=1e-9)
    cache.close()
    assert not list(tmp_path.iterdir())  # the disk cache is deleted


def test_cached_epochs_do_not_run_the_backbone(frozen_model, loaders, tmp_path, monkeypatch):
    cache = FeatureCache("valid", 10**10, tmp_path)
    cache_features(cache, frozen_model, loaders[1], FP32)
    monkeypatch.setattr(frozen_model, "extract_features", lambda *a: pytest.fail("backbone ran on a cached epoch"))
    validate(frozen_model, loaders[1], FP32, cache=cache)


def test_an_unbuilt_cache_is_an_error_not_a_silent_build(frozen_model, loaders, tmp_path):
    with pytest.raises(RuntimeError, match="the valid feature cache is empty: call its build"):
        validate(frozen_model, loaders[1], FP32, cache=FeatureCache("valid", 10**10, tmp_path))


def test_training_from_cached_features_learns(frozen_model, loaders, tmp_path):
    train_loader = loaders[0]
    cache = FeatureCache("train", 10**10, tmp_path)
    cache_features(cache, frozen_model, make_loader(train_loader.dataset, 4, shuffle=False, workers=0), FP32)
    optimizer = torch.optim.AdamW(frozen_model.head.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = [
        train_one_epoch(frozen_model, train_loader, optimizer, FP32, cache=cache, generator=generator).loss
        for _ in range(4)
    ]
    assert losses[-1] < losses[0]


def test_bf16_autocast_runs_on_cpu_and_agrees_with_fp32(frozen_model, loaders):
    fp32 = validate(frozen_model, loaders[1], FP32)
    bf16 = validate(frozen_model, loaders[1], BF16)
    assert bf16.loss == pytest.approx(fp32.loss, rel=0.05)
    model = segmentation_model(21, fine_tune=True, source="timm", pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    result = train_one_epoch(model, loaders[0], optimizer, BF16)
    assert torch.isfinite(torch.tensor(result.loss))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    images, target = torch.randn(2, 3, 42, 56), torch.randint(0, 21, (2, 42, 56))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = segmentation_model(21, fine_tune=True, source="timm", pretrained=False).train()
        model.set_grad_checkpointing(checkpointing)
        loss, _ = pixel_cross_entropy(model(images), target, 255)
        loss.backward()
        results.append((loss.detach(), model.backbone.vit.blocks[0].attn.qkv.weight.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)


def test_precision_choice():
    assert select_precision(CPU, "auto") is None  # CPU autocast is slower than fp32 here
    assert select_precision(CPU, "bf16") == torch.bfloat16
    assert select_precision(CPU, "off") is None
    with pytest.raises(ValueError, match="--amp fp16 needs a GPU"):
        select_precision(CPU, "fp16")


def test_fine_tuning_gives_the_backbone_a_lower_learning_rate():
    model = segmentation_model(21, fine_tune=True, source="timm", pretrained=False)
    args = get_args_parser().parse_args(["--fine-tune", "--lr", "1e-3"])
    settle(args, resumed=None)  # flags not given take their defaults
    head, backbone = build_optimizer(model, args).param_groups
    assert head["lr"] == 1e-3 and backbone["lr"] == pytest.approx(1e-4)
    assert len(backbone["params"]) == len(list(model.backbone.parameters()))
    args = get_args_parser().parse_args(["--fine-tune", "--lr", "1e-3", "--backbone-lr", "5e-6"])
    settle(args, resumed=None)
    assert build_optimizer(model, args).param_groups[1]["lr"] == 5e-6


@pytest.mark.slow
def test_train_py_with_cached_train_features(tiny_dataset, tmp_path):
    result = run_script(
        "train.py",
        "--data-dir",
        tiny_dataset,
        "--epochs",
        "3",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "4",
        "--lr",
        "1e-2",
        "--cache-train-features",
        "--cache-ram-gb",
        "0",
        "--out-dir",
        tmp_path,
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_views feature cache: 12 images x 1536x3x4 float32" in result.stdout + result.stderr
    assert "valid feature cache: 5 images" in result.stdout + result.stderr
    assert not list(tmp_path.glob(".*cache"))  # disk caches removed at the end
