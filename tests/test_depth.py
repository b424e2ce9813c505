"""Meta's released DINOv2 depth heads without mmcv: head files synthesised in Meta's layout (random
values, every kind) run through our model and through an independent, functional re-implementation
of Meta's forward (dinov2/hub/depthers.py + hub/depth/*) written here; the names, the errors, and
what infer_image.py / infer_video.py write for a depth model."""

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import model_with_head
from dinokit.data.image_files import DatasetError
from dinokit.data.synthetic import make_depth_dataset
from dinokit.prediction.modes import InferenceMode
from dinokit.tasks.depth.data import find_depth_pairs
from dinokit.tasks.depth.files import check_depth_pairs, load_depth_spec
from dinokit.tasks.depth.maps import colorize, depth_png
from dinokit.tasks.depth.released import DepthHeadError, depth_head_url, read_depth_head
from inference import Predictor
from metrics import DepthErrors, depth_errors
from tests.conftest import OFFLINE, run_script
from tests.test_inference import make_video, read_video

BACKBONE = dict(backbone="small", source="timm", pretrained=False)
WIDTH = 384


def meta_file(path, kind, seed=0):
    """A head file as Meta releases it: an mmseg checkpoint, `state_dict` of `decode_head.*` tensors."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 0.05 * torch.randn(*shape, generator=generator)  # noqa: E731
    if kind in ("linear", "linear4"):
        channels = 2 * WIDTH * (4 if kind == "linear4" else 1)
        state = {"conv_depth.weight": rand(256, channels, 1, 1), "conv_depth.bias": rand(256)}
    else:
        state = dpt_state(rand)
    torch.save({"meta": {}, "state_dict": {f"decode_head.{k}": v for k, v in state.items()}}, path)
    return path


def dpt_state(rand):
    """Every tensor of Meta's DPTHead for ViT-S (channels 256, post-process 48/96/192/384), by Meta's names."""
    post, state = [WIDTH // 2 ** (3 - i) for i in range(4)], {}
    for i, c in enumerate(post):
        state[f"reassemble_blocks.readout_projects.{i}.0.weight"] = rand(WIDTH, 2 * WIDTH)
        state[f"reassemble_blocks.readout_projects.{i}.0.bias"] = rand(WIDTH)
        state[f"reassemble_blocks.projects.{i}.conv.weight"] = rand(c, WIDTH, 1, 1)
        state[f"reassemble_blocks.projects.{i}.conv.bias"] = rand(c)
        state[f"convs.{i}.conv.weight"] = rand(256, c, 3, 3)
        state[f"fusion_blocks.{i}.project.conv.weight"] = rand(256, 256, 1, 1)
        state[f"fusion_blocks.{i}.project.conv.bias"] = rand(256)
        for unit in (1, 2) if i else (2,):
            for conv in (1, 2):
                state[f"fusion_blocks.{i}.res_conv_unit{unit}.conv{conv}.conv.weight"] = rand(256, 256, 3, 3)
    state["reassemble_blocks.resize_layers.0.weight"] = rand(post[0], post[0], 4, 4)
    state["reassemble_blocks.resize_layers.0.bias"] = rand(post[0])
    state["reassemble_blocks.resize_layers.1.weight"] = rand(post[1], post[1], 2, 2)
    state["reassemble_blocks.resize_layers.1.bias"] = rand(post[1])
    state["reassemble_blocks.resize_layers.3.weight"] = rand(post[3], post[3], 3, 3)
    state["reassemble_blocks.resize_layers.3.bias"] = rand(post[3])
    state["project.conv.weight"], state["project.conv.bias"] = rand(256, 256, 3, 3), rand(256)
    state["conv_depth.head.0.weight"], state["conv_depth.head.0.bias"] = rand(128, 256, 3, 3), rand(128)
    state["conv_depth.head.2.weight"], state["conv_depth.head.2.bias"] = rand(32, 128, 3, 3), rand(32)
    state["conv_depth.head.4.weight"], state["conv_depth.head.4.bias"] = rand(1, 32, 1, 1), rand(1)
    return state


# --- Meta's forward, written independently (functional, on the file's own tensors) ---------------


def meta_depth(backbone, state, images, taps, kind, depth_range):
    """CenterPadding -> tokens (norm=False, class token) -> head -> clamp -> resize to the image."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % 14, -width % 14
    padded = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    with torch.no_grad():
        blocks = backbone.get_intermediate_layers(padded, n=taps, reshape=True, return_class_token=True, norm=False)
        out = meta_linear(blocks, state, *depth_range) if kind == "linear" else meta_dpt(blocks, state, depth_range[0])
    out = out.clamp(*depth_range)
    return F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)


