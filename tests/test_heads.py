"""Meta's released heads in mmseg layout, loaded without mmseg; linear (1 block) and ms (4 blocks)
heads; Meta's centred padding; the errors when a head does not fit."""

import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import config
from checkpoint import model_with_head
from dinokit.backbones.released_heads import HeadWeightsError, head_url
from dinokit.tasks.segmentation import segmentation_model
from model import pad_to_patches
from tests.conftest import OFFLINE, run_script

BACKBONE = {"source": "timm", "pretrained": False}


def mmseg_head_file(path, channels, classes, *, wrapped=True, seed=0):
    """A BNHead checkpoint laid out as mmseg saves Meta's heads, with random weights and statistics."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "decode_head.bn.weight": torch.rand(channels, generator=g) + 0.5,
        "decode_head.bn.bias": torch.randn(channels, generator=g),
        "decode_head.bn.running_mean": torch.randn(channels, generator=g),
        "decode_head.bn.running_var": torch.rand(channels, generator=g) + 0.5,
        "decode_head.bn.num_batches_tracked": torch.tensor(1000),
        "decode_head.conv_seg.weight": torch.randn(classes, channels, 1, 1, generator=g) * 0.1,
        "decode_head.conv_seg.bias": torch.randn(classes, generator=g),
    }
    torch.save({"meta": {"CLASSES": ["x"] * classes}, "state_dict": state} if wrapped else state, path)
    return state


def meta_bnhead(state, inputs):
    """Meta's BNHead.forward in eval mode, written from its source: resize_concat of the selected
    inputs (bilinear to the first's size), BatchNorm with running statistics, dropout off, 1x1 conv."""
    size = inputs[0].shape[2:]
    x = torch.cat([F.interpolate(i, size=size, mode="bilinear", align_corners=False) for i in inputs], dim=1)
    x = F.batch_norm(
        x,
        state["decode_head.bn.running_mean"],
        state["decode_head.bn.running_var"],
        state["decode_head.bn.weight"],
        state["decode_head.bn.bias"],
        False,
        0.0,
        1e-5,
    )
    return F.conv2d(x, state["decode_head.conv_seg.weight"], state["decode_head.conv_seg.bias"])


@pytest.mark.parametrize("kind, layers, wrapped", [("linear", 1, True), ("ms", 4, True), ("ms", 4, False)])
def test_a_meta_head_file_reproduces_meta_bnhead(tmp_path, kind, layers, wrapped):
    state = mmseg_head_file(tmp_path / f"{kind}.pth", 384 * layers, 21, wrapped=wrapped)
    model, info = model_with_head(tmp_path / f"{kind}.pth", **BACKBONE)
    assert model.arch["head_layers"] == layers and model.arch["padding"] == "center"
    assert info["classes"] == config.CLASSES and len(info["colors"]) == 21
    features = [torch.randn(2, 384, 5, 7) for _ in range(layers)]
    with torch.no_grad():
        ours = model.head(torch.cat(features, dim=1))
    assert torch.allclose(ours, meta_bnhead(state, features), atol=1e-5)


def test_an_ade20k_head_brings_the_150_classes_and_their_palette(tmp_path):
    mmseg_head_file(tmp_path / "ade.pth", 384, 150)
    _, info = model_with_head(tmp_path / "ade.pth", **BACKBONE)
    assert info["classes"][:3] == ["wall", "building", "sky"] and len(info["colors"]) == 150
    assert info["colors"][0] == [120, 120, 120]


@pytest.mark.parametrize(
    "channels, classes, flags, message",
    [
        (
            768,
            21,
            {},
            "the head reads 768-channel features, but --backbone small gives 384 per block "
            ".* pass --backbone base --head-layers 1",
        ),
        (384, 21, {"head_layers": 4}, "a linear head reading 1 block.*pass --head-layers 1"),
        (1536, 21, {"head_layers": 1}, r"a multi-layer \(ms\) head reading 4 block.*pass --head-layers 4"),
        (384, 10, {}, "a head for 10 classes, neither VOC 2012 \\(21\\) nor ADE20K \\(150\\)"),
    ],
)
def test_heads_that_do_not_fit_are_one_clear_error(tmp_path, channels, classes, flags, message):
    mmseg_head_file(tmp_path / "head.pth", channels, classes)
    with pytest.raises(HeadWeightsError, match=message):
        model_with_head(tmp_path / "head.pth", **BACKBONE, **flags)


def test_head_names_resolve_to_meta_urls_and_load_from_the_hub_cache_offline(tmp_path):
    url = head_url("voc2012_ms", "base")
    assert url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_voc2012_ms_head.pth"
    with pytest.raises(
        HeadWeightsError, match="could not load dinov2_vits14_voc2012_linear_head.pth .*offline, copy it into"
    ):
        model_with_head("voc2012_linear", **BACKBONE)  # sockets are refused in tests
    cache = torch.hub.get_dir()
    os.makedirs(os.path.join(cache, "checkpoints"), exist_ok=True)
    mmseg_head_file(os.path.join(cache, "checkpoints", "dinov2_vits14_voc2012_linear_head.pth"), 384, 21)
    model, _ = model_with_head("voc2012_linear", **BACKBONE)
    assert model.arch["head_layers"] == 1


def test_centred_padding_is_metas_center_padding():
    model = segmentation_model(3, padding="center", **BACKBONE).eval()
    # CenterPadding._get_pad: the smaller half first: left 5, right 6, top 4, bottom 4
    image = torch.ones(1, 1, 20, 31)
    padded = pad_to_patches(image, 14, "center")
    assert padded.shape[-2:] == (28, 42) and torch.equal(padded[..., 4:24, 5:36], image)
    assert padded.sum() == image.sum()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 20, 31)).shape == (1, 3, 20, 31)


