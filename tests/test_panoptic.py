"""Panoptic and instance segmentation (dinokit/tasks/panoptic/): COCO folders read and refused as
their files deserve, EoMT equal to transformers' on the same weights, released weights converted,
the loss's matching, PQ as panopticapi counts it. The scripts end to end: test_panoptic_scripts.py."""

import json

import numpy as np
import pytest
import torch

from dinokit.data.image_files import DatasetError
from dinokit.data.synthetic import make_panoptic_dataset
from dinokit.errors import UserError
from dinokit.tasks.panoptic.coco import LABEL_DIVISOR, VOID, CocoReader, check_records, find_split, read_split
from dinokit.tasks.panoptic.eomt import EomtModel, QueryOutputs, anneal_spans, mask_probability
from dinokit.tasks.panoptic.loss import MaskClassificationLoss, match, target_segments
from dinokit.tasks.panoptic.predictions import ObjectPrediction, panoptic_map
from dinokit.tasks.panoptic.released import load_released_eomt, to_transformers
from dinokit.tasks.panoptic.scoring import ObjectScores, pq_counts, summarise_pq
from tests.conftest import OFFLINE, one_line_error, run_script

THINGS = [True, True, True, False, False]  # the shapes set: disc, square, triangle | sky, ground


# -- COCO folders -------------------------------------------------------------------------------------


