"""pretrain.py's rules as units: the backbone file it writes is Meta's layout (read back exactly by
every source), the losses and the centring do what DINOv2's do, an epoch's batches and views
depend on (seed, epoch) only, the schedules and parameter groups follow the paper's recipe."""

import argparse
import math

import numpy as np
import pytest
import torch

from dinokit.backbones.loading import load_backbone
from dinokit.backbones.meta_layout import meta_state
from dinokit.data.synthetic import make_shape_folders
from dinokit.pretraining.crops import (
    Batch,
    EpochOrder,
    ImagesError,
    MultiCrop,
    UnlabelledImages,
    block_mask,
    collate,
    list_unlabelled_images,
    local_crop_size,
)
from dinokit.pretraining.losses import dino_loss, gram_loss, ibot_loss, koleo_loss, patch_targets, sinkhorn_knopp
from dinokit.pretraining.methods import FeatureDistillation, SelfDistillation
from dinokit.pretraining.networks import TokenBackbone
from dinokit.pretraining.recipe import (
    PretrainConfig,
    layer_of,
    parameter_groups,
    schedule_at,
)


def perturbed(name, registers=False):
    """A random-init backbone whose every tensor differs from its init (zeros and ones included)."""
    torch.manual_seed(0)
    backbone = load_backbone(name, registers=registers, source="timm", pretrained=False).eval()
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return backbone


@pytest.mark.parametrize(
    "name, registers",
    [
        ("dinov2_vits14", False),
        ("dinov2_vits14", True),
        ("dinov3_vits16", False),
        ("dinov3_vits16plus", False),
        ("dinov3_convnext_tiny", False),
    ],
)
def test_written_backbone_loads_back_with_the_same_features(name, registers, tmp_path):
    backbone = perturbed(name, registers)
    path = tmp_path / "backbone.pth"
    torch.save(meta_state(backbone), path)
    loaded = load_backbone(name, registers=registers, source="timm", weights=path).eval()
    images = torch.randn(2, 3, 112, 224)
    with torch.no_grad():
        ((ours, our_cls),) = backbone.get_intermediate_layers(images, n=1, return_class_token=True)
        ((theirs, their_cls),) = loaded.get_intermediate_layers(images, n=1, return_class_token=True)
    assert torch.equal(ours, theirs) and torch.equal(our_cls, their_cls)


def test_written_vit_file_has_metas_names_and_the_ibot_mask_token():
    backbone = TokenBackbone(perturbed("dinov3_vits16"))
    with torch.no_grad():
        backbone.mask_token.fill_(0.5)
    state = backbone.meta_state()
    assert {"storage_tokens", "cls_token", "mask_token", "rope_embed.periods", "blocks.0.ls1.gamma"} <= set(state)
    assert torch.all(state["mask_token"] == 0.5)
    assert not any(name.startswith(("reg_token", "rope.")) or "gamma_1" in name for name in state)


@pytest.mark.parametrize("name, side", [("dinov2_vits14", 56), ("dinov3_vits16", 64)])
def test_token_backbone_gives_the_tokens_other_scripts_read_and_masks_change_only_with_the_mask(name, side):
    wrapped = TokenBackbone(perturbed(name)).eval()
    images = torch.randn(2, 3, side, side)
    with torch.no_grad():
        cls, patches = wrapped(images)
        ((reference, reference_cls),) = wrapped.backbone.get_intermediate_layers(images, n=1, return_class_token=True)
        masks = torch.zeros(2, 4, 4, dtype=torch.bool)
        unmasked = wrapped(images, masks)[1]
        masks[0, 1, 2] = True
        masked = wrapped(images, masks)[1]
    assert torch.allclose(cls, reference_cls, atol=1e-5) and torch.allclose(patches, reference, atol=1e-5)
    assert torch.equal(unmasked, patches)
    assert not torch.allclose(masked[0], patches[0]) and torch.allclose(masked[1], patches[1])


# -- losses -------------------------------------------------------------------------------------