@pytest.mark.slow
def test_infer_image_with_a_released_head_and_no_training(tmp_path):
    mmseg_head_file(tmp_path / "voc_ms.pth", 1536, 21)
    cv2.imwrite(str(tmp_path / "photo.jpg"), np.random.default_rng(0).integers(0, 255, (45, 61, 3), dtype=np.uint8))
    result = run_script(
        "infer_image.py",
        "--input",
        tmp_path / "photo.jpg",
        "--head-weights",
        tmp_path / "voc_ms.pth",
        "--source",
        "timm",
        "--no-pretrained",
        "--imgsz",
        "56",
        "42",
        "--out-dir",
        tmp_path / "out",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    mask = Image.open(tmp_path / "out" / "photo_mask.png")
    assert mask.mode == "P" and mask.size == (61, 45) and np.array(mask).max() < 21  # VOC class indices
    neither = run_script("infer_image.py", "--input", tmp_path / "photo.jpg")
    assert neither.returncode == 1 and "give --model CKPT (a model trained here) or --head-weights" in neither.stderr


@pytest.mark.slow
def test_a_one_block_head_trains_end_to_end(tiny_dataset, tmp_path):
    result = run_script(
        "train.py",
        "--data-dir",
        tiny_dataset,
        "--out-dir",
        tmp_path,
        "--epochs",
        "1",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "4",
        "--head-layers",
        "1",
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "best_model_iou.pth", weights_only=True)
    assert checkpoint["model_info"]["arch"]["head_layers"] == 1
    assert checkpoint["model"]["head.classifier.weight"].shape == (21, 384, 1, 1)


@pytest.mark.slow
def test_training_can_start_from_a_released_head(tiny_dataset, tmp_path):
    mmseg_head_file(tmp_path / "voc_ms.pth", 1536, 21)
    flags = ("--data-dir", tiny_dataset, "--epochs", "1", "--imgsz", "56", "42", "--batch", "4", *OFFLINE)
    result = run_script("train.py", *flags, "--out-dir", tmp_path / "run", "--head-weights", tmp_path / "voc_ms.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Head initialised from" in result.stdout
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=True)["model_info"]["arch"]["padding"] == "center"
    mmseg_head_file(tmp_path / "ade.pth", 1536, 150)
    wrong = run_script("train.py", *flags, "--out-dir", tmp_path / "run2", "--head-weights", tmp_path / "ade.pth")
    assert wrong.returncode == 1 and "the head predicts 150 classes but Pascal VOC defaults" in wrong.stderr
