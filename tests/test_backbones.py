"""Every way a user gets a backbone: torch.hub cached, a local dinov2 clone, Meta's .pth through
--weights with each source, and the errors when the pieces don't fit. All offline: the hub code
is Meta's own DINOv2 model (the `dinov2` package) behind a hubconf.py written like Meta's."""

import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from dinov2.models import vision_transformer  # Meta's model code (make test installs it)

from checkpoint import build_model_from_checkpoint, load_checkpoint
from dinokit.backbones.loading import BackboneUnavailableError, TimmDinov2, load_backbone
from tests.conftest import run_script

OUT_INDICES = [8, 9, 10, 11]
# Mirrors facebookresearch/dinov2's hubconf: build the ViT, then fetch the released weights by URL
# through torch.hub's checkpoint cache.
HUBCONF = textwrap.dedent("""
    dependencies = ["torch"]
    import torch
    from dinov2.models.vision_transformer import vit_base, vit_small

    _BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"

    def _make(arch, name, pretrained):
        model = arch(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
        if pretrained:
            url = f"{_BASE_URL}/{name}/{name}_pretrain.pth"
            model.load_state_dict(torch.hub.load_state_dict_from_url(url, map_location="cpu"))
        return model

    def dinov2_vits14(*, pretrained=True, **kwargs):
        return _make(vit_small, "dinov2_vits14", pretrained)

    def dinov2_vitb14(*, pretrained=True, **kwargs):
        return _make(vit_base, "dinov2_vitb14", pretrained)
""")


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2_clone")
    (path / "hubconf.py").write_text(HUBCONF)
    return path


@pytest.fixture(scope="module")
def meta_backbone():
    torch.manual_seed(0)
    return vision_transformer.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()


@pytest.fixture(scope="module")
def meta_weights(meta_backbone, tmp_path_factory):
    """A random-init ViT-S/14 saved exactly as Meta releases dinov2_vits14_pretrain.pth (its state dict)."""
    path = tmp_path_factory.mktemp("weights") / "dinov2_vits14_pretrain.pth"
    torch.save(meta_backbone.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_518():
    return torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))


def features(backbone, images):
    with torch.no_grad():
        return backbone.eval().get_intermediate_layers(images, n=OUT_INDICES, reshape=True)


def test_local_hub_dir_runs_meta_code(hub_dir):
    backbone = load_backbone("small", source="local", hub_dir=hub_dir, pretrained=False)
    assert type(backbone).__name__ == "DinoVisionTransformer"
    maps = features(backbone, torch.randn(1, 3, 56, 70))
    assert [tuple(m.shape) for m in maps] == [(1, 384, 4, 5)] * 4


@pytest.mark.slow
def test_official_weights_give_the_same_features_from_every_source(hub_dir, meta_backbone, meta_weights, image_518):
    reference = features(meta_backbone, image_518)
    via_hub_code = features(load_backbone("small", source="local", hub_dir=hub_dir, weights=meta_weights), image_518)
    via_timm = load_backbone("small", source="timm", weights=meta_weights)
    assert isinstance(via_timm, TimmDinov2)
    for ref, hub, timm_map in zip(reference, via_hub_code, features(via_timm, image_518)):
        assert torch.equal(ref, hub)
        # timm converts Meta's keys; at 518 px no position-embedding interpolation happens, so the
        # only difference is the attention kernel's rounding.
        torch.testing.assert_close(timm_map, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("height, width", [(224, 224), (644, 644), (224, 308), (98, 126), (518, 518)])
def test_timm_features_equal_the_hub_features_at_every_size(meta_backbone, meta_weights, height, width):
    # Meta's code interpolates the position embeddings its own way; the timm source must match it
    # (heads are trained on hub features, and hub-trained checkpoints are rebuilt with timm offline).
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(2))
    via_timm = load_backbone("small", source="timm", weights=meta_weights)
    for ref, timm_map in zip(features(meta_backbone, images), features(via_timm, images)):
        relative = ((timm_map - ref).norm() / ref.norm()).item()
        assert relative <= 1e-5, f"{height}x{width}: {relative:.2e}"