def test_sinkhorn_targets_are_distributions_with_uniform_prototype_marginals():
    logits = torch.randn(64, 16) * 0.3 + torch.linspace(0, 1, 16)  # a teacher that prefers the last prototypes
    targets = sinkhorn_knopp(logits, temperature=0.1, iterations=20)
    assert torch.allclose(targets.sum(1), torch.ones(64), atol=1e-4)
    assert torch.allclose(targets.sum(0), torch.full((16,), 64 / 16), atol=1e-2)


def test_dino_loss_pairs_each_student_crop_with_the_other_global_view_and_every_local_one():
    batch, prototypes = 3, 5
    teacher = torch.softmax(torch.randn(2 * batch, prototypes), -1)
    student_global, student_local = torch.randn(2 * batch, prototypes), torch.randn(4 * batch, prototypes)
    ce = lambda s, t: -(t * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()  # noqa: E731
    sg, sl, t = student_global.chunk(2), student_local.chunk(4), teacher.chunk(2)
    expected = ce(sg[0], t[1]) + ce(sg[1], t[0]) + sum(ce(s, tt) for s in sl for tt in t)
    assert torch.allclose(dino_loss(student_global, student_local, teacher, batch), expected / (2 + 8))


def test_ibot_loss_weighs_every_masked_crop_alike_whatever_its_masked_count():
    masks = torch.zeros(2, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = True  # crop 0: one masked patch; crop 1: three
    masks[1, 0, :] = masks[1, 1, 0] = True
    teacher = torch.tensor([[1.0, 0.0]] * 4)
    student = torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 10.0], [0.0, 10.0]])  # crop 0 right, crop 1 wrong
    per_patch = -torch.log_softmax(student / 0.1, -1)[:, 0]
    assert torch.allclose(ibot_loss(student, teacher, masks), (per_patch[0] + per_patch[1:].mean()) / 2)


def test_koleo_rewards_spread_features():
    clustered = torch.randn(1, 8) + 0.01 * torch.randn(16, 8)
    spread = torch.randn(16, 8)
    assert koleo_loss(spread) < koleo_loss(clustered)


def test_gram_loss_compares_patch_similarities_not_scale():
    patches = torch.randn(2, 9, 16)
    assert gram_loss(patches * 3.0, patches) < 1e-10
    assert gram_loss(torch.randn(2, 9, 16), patches) > 0.01


def test_teacher_patch_targets_are_resampled_to_the_student_grid():
    grid = torch.arange(4.0).reshape(1, 2, 2, 1).expand(1, 2, 2, 3).reshape(1, 4, 3)
    assert patch_targets(grid, (2, 2), (2, 2)) is grid
    assert patch_targets(grid, (2, 2), (4, 4)).shape == (1, 16, 3)


# -- data ---------------------------------------------------------------------------------------


def test_images_are_found_at_any_depth_hidden_ones_and_other_files_left_out(tmp_path):
    make_shape_folders(tmp_path / "set", per_class=1, val_per_class=0, size=32)
    (tmp_path / "set" / "notes.txt").write_text("x")
    (tmp_path / "set" / ".cache").mkdir()
    (tmp_path / "set" / ".cache" / "thumb.png").write_bytes(
        (tmp_path / "set/train/circle/circle_0000.png").read_bytes()
    )
    files, others = list_unlabelled_images([tmp_path / "set"])
    assert len(files) == 4 and others == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImagesError, match="empty: no image files"):
        list_unlabelled_images([tmp_path / "set", tmp_path / "empty"])


def test_block_masks_cover_exactly_the_drawn_share():
    rng = np.random.default_rng(0)
    for masked in (1, 5, 20, 40):
        assert block_mask((7, 7), masked, rng).sum() == masked