def meta_linear(blocks, s, min_depth, max_depth):
    x = [torch.cat((p, c[:, :, None, None].expand_as(p)), 1) for p, c in blocks]
    x = torch.cat([F.interpolate(t, size=[d * 4 for d in x[0].shape[2:]], mode="bilinear") for t in x], 1)
    logit = torch.relu(F.conv2d(x, s["conv_depth.weight"], s["conv_depth.bias"])) + 0.1
    logit = logit / logit.sum(dim=1, keepdim=True)
    bins = torch.linspace(min_depth, max_depth, 256)
    return torch.einsum("ikmn,k->imn", logit, bins).unsqueeze(1)


def meta_dpt(blocks, s, min_depth):
    def conv(x, name, padding=0):
        return F.conv2d(x, s[f"{name}.weight"], s.get(f"{name}.bias"), padding=padding)

    def unit(x, name):  # pre-activation residual unit: act -> conv -> (no norm), twice
        y = conv(torch.relu(x), f"{name}.conv1.conv", 1)
        return x + conv(torch.relu(y), f"{name}.conv2.conv", 1)

    maps = []
    for i, (x, cls) in enumerate(blocks):
        shape, tokens = x.shape, x.flatten(2).permute(0, 2, 1)
        tokens = torch.cat((tokens, cls.unsqueeze(1).expand_as(tokens)), -1)
        r = f"reassemble_blocks.readout_projects.{i}.0"
        x = F.gelu(F.linear(tokens, s[f"{r}.weight"], s[f"{r}.bias"])).permute(0, 2, 1).reshape(shape)
        x = conv(x, f"reassemble_blocks.projects.{i}.conv")
        resize = f"reassemble_blocks.resize_layers.{i}"
        if i == 0:
            x = F.conv_transpose2d(x, s[f"{resize}.weight"], s[f"{resize}.bias"], stride=4)
        elif i == 1:
            x = F.conv_transpose2d(x, s[f"{resize}.weight"], s[f"{resize}.bias"], stride=2)
        elif i == 3:
            x = F.conv2d(x, s[f"{resize}.weight"], s[f"{resize}.bias"], stride=2, padding=1)
        maps.append(conv(x, f"convs.{i}.conv", 1))
    out = None
    for i in range(4):
        x = maps[-(i + 1)]
        if out is None:
            out = x
        else:
            skip = F.interpolate(x, size=out.shape[2:], mode="bilinear") if x.shape != out.shape else x
            out = out + unit(skip, f"fusion_blocks.{i}.res_conv_unit1")
        out = unit(out, f"fusion_blocks.{i}.res_conv_unit2")
        out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        out = conv(out, f"fusion_blocks.{i}.project.conv")
    out = torch.relu(conv(out, "project.conv", 1))
    out = conv(out, "conv_depth.head.0", 1)
    out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
    out = conv(torch.relu(conv(out, "conv_depth.head.2", 1)), "conv_depth.head.4")
    return torch.relu(out) + min_depth


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, taps", [("linear", [11]), ("linear4", [2, 5, 8, 11]), ("dpt", [2, 5, 8, 11])], ids=str)
def test_our_model_is_metas_forward(kind, taps, tmp_path):
    path = meta_file(tmp_path / f"dinov2_vits14_nyu_{kind}_head.pth", kind)
    torch.manual_seed(0)
    model, info = model_with_head(path, **BACKBONE)
    state = {k.removeprefix("decode_head."): v for k, v in torch.load(path)["state_dict"].items()}
    images = torch.randn(1, 3, 75, 101)  # not a multiple of 14: centred padding
    with torch.no_grad():
        ours = model(images)
    expected = meta_depth(model.backbone, state, images, taps, kind.rstrip("4"), (0.001, 10.0))
    assert ours.shape == (1, 1, 75, 101) and info["task"] == "depth" and list(model.taps.blocks) == taps
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_names_resolve_to_metas_urls_and_ranges(tmp_path):
    assert depth_head_url("nyu_linear4", "base") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_nyu_linear4_head.pth"
    )
    assert depth_head_url("kitti_dpt", "giant").endswith("dinov2_vitg14/dinov2_vitg14_kitti_dpt_head.pth")
    _, kitti = read_depth_head(meta_file(tmp_path / "dinov2_vits14_kitti_linear_head.pth", "linear"), "small")
    _, nyu = read_depth_head(meta_file(tmp_path / "dinov2_vits14_nyu_linear4_head.pth", "linear4"), "small")
    # Meta's hub code gives every linear head max_depth=80; NYU heads were trained over 0-10 m.
    assert (kitti.max_depth, nyu.max_depth, nyu.taps, kitti.taps) == (80.0, 10.0, (2, 5, 8, 11), (11,))


