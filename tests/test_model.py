import sys
import urllib.error

import pytest
import torch

import bench
from cli import run_cli
from dinokit.backbones.loading import BackboneUnavailableError, load_backbone
from dinokit.tasks.segmentation import segmentation_model
from dinokit.tasks.segmentation.scoring import pixel_cross_entropy
from model_config import SIZES, get_backbone_spec
from tests.conftest import run_script


def make_model(num_classes=21, fine_tune=False, seed=0):
    torch.manual_seed(seed)
    return segmentation_model(num_classes, fine_tune=fine_tune, source="timm", pretrained=False)


@pytest.mark.parametrize("num_classes, height, width", [(21, 112, 112), (3, 98, 154), (11, 90, 120), (1, 33, 17)])
def test_logits_have_input_size_for_any_size_and_class_count(num_classes, height, width):
    model = make_model(num_classes).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, height, width))
    assert logits.shape == (2, num_classes, height, width)
    assert torch.isfinite(logits).all()


def test_backbone_contract_gives_four_normed_patch_maps():
    backbone = load_backbone("small", source="timm", pretrained=False).eval()
    spec = get_backbone_spec("small")
    with torch.no_grad():
        maps = backbone.get_intermediate_layers(torch.randn(1, 3, 56, 84), n=list(spec.out_indices), reshape=True)
    assert len(maps) == 4 and all(m.shape == (1, 384, 4, 6) for m in maps)
    # The final LayerNorm is applied (as the torch.hub model does): at init each token has mean 0, std 1.
    tokens = maps[-1].flatten(2)
    assert tokens.mean(1).abs().max() < 1e-4
    assert (tokens.std(1, unbiased=False) - 1).abs().max() < 1e-2


def test_backbone_table_covers_all_sizes_and_registers():
    assert SIZES == ("small", "base", "large", "giant")
    assert get_backbone_spec("giant").out_indices == (36, 37, 38, 39)
    assert get_backbone_spec("large", registers=True).hub_name == "dinov2_vitl14_reg"
    assert get_backbone_spec("base", registers=True).timm_pretrained == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert get_backbone_spec("small").head_in_channels == 4 * 384


def _one_training_step(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    images, target = torch.randn(2, 3, 56, 56), torch.randint(0, 21, (2, 56, 56))
    loss, _ = pixel_cross_entropy(model(images), target, 255)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_frozen_backbone_is_bit_identical_after_a_step_while_head_learns():
    model = make_model()
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    _one_training_step(model)
    assert not model.backbone.training  # model.train() keeps a frozen backbone in eval mode
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert not torch.equal(head_before["classifier.weight"], model.head.classifier.weight)
    assert model.extract_features(torch.randn(1, 3, 28, 28)).grad_fn is None  # no graph through the backbone


def test_fine_tune_changes_backbone_weights():
    model = make_model(fine_tune=True)
    before = model.backbone.vit.blocks[0].attn.qkv.weight.clone()
    _one_training_step(model)
    assert model.backbone.training
    assert not torch.equal(before, model.backbone.vit.blocks[0].attn.qkv.weight)


def test_offline_hub_failure_is_one_clear_line(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(BackboneUnavailableError) as excinfo:
        load_backbone("small", source="hub")
    message = str(excinfo.value)
    assert "\n" not in message and "dinov2_vits14" in message and "--weights" in message
    monkeypatch.setattr(sys, "argv", ["bench.py", "--summary", "--source", "hub", "--backbone", "small"])
    with pytest.raises(SystemExit) as exit_info:  # a script turns it into a one-line exit
        run_cli(bench.main, bench.get_args_parser())
    assert str(exit_info.value).startswith("error: could not load dinov2_vits14 from torch.hub")


@pytest.mark.slow
def test_bench_prints_the_model_summary():
    result = run_script("bench.py", "--summary", "--imgsz", "224", "224")
    assert result.returncode == 0, result.stderr
    assert "DenseModel" in result.stdout and "LinearHead" in result.stdout
    assert "Trainable params: 35,349" in result.stdout