def test_complete_hub_cache_loads_pretrained_weights_without_network(
    hub_dir, meta_weights, meta_backbone, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    shutil.copytree(hub_dir, tmp_path / "hub" / "facebookresearch_dinov2_main")
    (tmp_path / "hub" / "checkpoints").mkdir()
    shutil.copy(meta_weights, tmp_path / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth")
    # Sockets are refused in every test (conftest): any network call would fail this load.
    backbone = load_backbone("small", source="hub", pretrained=True)
    state = backbone.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in meta_backbone.state_dict().items())


def test_no_network_and_no_cache_is_one_line_listing_the_offline_ways():
    with pytest.raises(BackboneUnavailableError) as excinfo:
        load_backbone("small", source="hub")
    message = str(excinfo.value)
    assert "\n" not in message
    for way in ("torch.hub cache", "--hub-dir", "--source timm --weights"):
        assert way in message


def test_hub_dir_without_hubconf_is_explained(tmp_path):
    with pytest.raises(BackboneUnavailableError, match="not a torch.hub directory"):
        load_backbone("small", source="local", hub_dir=tmp_path)


def test_weights_of_another_size_name_the_field(meta_weights):
    with pytest.raises(
        ValueError, match=r"embed dim 384 and 12 blocks, but the model is dinov2_vitb14 .*pass --backbone dinov2_vits14"
    ):
        load_backbone("base", source="timm", weights=meta_weights)


def test_register_mismatch_names_the_flag(meta_backbone, meta_weights, tmp_path):
    with_registers = tmp_path / "reg.pth"
    torch.save(dict(meta_backbone.state_dict(), register_tokens=torch.zeros(1, 4, 384)), with_registers)
    with pytest.raises(
        ValueError, match="weights with register tokens but the model is dinov2_vits14; add --registers"
    ):
        load_backbone("small", source="timm", weights=with_registers)
    with pytest.raises(
        ValueError, match="weights without register tokens but the model is dinov2_vits14_reg; drop --registers"
    ):
        load_backbone("small", registers=True, source="timm", weights=meta_weights)


def test_segmentation_checkpoint_given_as_weights_is_explained(trained_run):
    with pytest.raises(ValueError, match="is a training checkpoint, not backbone weights; it goes to --model of"):
        load_backbone("small", source="timm", weights=trained_run[0] / "best_model_iou.pth")


@pytest.fixture(scope="module")
def hub_trained_checkpoint(hub_dir, meta_weights, tiny_dataset, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hub_run")
    result = run_script(
        "train.py",
        "--hub-dir",
        hub_dir,
        "--weights",
        meta_weights,
        "--data-dir",
        tiny_dataset,
        "--epochs",
        "1",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "4",
        "--workers",
        "0",
        "--out-dir",
        out_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir / "final_model.pth"


@pytest.mark.slow
def test_train_py_with_a_local_clone_and_official_weights(hub_trained_checkpoint, hub_dir):
    info = load_checkpoint(hub_trained_checkpoint)["model_info"]
    assert info["arch"]["source"] == "local" and info["hub_dir"] == str(hub_dir)


@pytest.mark.slow
def test_checkpoint_rebuilds_with_timm_when_the_hub_code_is_gone(
    hub_trained_checkpoint, hub_dir, image_518, tmp_path, capsys
):
    checkpoint = load_checkpoint(hub_trained_checkpoint)
    with torch.no_grad():
        expected = build_model_from_checkpoint(checkpoint)(image_518)
    checkpoint["model_info"]["hub_dir"] = str(tmp_path / "moved_away")
    model = build_model_from_checkpoint(checkpoint)
    assert isinstance(model.backbone, TimmDinov2)
    assert "rebuilding the same architecture with timm" in capsys.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(model(image_518), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_the_model_summary_takes_a_hub_dir(hub_dir):
    result = run_script("bench.py", "--summary", "--hub-dir", hub_dir, "--imgsz", "224", "224")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DinoVisionTransformer" in result.stdout


@pytest.mark.slow
def test_a_checkpoint_of_meta_code_exports_through_timm(hub_trained_checkpoint, tmp_path):
    """export.py traces timm's code with the keys converted and checks the file against Meta's own model."""
    pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
    result = run_script("export.py", "--model", hub_trained_checkpoint, "--out", tmp_path / "hub.onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "check passed" in result.stdout and (tmp_path / "hub.onnx").is_file()


def test_one_environment_setting_gives_every_script_its_backbone(tmp_path, monkeypatch):
    """Offline use is set up once: DINOKIT_WEIGHTS_DIR (Meta's files under their names) and
    DINOKIT_SOURCE fill the backbone flags a command leaves out; flags given still win."""
    import classify
    import retrieve
    from dinokit.backbones.settings import apply_backbone_settings, weights_in_folder
    from dinokit.errors import UserError

    for name in (
        "dinov2_vits14_pretrain.pth",
        "dinov2_vits14_reg4_pretrain.pth",
        "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    ):
        (tmp_path / name).write_bytes(b"x")
    assert weights_in_folder(tmp_path, "dinov2_vits14").name == "dinov2_vits14_pretrain.pth"
    assert weights_in_folder(tmp_path, "dinov2_vits14_reg").name == "dinov2_vits14_reg4_pretrain.pth"
    assert weights_in_folder(tmp_path, "dinov3_vits16").name.startswith("dinov3_vits16_pretrain_lvd1689m")
    with pytest.raises(
        UserError, match=r"no weights file for dinov2_vitb14 in it \(looked for dinov2_vitb14_pretrain.pth\)"
    ):
        weights_in_folder(tmp_path, "dinov2_vitb14")

    monkeypatch.setenv("DINOKIT_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("DINOKIT_SOURCE", "timm")
    args = retrieve.get_args_parser().parse_args(["index", "--images", "x", "--index", "i", "--registers"])
    apply_backbone_settings(args)
    assert (args.source, Path(args.weights).name) == ("timm", "dinov2_vits14_reg4_pretrain.pth")
    args = classify.get_args_parser().parse_args(["--source", "hub", "--weights", "mine.pth", "--backbone", "base"])
    apply_backbone_settings(args)
    assert (args.source, args.weights) == ("hub", "mine.pth")  # what the command line says
    args = classify.get_args_parser().parse_args(["--no-pretrained"])
    apply_backbone_settings(args)
    assert args.weights is None  # a random-init run takes no file
    monkeypatch.setenv("DINOKIT_SOURCE", "pip")
    with pytest.raises(UserError, match="DINOKIT_SOURCE=pip: must be one of hub, timm, local"):
        apply_backbone_settings(classify.get_args_parser().parse_args([]))  # the parser reads it when built


def test_the_offline_error_names_the_one_setting():
    from dinokit.backbones.loading import offline_hint
    from model_config import get_backbone_spec

    for name in ("dinov2_vits14", "dinov3_vits16"):
        assert "DINOKIT_WEIGHTS_DIR=" in offline_hint(get_backbone_spec(name))