def test_both_formats_read_as_one_target_with_instances_numbered_per_class(shapes):
    for kind, classes in (("panoptic", 5), ("instances", 3)):
        files = find_split(shapes, "train", [kind])
        categories, records = read_split(files, things_only=kind == "instances")
        assert len(categories.names) == classes and len(records) == 6
        _, target = CocoReader(records, categories)(records[0].image, files.annotations)
        assert target.dtype == np.int32 and target.shape == (84, 112)
        values = [int(v) for v in np.unique(target) if v >= 0]
        things = [v for v in values if categories.isthing[v // LABEL_DIVISOR]]
        assert things and all(v % LABEL_DIVISOR >= 1 for v in things)  # instance numbers from 1
        if kind == "panoptic":
            assert VOID not in np.unique(target)  # the set labels every pixel
            assert any(v % LABEL_DIVISOR == 0 and not categories.isthing[v // LABEL_DIVISOR] for v in values)


def test_coco_2017_names_are_found(tmp_path):
    root = make_panoptic_dataset(tmp_path / "coco", 2, 2, (56, 42))
    (root / "valid_images").rename(root / "val2017")
    (root / "annotations" / "panoptic_valid.json").rename(root / "annotations" / "panoptic_val2017.json")
    (root / "annotations" / "panoptic_valid").rename(root / "annotations" / "panoptic_val2017")
    files = find_split(root, "valid", ["panoptic"])
    assert files.images.name == "val2017" and files.masks.name == "panoptic_val2017"


def broken(tmp_path, edit, kind="panoptic"):
    """A fresh shapes set whose train annotations `edit(json dict, root)` changed; its read + check."""
    root = make_panoptic_dataset(tmp_path / "data", 2, 1, (56, 42))
    path = root / "annotations" / f"{kind}_train.json"
    raw = json.loads(path.read_text())
    edit(raw, root)
    path.write_text(json.dumps(raw))
    files = find_split(root, "train", [kind])
    categories, records = read_split(files, things_only=kind == "instances")
    check_records(records, categories, str(path))


def unlisted_segment(raw, root):
    raw["annotations"][0]["segments_info"].pop()


def unknown_category(raw, root):
    raw["annotations"][0]["segments_info"][0]["category_id"] = 99


def missing_image(raw, root):
    (root / "train_images" / raw["images"][0]["file_name"]).unlink()


def other_size(raw, root):
    raw["images"][0]["width"] = 80


def empty_split(raw, root):
    raw["images"], raw["annotations"] = [], []


def polygon_outside(raw, root):
    raw["annotations"][0]["segmentation"][0][0] = 500.0


@pytest.mark.parametrize(
    "edit, kind, words",
    [
        (unlisted_segment, "panoptic", "in the PNG but not in its segments_info"),
        (unknown_category, "panoptic", "category id 99 is not in 'categories'"),
        (missing_image, "panoptic", "is listed but"),
        (other_size, "panoptic", "annotations describe it as 80x42"),
        (empty_split, "panoptic", "the split has no images"),
        (polygon_outside, "instances", "reaches outside the 56x42 image"),
    ],
)
def test_a_faulty_annotation_is_refused_naming_its_file(tmp_path, edit, kind, words):
    with pytest.raises(DatasetError) as error:
        broken(tmp_path, edit, kind)
    message = str(error.value)
    assert words in message and ("train" in message) and "\n" not in message


@pytest.mark.slow
def test_train_refuses_a_faulty_folder_in_one_line_and_writes_nothing(tmp_path):
    root = make_panoptic_dataset(tmp_path / "data", 2, 1, (56, 42))
    path = root / "annotations" / "panoptic_valid.json"
    raw = json.loads(path.read_text())
    raw["annotations"][0]["segments_info"][0]["category_id"] = 42
    path.write_text(json.dumps(raw))
    result = run_script("train.py", "--task", "panoptic", "--data-dir", root, "--out-dir", tmp_path / "run", *OFFLINE)
    one_line_error(result, "panoptic_valid.json", "category id 42")
    assert not (tmp_path / "run").exists()


# -- the model ---------------------------------------------------------------------------------------


def small_eomt(backbone="small", registers=True, **kwargs):
    torch.manual_seed(0)
    model = EomtModel(5, queries=8, backbone=backbone, registers=registers, source="timm", pretrained=False, **kwargs)
    with torch.no_grad():  # away from init's zeros and ones, so a wrong mapping shows
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if name.startswith("head") or "gamma" in name or "ls" in name else 0.02))
    return model.eval()


def transformers_twin(model, family, size):
    transformers = pytest.importorskip("transformers")
    common = dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=size, num_queries=8, num_labels=5
    )
    if family == "dinov2":
        config = transformers.EomtConfig(patch_size=14, num_upscale_blocks=1, **common)
        twin = transformers.EomtForUniversalSegmentation(config)
    else:
        config = transformers.EomtDinov3Config(
            patch_size=16, num_upscale_blocks=2, intermediate_size=1536, layer_norm_eps=1e-5, **common
        )
        twin = transformers.EomtDinov3ForUniversalSegmentation(config)
    missing, unexpected = twin.load_state_dict(to_transformers(model.state_dict(), family), strict=False)
    assert missing == ["criterion.empty_weight"] and not unexpected  # the loss's class weights: not the model's
    return twin.eval()


@pytest.mark.parametrize(
    "family, backbone, registers, size", [("dinov2", "small", True, 518), ("dinov3", "dinov3_vits16", False, 224)]
)
def test_eomt_equals_transformers_eomt_on_the_same_weights(family, backbone, registers, size):
    """Plain forward (annealing over) and masked attention (its start), to 1e-4 relative."""
    model = small_eomt(backbone, registers)
    twin = transformers_twin(model, family, size)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    for probability in (0.0, 1.0):
        model.attn_mask_probs.fill_(probability)
        twin.attn_mask_probs.fill_(probability)
        with torch.no_grad():
            ours, theirs = model(images), twin(pixel_values=images)
        for a, b in ((ours.masks, theirs.masks_queries_logits), (ours.classes, theirs.class_queries_logits)):
            assert a.shape == b.shape
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-4


def test_a_transformers_export_and_a_tue_mps_delta_file_load_as_the_weights_they_hold(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    source = small_eomt("dinov3_vits16", False)
    hf = to_transformers(source.state_dict(), "dinov3")
    safetensors.save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    pretrained = EomtModel(5, queries=8, backbone="dinov3_vits16", source="timm", pretrained=False)
    # tue-mps's layout: network.*, the backbone in transformers' DINOv3ViTModel names, as deltas
    own = to_transformers(pretrained.state_dict(), "dinov3")
    head_names = {"query.weight": "q.weight", "class_predictor": "class_head", "mask_head.fc1": "mask_head.0"}
    delta = {}
    for name, value in hf.items():
        if name.startswith(("layers.", "embeddings.", "layernorm.")):
            backbone_name = name.replace("layers.", "layer.", 1).replace("layernorm.", "norm.", 1)
            delta[f"network.encoder.backbone.{backbone_name}"] = value - own[name]
        elif name.startswith("upscale_block.block."):
            part = name.removeprefix("upscale_block.block.").replace("layernorm2d", "norm")
            delta[f"network.upscale.{part}"] = value
        else:
            renamed = next((new + name[len(old) :] for old, new in head_names.items() if name.startswith(old)), name)
            renamed = renamed.replace("mask_head.fc2", "mask_head.2").replace("mask_head.fc3", "mask_head.4")
            delta[f"network.{renamed}"] = value
    torch.save({"state_dict": delta}, tmp_path / "pytorch_model.bin")
    for path in (tmp_path, tmp_path / "pytorch_model.bin"):
        target = EomtModel(5, queries=8, backbone="dinov3_vits16", source="timm", pretrained=False)
        target.load_state_dict(pretrained.state_dict())
        said = load_released_eomt(target, path, "dinov3")
        assert ("delta" in said) == (path.suffix == ".bin")
        for name, value in source.state_dict().items():
            assert torch.allclose(target.state_dict()[name], value, atol=1e-6), name


def test_a_file_of_another_size_is_refused_naming_the_tensor(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    hf = to_transformers(small_eomt().state_dict(), "dinov2")
    hf["class_predictor.weight"] = hf["class_predictor.weight"][:3]
    safetensors.save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="class_predictor.weight is .* in the file but"):
        load_released_eomt(small_eomt(), tmp_path, "dinov2")


def test_a_convnext_backbone_is_refused_with_the_reason():
    with pytest.raises(UserError, match="ConvNeXt, which has no tokens"):
        EomtModel(3, backbone="dinov3_convnext_tiny", source="timm", pretrained=False)


def test_masks_are_placed_on_the_image_the_padding_cropped_off():
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., :7, :6] = 1.0  # the image covers 7 x 6 of the padded 8 x 8 grid's cells
    outputs = QueryOutputs(masks, torch.zeros(1, 1, 2), (), input_size=(49, 42), padded_size=(56, 56))
    placed = outputs.image_masks((98, 84))
    assert placed.shape[-2:] == (98, 84) and placed.min() > 0.25  # bilinear at the corner: 0.54 x 0.54


def test_the_annealing_follows_the_papers_schedule():
    assert anneal_spans(4) == [(1 / 6, 2 / 6), (2 / 6, 3 / 6), (3 / 6, 4 / 6), (4 / 6, 5 / 6)]
    assert mask_probability(10, 20, 40) == 1.0 and mask_probability(40, 20, 40) == 0.0
    assert mask_probability(30, 20, 40) == pytest.approx(0.5**0.9)
    model = small_eomt()
    model.training_progress(600, 600)
    assert model.attn_mask_probs.tolist() == [0.0] * 4  # after the run: a plain ViT forward


# -- loss, predictions, scores -----------------------------------------------------------------------


def test_crowd_regions_are_ignored_and_void_belongs_to_no_segment():
    target = torch.full((4, 4), VOID, dtype=torch.int32)
    target[:2] = 1 * LABEL_DIVISOR + 1  # a square
    target[2:, :2] = 0  # a crowd of discs
    target[2:, 2:] = 3 * LABEL_DIVISOR  # sky
    segments = target_segments(target, torch.tensor(THINGS))
    assert segments.classes.tolist() == [1, 3]
    assert not segments.valid[2:, :2].any() and segments.valid.sum() == 12


def test_matching_pairs_each_segment_with_the_query_that_predicts_it():
    target = torch.zeros((16, 16), dtype=torch.int32)
    target[:8] = 1 * LABEL_DIVISOR + 1
    target[8:] = 4 * LABEL_DIVISOR
    segments = target_segments(target, torch.tensor(THINGS))
    masks = torch.full((3, 16, 16), -10.0)
    masks[2, :8], masks[0, 8:] = 10.0, 10.0
    classes = torch.zeros(3, 6)
    classes[2, 1], classes[0, 4] = 10.0, 10.0
    rows, cols = match(masks, classes, segments, MaskClassificationLoss(5, THINGS).weights)
    assert dict(zip(segments.classes[cols].tolist(), rows.tolist())) == {1: 2, 4: 0}
    loss = MaskClassificationLoss(5, THINGS)
    right = loss(QueryOutputs(masks[None], classes[None]), target[None])[0]
    wrong = loss(QueryOutputs(masks[None].flip(1), classes[None]), target[None])[0]
    assert right < wrong


def test_panoptic_fusion_keeps_confident_queries_and_merges_a_stuff_class():
    masks = torch.full((4, 8, 8), -10.0)
    masks[0, :4, :4] = masks[1, :4, 4:] = masks[2, 4:, :4] = masks[3, 4:, 4:] = 10.0
    classes = torch.full((4, 6), -10.0)
    classes[0, 0] = classes[1, 0] = classes[2, 4] = classes[3, 4] = 10.0  # two discs, ground twice
    panoptic, scores = panoptic_map(masks, classes, THINGS)
    values = sorted(torch.unique(panoptic).tolist())
    assert values == [1, 2, 4 * LABEL_DIVISOR]  # disc 1, disc 2, one ground segment
    classes[1, 0], classes[1, 5] = -10.0, 10.0  # query 1 says "no object"
    panoptic, _ = panoptic_map(masks, classes, THINGS)
    assert (panoptic[:4, 4:] == VOID).all()


def test_pq_equals_torchmetrics_panoptic_quality_on_random_maps():
    """torchmetrics' PanopticQuality is panopticapi's PQ where every predicted pixel has a segment
    (where one has none, torchmetrics also takes it out of the union and the false negatives, which
    panopticapi does not: the next test holds that rule to panopticapi's)."""
    tm = pytest.importorskip("torchmetrics.detection")
    rng = np.random.default_rng(0)
    things, stuffs = {0, 1, 2}, {3, 4}
    metric = tm.PanopticQuality(things=things, stuffs=stuffs, allow_unknown_preds_category=True)
    counts = np.zeros((5, 4))
    for _ in range(4):
        truth = blocks(rng)
        prediction = np.roll(blocks(rng) if rng.random() < 0.3 else truth, int(rng.integers(0, 4)), axis=1)
        prediction[prediction == VOID] = 3 * LABEL_DIVISOR
        counts += pq_counts(truth, prediction, THINGS)
        metric.update(torchmetrics_pair(prediction)[None], torchmetrics_pair(truth)[None])
    ours = summarise_pq(counts, THINGS)[0]["all"][0]
    assert ours == pytest.approx(float(metric.compute()), abs=1e-6)


def blocks(rng):
    """A 24 x 24 encoded map of random 6 x 6 blocks: things numbered, stuff, some void."""
    out = np.empty((24, 24), dtype=np.int32)
    instance = 0
    for y in range(0, 24, 6):
        for x in range(0, 24, 6):
            cls = int(rng.integers(-1, 5))
            instance += 1
            out[y : y + 6, x : x + 6] = VOID if cls < 0 else cls * LABEL_DIVISOR + (instance if THINGS[cls] else 0)
    return out


def torchmetrics_pair(encoded):
    """(category, instance) per pixel, void as category -1."""
    cls = np.where(encoded >= 0, encoded // LABEL_DIVISOR, -1)
    return torch.from_numpy(np.stack([cls, np.where(encoded >= 0, encoded % LABEL_DIVISOR, 0)], -1))


def test_void_and_crowd_follow_panopticapi():
    """A prediction lying mostly over void or a crowd of its class is no false positive; void is out
    of a prediction's union, a prediction's own unlabelled pixels are not (panopticapi's pq_compute)."""
    truth = np.full((10, 10), VOID, dtype=np.int32)
    truth[:, 5:] = 0  # a crowd of discs
    prediction = np.full((10, 10), 1, dtype=np.int32)  # one disc everywhere: no match, but over void + crowd
    assert pq_counts(truth, prediction, THINGS)[0].tolist() == [0, 0, 0, 0]
    truth = np.full((10, 10), 1, dtype=np.int32)  # one disc
    truth[:, :2] = VOID
    prediction = np.full((10, 10), VOID, dtype=np.int32)
    prediction[:, :7] = 5  # covers the void columns and 5 of the disc's 8
    iou = 50 / (70 + 80 - 50 - 20)  # the 20 void pixels under the prediction leave its union
    assert pq_counts(truth, prediction, THINGS)[0].tolist() == [iou, 1, 0, 0]
    scores = ObjectScores(["disc", "square", "triangle", "sky", "ground"], THINGS)
    scores.update(truth, ObjectPrediction(prediction), [], 1)
    assert scores.result().pq == pytest.approx(iou)  # the one class with a segment


def test_an_instance_keeps_its_colour_from_frame_to_frame():
    from dinokit.tasks.panoptic.coco import Categories
    from dinokit.tasks.panoptic.drawing import SegmentColors

    categories = Categories(("disc",), (1,), (True,), ((200, 60, 60),))
    colors = SegmentColors(categories, track=True)
    first = np.zeros((10, 20), dtype=np.int32) - 1
    first[:, :5], first[:, 10:15] = 1, 2
    second = np.zeros((10, 20), dtype=np.int32) - 1
    second[:, 11:16], second[:, 1:6] = 1, 2  # the two discs swapped their numbers
    a, b = colors(first), colors(second)
    assert b[1] == a[2] and b[2] == a[1] and a[1] != a[2]


def test_eomt_on_meta_hub_code_equals_eomt_on_timm_with_the_same_weights(tmp_path):
    """The query blocks run from the block's own weights whatever the source: Meta's DINOv2 hub
    code and timm's, holding one weights file, give the same masks and classes."""
    pytest.importorskip("dinov2")
    from tests.test_backbones import HUBCONF, vision_transformer

    (tmp_path / "hubconf.py").write_text(HUBCONF)
    torch.manual_seed(0)
    meta = vision_transformer.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    torch.save(meta.state_dict(), tmp_path / "dinov2_vits14_pretrain.pth")
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    hub = EomtModel(5, queries=8, source="local", hub_dir=tmp_path, weights=weights).eval()
    timm = EomtModel(5, queries=8, source="timm", weights=weights).eval()
    timm.head.load_state_dict(hub.head.state_dict())
    images = torch.randn(1, 3, 252, 196, generator=torch.Generator().manual_seed(1))
    for probability in (0.0, 1.0):
        hub.attn_mask_probs.fill_(probability)
        timm.attn_mask_probs.fill_(probability)
        with torch.no_grad():
            a, b = hub(images), timm(images)
        assert torch.allclose(a.masks, b.masks, rtol=1e-4, atol=1e-3) and torch.allclose(
            a.classes, b.classes, atol=1e-4
        )


def test_eomt_flags_on_a_model_without_queries_are_refused_with_the_fix():
    import train

    args = train.get_args_parser().parse_args(["--queries", "20"])
    train.settle(args, None)
    with pytest.raises(ValueError, match="--queries sets EoMT's queries; this model has none: add --head eomt"):
        train.check_args(args, train.get_task("segmentation"), train.resolve_backbone(args))


@pytest.mark.slow
def test_bench_times_eomt_against_transformers_and_the_bare_backbone():
    pytest.importorskip("transformers")
    others = ("epochs", "inference", "modes", "memory", "classification", "export", "backbones", "retrieval")
    result = run_script("bench.py", "--skip", *others, "--imgsz", "56", "56", "--batch", "1", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| training step, batch 1 (ms) |") and rows[2].startswith("| inference forward")
    assert "EoMT / bare" in rows[3]