def test_an_epochs_batches_depend_on_seed_and_epoch_and_processes_split_them():
    one = EpochOrder(20, 3, seed=1)
    one.set_epoch(2)
    batches = list(one)
    assert batches == list(one) and len(batches) == 6
    one.set_epoch(3)
    assert list(one) != batches
    one.set_epoch(2, start=4)
    assert list(one) == batches[4:]
    ranks = [EpochOrder(20, 3, seed=1, world=2, rank=r) for r in (0, 1)]
    for order in ranks:
        order.set_epoch(2)
    first, second = (list(order) for order in ranks)
    assert len(first) == 3 and not {i for b in first for i, _ in b} & {i for b in second for i, _ in b}


def test_an_images_views_depend_on_its_seed_only_and_leave_the_main_generators_alone(tmp_path):
    make_shape_folders(tmp_path, per_class=1, val_per_class=0, size=40)
    files, _ = list_unlabelled_images([tmp_path])
    dataset = UnlabelledImages(files, MultiCrop(28, local_crop_size(28, 14), 2, (0.5,) * 3, (0.2,) * 3), (2, 2))
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    first = dataset[(1, 77)][1]
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(6)
    again = dataset[(1, 77)][1]
    assert torch.equal(first.global_crops, again.global_crops) and torch.equal(first.masks, again.masks)
    assert first.global_crops.shape == (2, 3, 28, 28) and first.local_crops.shape == (2, 3, 14, 14)
    batch = collate([dataset[(0, 1)], dataset[(1, 2)], (2, None)])
    assert batch.global_crops.shape == (4, 3, 28, 28) and batch.unreadable == 1 and batch.indices == [0, 1]
    assert torch.equal(batch.global_crops[1], dataset[(1, 2)][1].global_crops[0])  # crop-major: first crops first


# -- recipe -------------------------------------------------------------------------------------


def test_schedules_warm_up_then_decay_and_the_teacher_ends_frozen():
    config = PretrainConfig(epochs=10, batch=1024, warmup_epochs=2, teacher_temp_epochs=4, freeze_prototypes_epochs=1)
    at = lambda step: schedule_at(config, step, steps_per_epoch=10)  # noqa: E731
    assert at(0).lr == 0 and math.isclose(at(10).lr, config.lr / 2) and math.isclose(at(20).lr, config.lr)
    assert math.isclose(at(100).lr, config.min_lr) and at(100).momentum == 1.0 and at(0).momentum == config.momentum
    assert at(0).teacher_temp == config.warmup_teacher_temp and at(40).teacher_temp == config.teacher_temp
    assert at(9).prototypes_frozen and not at(10).prototypes_frozen
    assert math.isclose(at(0).weight_decay, 0.04) and math.isclose(at(100).weight_decay, 0.4)


def test_the_rate_scales_with_the_square_root_of_the_global_batch():
    assert math.isclose(PretrainConfig(lr=0.004, batch=64, world=4).lr_at_batch, 0.004 * math.sqrt(256 / 1024))


def test_layer_decay_lowers_early_blocks_and_no_decay_spares_norms_biases_and_tokens():
    backbone = load_backbone("dinov2_vits14", source="timm", pretrained=False)
    config = PretrainConfig(layer_decay=0.5, patch_embed_lr_mult=0.2)
    groups = parameter_groups(backbone, torch.nn.Linear(2, 2), 12, config)
    mult = {id(p): (g.lr_mult, g.wd_mult) for g in groups for p in g.params}
    named = dict(backbone.named_parameters())
    assert mult[id(named["vit.blocks.11.attn.qkv.weight"])] == (0.5, 1.0)
    assert mult[id(named["vit.blocks.0.attn.qkv.weight"])] == (0.5**12, 1.0)
    assert mult[id(named["vit.patch_embed.proj.weight"])][0] == pytest.approx(0.5**13 * 0.2)
    assert mult[id(named["vit.norm.weight"])] == (1.0, 0.0) and mult[id(named["vit.cls_token"])][1] == 0.0
    assert mult[id(named["vit.blocks.3.ls1.gamma"])][1] == 0.0
    assert layer_of("backbone.vit.pos_embed", 12) == 0 and layer_of("backbone.convnext.stages.2.blocks.1.x", 4) == 3


