"""DINOv3 backbones as a user meets them: the names, every source (timm, a Meta weights file, a local
hub clone), the errors that name their fix, and the model at sizes that are not multiples of 16.
All offline, on random-init timm DINOv3 ViTs (tests/dinov3_files.py); the scripts are in
test_dinov3_scripts.py."""

import math
import urllib.error

import pytest
import torch

from checkpoint import build_model_from_checkpoint, describe_model
from dinokit.backbones.dinov3 import TimmConvNext, TimmDinov3
from dinokit.backbones.loading import BackboneUnavailableError, load_backbone
from dinokit.data.augmentations import RandomRescale
from dinokit.data.labels import VOC
from dinokit.errors import UserError
from dinokit.prediction.modes import InferenceMode
from dinokit.tasks import get_task
from dinokit.tasks.segmentation import segmentation_model
from dinokit.training.schedules import lr_factor
from model_config import SAT493M_MEAN, canonical_name, get_backbone_spec
from tests.dinov3_files import meta_layout, random_biases, write_hub_dir

TAPS = [8, 9, 10, 11]


def features(backbone, images, taps=TAPS):
    with torch.no_grad():
        return backbone.eval().get_intermediate_layers(images, n=taps, reshape=True)


@pytest.fixture(scope="module")
def vits16():
    torch.manual_seed(0)
    return random_biases(load_backbone("dinov3_vits16", source="timm", pretrained=False)).eval()


@pytest.fixture(scope="module")
def meta_file(vits16, tmp_path_factory):
    """vits16's weights saved as Meta releases them, under the released file name."""
    path = tmp_path_factory.mktemp("weights") / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(meta_layout(vits16), path)
    return path


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    return write_hub_dir(tmp_path_factory.mktemp("dinov3_clone"))


def test_old_and_new_names_describe_the_same_backbones():
    assert canonical_name("small") == "dinov2_vits14" and canonical_name("base", registers=True) == "dinov2_vitb14_reg"
    dinov3 = get_backbone_spec("dinov3_vits16")
    assert (dinov3.patch_size, dinov3.prefix_tokens, dinov3.embed_dim, dinov3.family) == (16, 5, 384, "dinov3")
    assert dinov3.licence == "DINOv3 License" and get_backbone_spec("small").licence == "Apache-2.0"
    assert get_backbone_spec("dinov3_convnext_tiny").head_layers() == (1,)
    assert get_backbone_spec("dinov3_vitl16").normalization("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")[0] == (
        SAT493M_MEAN
    )
    with pytest.raises(ValueError, match="--registers is for DINOv2"):
        get_backbone_spec("dinov3_vits16", registers=True)


@pytest.mark.parametrize("head_layers, channels", [(1, 384), (4, 4 * 384)])
def test_segmentation_at_a_size_that_is_not_a_multiple_of_16(head_layers, channels):
    model = segmentation_model(
        3, backbone="dinov3_vits16", source="timm", pretrained=False, head_layers=head_layers
    ).eval()
    images = torch.randn(2, 3, 90, 120)
    with torch.no_grad():
        assert model.extract_features(images).shape == (2, channels, 6, 8)  # ceil(90/16), ceil(120/16)
        assert model(images).shape == (2, 3, 90, 120)
    assert model.patch_size == 16 and model.feature_shape(90, 120) == (channels, 6, 8)


def test_class_token_and_patches_leave_the_storage_tokens_out(vits16):
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ((patches, cls),) = vits16.get_intermediate_layers(images, n=1, reshape=False, return_class_token=True)
        tokens = vits16.vit.forward_features(images)  # [class, 4 storage, 4x5 patches], final norm applied
    assert tokens.shape[1] == 1 + 4 + 20
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patches, tokens[:, 5:])


def test_a_meta_weights_file_loads_into_timm_exactly(vits16, meta_file):
    loaded = load_backbone("dinov3_vits16", source="timm", weights=meta_file)
    assert isinstance(loaded, TimmDinov3)
    images = torch.randn(1, 3, 80, 112)
    for expected, found in zip(features(vits16, images), features(loaded, images)):
        assert torch.equal(expected, found)  # the query/value biases came through


def test_weights_of_another_backbone_name_the_fix(meta_file, tmp_path):
    with pytest.raises(ValueError, match="width 384 and depth 12.*pass --backbone dinov3_vits16"):
        load_backbone("dinov3_vitb16", source="timm", weights=meta_file)
    dinov2 = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 1370, 384)}, dinov2)
    with pytest.raises(ValueError, match="not a DINOv3 ViT backbone.*a DINOv2 file"):
        load_backbone("dinov3_vits16", source="timm", weights=dinov2)


@pytest.mark.parametrize(
    "given, made",
    [("dinov3_vits16", "dinov3_vits16plus"), ("dinov3_convnext_tiny", "dinov3_convnext_small")],
)
def test_a_sibling_architectures_file_is_named_with_its_backbone(given, made, tmp_path):
    """ViT-S and S+ share width and depth (S+ has a SwiGLU MLP), ConvNeXt tiny and small their width
    and stage count (9 or 27 blocks in stage 3): the file is named for what it is, not by torch's
    "Error(s) in loading state_dict for Eva"."""
    from dinokit.backbones.dinov3 import build_timm
    from tests.dinov3_files import meta_convnext_layout

    other = build_timm(get_backbone_spec(made), pretrained=False)
    path = tmp_path / f"{made}_pretrain_lvd1689m-0000.pth"
    torch.save(meta_convnext_layout(other) if "convnext" in made else meta_layout(other), path)
    with pytest.raises(ValueError, match=f"the weights of {made}, not {given}; pass --backbone {made}"):
        load_backbone(given, source="timm", weights=path)
    assert load_backbone(made, source="timm", weights=path) is not None


