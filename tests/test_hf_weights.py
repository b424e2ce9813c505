"""Backbone weights in Hugging Face's layout (dinokit/backbones/hf_weights.py): random-init
transformers models built offline and saved with save_pretrained load through the toolkit's path and
give transformers' features; every file form a snapshot comes in; partial, cut and mismatched
snapshots refused in one line; `--source hf` offline says what to do."""

from pathlib import Path

import pytest
import torch

from dinokit.backbones.hf_weights import HfWeightsError
from dinokit.backbones.loading import BackboneUnavailableError, load_backbone
from model_config import BACKBONES
from tests.conftest import SMALL, one_line_error, run_script

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def snapshot(model, folder: Path) -> Path:
    """`model` with its weights moved off init values, saved as transformers saves it."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    transformers.utils.logging.disable_progress_bar()
    model.eval().save_pretrained(folder)
    return folder


def dinov2(registers=False):
    kind = "Dinov2WithRegisters" if registers else "Dinov2"
    config = getattr(transformers, f"{kind}Config")(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14
    )
    return getattr(transformers, f"{kind}Model")(config)


def dinov3_vit(gated=False):
    config = transformers.DINOv3ViTConfig(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_register_tokens=4,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
    )
    return transformers.DINOv3ViTModel(config)


def convnext_tiny():
    return transformers.DINOv3ConvNextModel(
        transformers.DINOv3ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
    )


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(ours, theirs, images, prefix):
    """Our last block's patch tokens (final norm) against transformers' last hidden state."""
    with torch.no_grad():
        expected = theirs(pixel_values=images).last_hidden_state[:, prefix:]
        (tokens,) = ours.get_intermediate_layers(images, n=1, norm=True, reshape=True)
    return relative(tokens.flatten(2).transpose(1, 2), expected)


CASES = {
    # name: (transformers model, --backbone, registers, prefix tokens, sizes)
    "dinov2": (dinov2, "small", False, 1, [(518, 518)]),
    "dinov2-registers": (lambda: dinov2(True), "small", True, 5, [(518, 518)]),
    "dinov3-s16": (dinov3_vit, "dinov3_vits16", False, 5, [(224, 224), (192, 320)]),
    "dinov3-s16plus-swiglu": (lambda: dinov3_vit(True), "dinov3_vits16plus", False, 5, [(224, 224), (192, 320)]),
    "dinov3-convnext-tiny": (convnext_tiny, "dinov3_convnext_tiny", False, 1, [(224, 224), (192, 320)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_snapshot_gives_transformers_features(case, tmp_path):
    """≤ 1e-5 relative. DINOv2 only at 518x518, its position embeddings' own grid: off it,
    transformers resizes them to the target size (`size=`) and Meta's code by the scale factor
    (grid + 0.1) / 37, which the toolkit follows (docs/backbones.md gives the difference)."""
    build, name, registers, prefix, sizes = CASES[case]
    theirs = build()
    folder = snapshot(theirs, tmp_path / "snapshot")
    ours = load_backbone(name, registers=registers, source="timm", weights=folder).eval()
    for height, width in sizes:
        images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
        assert compare(ours, theirs, images, prefix) <= 1e-5, (height, width)


def test_dinov2_off_its_grid_follows_meta_not_transformers(tmp_path):
    """Off 518x518 transformers resizes DINOv2's position embeddings to the target grid, Meta's code
    (and ours) by (grid + 0.1) / 37: the features differ, by the figure docs/backbones.md gives."""
    theirs = dinov2()
    ours = load_backbone("small", source="timm", weights=snapshot(theirs, tmp_path / "snapshot")).eval()
    images = torch.randn(1, 3, 224, 308, generator=torch.Generator().manual_seed(1))
    difference = compare(ours, theirs, images, 1)
    print(f"DINOv2 ViT-S/14 at 224x308, ours (Meta's interpolation) vs transformers: {100 * difference:.1f} %")
    assert 1e-3 < difference < 0.1


def test_every_file_form_of_a_snapshot_loads_the_same_weights(tmp_path):
    theirs = dinov3_vit()
    folder = snapshot(theirs, tmp_path / "whole")
    sharded = tmp_path / "sharded"
    theirs.save_pretrained(sharded, max_shard_size="30MB")  # the same weights in shards
    assert (sharded / "model.safetensors.index.json").is_file()
    torch.save(safetensors_torch.load_file(str(folder / "model.safetensors")), tmp_path / "pytorch_model.bin")
    reference = load_backbone("dinov3_vits16", source="timm", weights=folder).state_dict()
    for form in (
        folder / "model.safetensors",
        sharded,
        sharded / "model.safetensors.index.json",
        tmp_path / "pytorch_model.bin",
    ):
        state = load_backbone("dinov3_vits16", source="timm", weights=form).state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items()), form


def test_meta_hub_code_takes_a_snapshot_too(tmp_path):
    """DINOv2 from Meta's own model code (a local hub directory) with the snapshot as --weights."""
    pytest.importorskip("dinov2")
    from tests.test_backbones import HUBCONF

    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "hubconf.py").write_text(HUBCONF)
    theirs = dinov2()
    folder = snapshot(theirs, tmp_path / "snapshot")
    ours = load_backbone("small", source="local", hub_dir=tmp_path / "hub", weights=folder).eval()
    images = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    assert compare(ours, theirs, images, 1) <= 1e-5