def test_the_teacher_follows_the_student_by_its_momentum():
    method = SelfDistillation(
        load_backbone("dinov2_vits14", source="timm", pretrained=False),
        PretrainConfig(prototypes=8, ibot_prototypes=8, head_hidden=8),
    )
    with torch.no_grad():
        for param in method.student.parameters():
            param.add_(1.0)
    before = method.teacher.backbone.vit.cls_token.clone()
    method.after_step(argparse.Namespace(momentum=1.0))
    assert torch.equal(method.teacher.backbone.vit.cls_token, before)
    method.after_step(argparse.Namespace(momentum=0.0))
    assert torch.equal(method.teacher.backbone.vit.cls_token, method.student.backbone.vit.cls_token)
    assert all(type(b.drop_path1).__name__ == "Identity" for b in method.teacher.blocks)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        wrapped = TokenBackbone(perturbed("dinov2_vits14")).train()
        wrapped.grad_checkpointing = checkpointing
        cls, patches = wrapped(torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
        (cls.sum() + patches.square().sum()).backward()
        grads.append(wrapped.backbone.vit.blocks[0].attn.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_convnext_student_learns_from_a_vit_teacher_at_its_own_grid():
    config = PretrainConfig(distill_from="dinov2_vits14", head_hidden=16, drop_path=0.0)
    torch.manual_seed(0)
    method = FeatureDistillation(
        load_backbone("dinov3_convnext_tiny", source="timm", pretrained=False),
        load_backbone("dinov2_vits14", source="timm", pretrained=False),
        config,
    ).train()
    crops = torch.randn(4, 3, 64, 64)
    batch = Batch(crops, torch.zeros(0), torch.zeros(4, 0, 0, dtype=torch.bool), [0, 1], 0)
    loss, stats = method(batch, schedule_at(config, 0, 1))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and {"cls_distance", "patch_distance"} <= set(stats)
    assert method.student.backbone.convnext.stem[0].weight.grad is not None
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.teacher_size(64) == 70  # the nearest size patch 14 divides


def test_masked_tokens_match_metas_own_dinov2_code(tmp_path):
    """iBOT's masking as Meta's `prepare_tokens_with_masks` does it: Meta's ViT-S/14 (the dinov2
    package) and timm's with its weights give the same tokens for the same masks."""
    vision_transformer = pytest.importorskip("dinov2.models.vision_transformer")
    torch.manual_seed(0)
    meta = vision_transformer.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).eval()
    with torch.no_grad():
        meta.mask_token.normal_()
    torch.save(meta.state_dict(), tmp_path / "meta.pth")
    ours = TokenBackbone(load_backbone("dinov2_vits14", source="timm", weights=tmp_path / "meta.pth")).eval()
    theirs = TokenBackbone(meta).eval()
    assert theirs.mask_token is None  # Meta's module has its own
    with torch.no_grad():
        ours.mask_token.copy_(meta.mask_token)
        masks = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.4
        images = torch.randn(2, 3, 56, 56)
        (our_cls, our_patches), (their_cls, their_patches) = ours(images, masks), theirs(images, masks)
    assert torch.allclose(our_cls, their_cls, atol=1e-4) and torch.allclose(our_patches, their_patches, atol=1e-4)
    assert torch.equal(ours.meta_state()["mask_token"], meta.mask_token.detach())


def test_a_pretraining_folder_is_told_from_a_training_one(tmp_path):
    from dinokit.runs.run_folder import folder_run

    (tmp_path / "pre").mkdir()
    (tmp_path / "train").mkdir()
    for name in ("backbone.pth", "last.pth", "metrics.csv"):
        (tmp_path / "pre" / name).write_bytes(b"x")
    (tmp_path / "train" / "last.pth").write_bytes(b"x")
    assert folder_run(tmp_path / "pre")[0] == "pretraining run"
    assert folder_run(tmp_path / "train")[0] == "training run"