def test_the_hub_source_asks_for_the_gated_weights():
    with pytest.raises(UserError) as excinfo:
        load_backbone("dinov3_vits16", source="hub")
    message = str(excinfo.value)
    assert "needs --weights" in message and "request access" in message and "--source timm" in message
    assert "\n" not in message


def test_a_local_clone_loads_the_file_as_meta_code_does(hub_dir, vits16, meta_file):
    via_hub = load_backbone("dinov3_vits16", hub_dir=hub_dir, weights=meta_file)
    images = torch.randn(1, 3, 64, 64)
    for expected, found in zip(features(vits16, images), features(via_hub, images)):
        assert torch.equal(expected, found)
    random_init = load_backbone("dinov3_vits16", hub_dir=hub_dir, pretrained=False)
    assert random_init.patch_size == 16


def test_a_renamed_vitl_file_is_explained_before_loading(hub_dir, tmp_path):
    with pytest.raises(ValueError, match="rename the file back to dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"):
        load_backbone("dinov3_vitl16", hub_dir=hub_dir, weights=tmp_path / "vitl.pth")


def test_an_expired_signed_url_asks_for_a_new_link(monkeypatch):
    def forbidden(*args, **kwargs):
        raise urllib.error.HTTPError("https://dinov3.llamameta.net/x.pth?Policy=...", 403, "Forbidden", {}, None)

    monkeypatch.setattr(torch.hub, "load", forbidden)
    with pytest.raises(BackboneUnavailableError, match="403.*expire.*request a new link"):
        load_backbone("dinov3_vits16", weights="https://dinov3.llamameta.net/dinov3_vits16.pth?Policy=abc")


def test_convnext_feeds_the_head_from_its_last_stage():
    with pytest.raises(UserError, match="use --head-layers 1"):
        segmentation_model(3, backbone="dinov3_convnext_tiny", source="timm", pretrained=False, head_layers=4)
    model = segmentation_model(
        3, backbone="dinov3_convnext_tiny", source="timm", pretrained=False, head_layers=1
    ).eval()
    assert isinstance(model.backbone, TimmConvNext)
    with torch.no_grad():
        assert model.extract_features(torch.randn(1, 3, 90, 120)).shape == (1, 768, 3, 4)  # stride 32


def test_a_hub_trained_checkpoint_rebuilds_offline_from_timm():
    """A run on Meta's hub code saves Meta's parameter names; without that code (sockets are refused
    here) the checkpoint is rebuilt with timm and the keys converted: the same predictions."""
    torch.manual_seed(1)
    model = segmentation_model(3, backbone="dinov3_vits16", source="timm", pretrained=False).eval()
    random_biases(model.backbone)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    state.update({f"backbone.{k}": v for k, v in meta_layout(model.backbone).items()})
    info = describe_model(get_task("segmentation"), model, VOC, (64, 48))
    info["arch"]["source"] = "hub"
    rebuilt = build_model_from_checkpoint({"model": state, "model_info": info})
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))
    assert info["patch_size"] == 16 and info["prefix_tokens"] == 5 and info["licence"] == "DINOv3 License"


def test_inference_sizes_follow_the_patch_size():
    mode = InferenceMode(imgsz=(640, 640)).for_patch(16)
    assert mode.imgsz == (640, 640) and InferenceMode(imgsz=(640, 640)).for_patch(14).imgsz == (644, 644)
    assert InferenceMode("slide").for_patch(16).crop == 512 and InferenceMode("slide").for_patch(14).crop == 518


def test_dinov3_schedule_is_metas_warmup_one_cycle():
    """WarmupOneCycleLR(pct_start=0, final_div_factor=inf, warmup_ratio=1e-6), written out from
    dinov3/eval/segmentation/schedulers.py for 100 steps with 10 of warmup."""
    total, warmup = 100, 10
    assert lr_factor("onecycle", 0, total, warmup) == pytest.approx(1e-6)
    k = (1 - 5 / warmup) * (1 - 1e-6)  # Meta's warmup, times its linear decay
    assert lr_factor("onecycle", 5, total, warmup) == pytest.approx((1 - k) * (1 - 5 / total))
    assert lr_factor("onecycle", 10, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / total)))
    assert lr_factor("onecycle", total - 1, total, warmup) == pytest.approx(0.0, abs=1e-12)


def test_dinov3_rescale_sets_the_short_side_without_capping_the_long_one():
    rescale = RandomRescale(512, (2.0, 2.0), long_side_cap=False)
    image = torch.zeros(100, 1000, 3).numpy()
    size = rescale.get_params_dependent_on_data({}, {"image": image})["size"]
    assert size == (10240, 1024)  # mmseg's cap would have stopped the long side at 4 x 1024