def test_head_errors_name_the_fix(tmp_path):
    with pytest.raises(DepthHeadError, match="could not load dinov2_vits14_nyu_linear4_head.pth .*hub/checkpoints"):
        read_depth_head("nyu_linear4", "small")  # sockets are refused in tests
    head = meta_file(tmp_path / "dinov2_vits14_nyu_linear4_head.pth", "linear4")
    with pytest.raises(DepthHeadError, match="does not read dinov2_vitb14's 768-wide blocks"):
        read_depth_head(head, "base")
    with pytest.raises(DepthHeadError, match="depth heads for dinov2_vits14, _vitb14, _vitl14 and _vitg14 only"):
        read_depth_head(head, "dinov3_vits16")
    renamed = meta_file(tmp_path / "head.pth", "linear")
    with pytest.raises(DepthHeadError, match="keep 'nyu' or 'kitti' in the file name"):
        read_depth_head(renamed, "small")


def test_flip_averages_depths_not_probabilities(tmp_path):
    model, info = model_with_head(meta_file(tmp_path / "dinov2_vits14_nyu_linear_head.pth", "linear"), **BACKBONE)
    predictor = Predictor(model, info, device=torch.device("cpu"), mode=InferenceMode(imgsz=(84, 56)))
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    plain = predictor.predict(image)
    flipped = predictor.with_mode(InferenceMode(imgsz=(84, 56), flip=True)).predict(image)
    mirrored = predictor.predict(image[:, ::-1].copy())[:, ::-1]
    assert plain.dtype == np.float32 and plain.shape == (60, 80) and 0.001 <= plain.min() <= plain.max() <= 10
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, rtol=1e-5, atol=1e-5)


def test_depth_colours_and_millimetres():
    depth = np.array([[0.5, 1.0], [2.0, 70.0]], dtype=np.float32)
    assert np.array_equal(np.array(depth_png(depth)), [[500, 1000], [2000, 65535]])  # clipped at 65.535 m
    colours = colorize(depth, (0.5, 2.0))
    assert colours[0, 0].sum() > colours[1, 0].sum()  # near is bright
    assert np.array_equal(colours[1, 0], colours[1, 1])  # beyond the range: the far end's colour