def test_a_snapshot_missing_half_its_tensors_is_refused_naming_how_many(tmp_path):
    folder = snapshot(dinov2(), tmp_path / "snapshot")
    state = safetensors_torch.load_file(str(folder / "model.safetensors"))
    kept = dict(list(state.items())[: len(state) // 2])
    safetensors_torch.save_file(kept, str(folder / "model.safetensors"))
    with pytest.raises(HfWeightsError) as error:
        load_backbone("small", source="timm", weights=folder)
    message = str(error.value)
    assert "tensors a dinov2 backbone needs are not in the file" in message and "nothing was loaded" in message
    assert "\n" not in message


def test_a_cut_file_and_a_snapshot_of_another_family_or_size_are_refused(tmp_path):
    folder = snapshot(dinov2(), tmp_path / "snapshot")
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HfWeightsError, match="not a readable safetensors file"):
        load_backbone("small", source="timm", weights=tmp_path / "cut")
    with pytest.raises(HfWeightsError, match="a transformers dinov2 snapshot .* but the backbone is a dinov3 one"):
        load_backbone("dinov3_vits16", source="timm", weights=folder)
    with pytest.raises(ValueError, match="embed dim 384 and 12 blocks, but the model is dinov2_vitb14"):
        load_backbone("base", source="timm", weights=folder)


def test_source_hf_offline_says_which_local_ways_to_use(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailableError) as error:
        load_backbone("small", source="hf")
    assert "facebook/dinov2-small" in str(error.value) and "--weights FOLDER" in str(error.value)


def test_every_backbone_names_its_hugging_face_repository():
    repos = {spec.hub_name: spec.hf_repo for spec in BACKBONES.values()}
    assert repos["dinov2_vits14"] == "facebook/dinov2-small"
    assert repos["dinov2_vitg14_reg"] == "facebook/dinov2-with-registers-giant"
    assert repos["dinov3_vits16plus"] == "facebook/dinov3-vits16plus-pretrain-lvd1689m"
    assert repos["dinov3_convnext_tiny"] == "facebook/dinov3-convnext-tiny-pretrain-lvd1689m"


@pytest.mark.slow
def test_train_takes_a_snapshot_as_weights_and_refuses_a_partial_one(tiny_dataset, tmp_path):
    folder = snapshot(dinov2(), tmp_path / "snapshot")
    flags = ("--data-dir", tiny_dataset, "--epochs", "1", *SMALL, "--source", "timm", "--workers", "0")
    result = run_script("train.py", *flags, "--weights", folder, "--out-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    state = safetensors_torch.load_file(str(folder / "model.safetensors"))
    state.pop("layernorm.weight")
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    result = run_script("train.py", *flags, "--weights", folder, "--out-dir", tmp_path / "refused")
    one_line_error(result, "model.safetensors", "1 tensors a dinov2 backbone needs are not in the file")
    assert not (tmp_path / "refused").exists()


def test_a_snapshot_folder_is_an_index_weights_identity_that_notices_a_replaced_shard(tmp_path):
    """retrieve.py / classify.py record the weights they embedded with by content: a folder too."""
    from dinokit.backbones.weights_file import WeightsChangedError, check_weights_unchanged, weights_identity

    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    safetensors_torch.save_file({"a": torch.zeros(3)}, str(folder / "model.safetensors"))
    identity = weights_identity(folder)
    check_weights_unchanged(identity, "the index was embedded", "retrieve.py index ...")
    safetensors_torch.save_file({"a": torch.ones(3)}, str(folder / "model.safetensors"))
    with pytest.raises(WeightsChangedError, match="has changed since"):
        check_weights_unchanged(identity, "the index was embedded", "retrieve.py index ...")