@pytest.mark.slow
def test_infer_image_and_video_write_depth(tmp_path, tiny_dataset):
    head = meta_file(tmp_path / "dinov2_vits14_nyu_linear4_head.pth", "linear4")
    flags = ("--head-weights", head, *OFFLINE[:3], "--device", "cpu", "--imgsz", "112", "84")
    result = run_script(
        "infer_image.py", "--input", tiny_dataset / "valid_images", "--out-dir", tmp_path / "img", "--save-npy", *flags
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first = sorted((tiny_dataset / "valid_images").iterdir())[0].stem
    metres = np.load(tmp_path / "img" / f"{first}.npy")
    millimetres = np.array(Image.open(tmp_path / "img" / f"{first}_depth16.png"))
    coloured = cv2.imread(str(tmp_path / "img" / f"{first}_depth.png"))
    assert metres.shape == millimetres.shape == (90, 120) and millimetres.dtype == np.uint16
    assert np.array_equal(millimetres, np.round(metres * 1000).astype(np.uint16))
    assert coloured.shape[:2] == (90, 120 + 94)  # the image and its colour bar
    make_video(tmp_path / "clip.mp4", frames=3, size=(150, 110))
    result = run_script("infer_video.py", "--input", tmp_path / "clip.mp4", "--out-dir", tmp_path / "vid", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    frames, size, _ = read_video(tmp_path / "vid" / "clip.mp4")
    assert frames == 3 and size == (150 + 94, 110)


def test_the_demo_shows_depth(tmp_path, tiny_dataset):
    import app

    model, info = model_with_head(meta_file(tmp_path / "dinov2_vits14_nyu_linear4_head.pth", "linear4"), **BACKBONE)
    predictor = Predictor(model, info, device=torch.device("cpu"), mode=InferenceMode(imgsz=(112, 84)))
    (tmp_path / "results").mkdir()
    demo = app.Demo({"nyu": predictor}, tmp_path / "results", max_pixels=50_000, max_frames=4)
    image = sorted((tiny_dataset / "valid_images").iterdir())[0]
    coloured, _, summary, png, status = demo.segment_image(str(image), "nyu", "whole", 0.5)
    assert coloured.shape == (90, 120 + 94, 3) and "median" in summary and status.startswith("120x90, ")
    assert np.array(Image.open(png)).dtype == np.uint16


# --- RGB-D folders and the depth metrics ---------------------------------------------------------


def test_depth_errors_by_hand():
    truth, pred = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 2.0])
    found = depth_errors(pred, truth)
    assert found["abs_rel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert found["sq_rel"] == pytest.approx((0 + 0.5 + 1.0) / 3)
    assert found["rmse"] == pytest.approx(((0 + 1 + 4) / 3) ** 0.5)
    logs = np.log([1.0, 1.5, 0.5])
    assert found["rmse_log"] == pytest.approx(float(np.sqrt((logs**2).mean())))
    assert found["log10"] == pytest.approx(float(np.abs(np.log10([1.0, 1.5, 0.5])).mean()))
    assert found["silog"] == pytest.approx(100 * float(np.sqrt((logs**2).mean() - logs.mean() ** 2)))
    # ratios 1, 1.5, 2 against 1.25, 1.5625, 1.953
    assert (found["delta1"], found["delta2"], found["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))


def test_split_metrics_average_images_not_pixels():
    errors = DepthErrors()
    everywhere = torch.ones(2, 2, dtype=torch.bool)
    errors.update(torch.full((2, 2), 2.0), torch.full((2, 2), 1.0), everywhere)  # rmse 1
    errors.update(torch.full((1, 1), 1.0), torch.full((1, 1), 1.0), torch.ones(1, 1, dtype=torch.bool))  # rmse 0
    errors.update(torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool))  # nothing measured
    result = errors.compute()
    assert result["rmse"] == pytest.approx(0.5) and result["images"] == 2 and result["images_without_depth"] == 1


def test_depth_folder_errors_name_the_file(tmp_path):
    root = make_depth_dataset(tmp_path / "rgbd", n_train=1, n_valid=2, size=(64, 48))
    spec = load_depth_spec(root)
    pairs = find_depth_pairs(root, "valid")
    assert check_depth_pairs(pairs, spec, "valid") > 0
    depth_file = pairs[0][1]
    Image.fromarray(np.full((48, 64), 3000, dtype=np.uint16)).save(depth_file)  # 3 m as 3000 "metres"
    with pytest.raises(DatasetError, match="median depth 3000 m with depth_scale 1 .*a unit mistake"):
        check_depth_pairs(pairs, load_depth_spec_with(root, depth_scale=1), "valid")
    Image.fromarray(np.full((48, 64), 30, dtype=np.uint8)).save(depth_file)
    with pytest.raises(DatasetError, match="an L-mode image; depth PNGs are 16-bit"):
        check_depth_pairs(pairs, spec, "valid")
    Image.fromarray(np.full((40, 64), 3000, dtype=np.uint16)).save(depth_file)
    with pytest.raises(DatasetError, match="depth is 64x40 but its image valid_0000.jpg is 64x48"):
        check_depth_pairs(pairs, spec, "valid")
    for _, path in pairs:
        Image.fromarray(np.zeros((48, 64), dtype=np.uint16)).save(path)
    with pytest.raises(DatasetError, match="valid split: no valid depth pixel in 2 files"):
        check_depth_pairs(pairs, spec, "valid")


def test_depth_json_numbers_must_be_finite(tmp_path):
    """json reads NaN and Infinity; a range to Infinity used to end in "training diverged"."""
    root = make_depth_dataset(tmp_path / "rgbd", n_train=1, n_valid=1, size=(32, 24))
    for name, value in (("max_depth", "Infinity"), ("depth_scale", "NaN"), ("min_depth", "-Infinity")):
        (root / "depth.json").write_text(f'{{"depth_scale": 1000, "max_depth": 10, "{name}": {value}}}')
        with pytest.raises(DatasetError, match=f"depth.json: {name} must be a finite number, got {value}"):
            load_depth_spec(root)


def test_a_scale_that_drops_most_pixels_is_warned_about_with_the_likely_one(tmp_path, capsys):
    """Millimetre PNGs read with KITTI's 256 still have a median within range, so nothing refused
    them: 3.9x too far, and the far pixels silently out of the loss and the metrics."""
    root = make_depth_dataset(tmp_path / "rgbd", n_train=1, n_valid=2, size=(64, 48))
    pairs = find_depth_pairs(root, "valid")
    millimetres = np.random.default_rng(0).uniform(500, 9000, (48, 64)).astype(np.uint16)  # 0.5-9 m
    for _, path in pairs:
        Image.fromarray(millimetres).save(path)
    check_depth_pairs(pairs, load_depth_spec_with(root, depth_scale=1000, max_depth=10), "valid")
    assert capsys.readouterr().out == ""  # the right scale: nothing said
    check_depth_pairs(pairs, load_depth_spec_with(root, depth_scale=256, max_depth=10), "valid")
    said = capsys.readouterr().out
    expected = np.mean(millimetres / 256 <= 10)
    assert said.startswith(f"warning: valid: only {100 * expected:.0f} % of the measured depth pixels fall in")
    assert "with depth_scale 256" in said and "depth_scale 1000 would put 100 % in range" in said


def load_depth_spec_with(root, **fields):
    path = root / "depth.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return load_depth_spec(root)


@pytest.mark.slow
def test_evaluate_scores_a_depth_head_on_an_rgbd_folder(tmp_path):
    root = make_depth_dataset(tmp_path / "rgbd", n_train=1, n_valid=3, size=(80, 60))
    head = meta_file(tmp_path / "dinov2_vits14_nyu_linear4_head.pth", "linear4")
    result = run_script(
        "evaluate.py", "--head-weights", head, "--data-dir", root, "--imgsz", "84", "56",
        "--out-dir", tmp_path / "e", *OFFLINE[:3],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "abs_rel" in result.stdout and "delta1" in result.stdout and "(3 images" in result.stdout
    report = next((tmp_path / "e").glob("eval_*.json"))
    values = json.loads(report.read_text())
    assert values["images"] == 3 and 0 <= values["delta1"] <= 1 and values["rmse"] > 0
