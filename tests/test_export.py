"""ONNX export and onnxruntime inference: the file reproduces PyTorch at any size, carries what
inference needs, and runs behind the same scripts; broken files are one-line errors."""

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import build_model_from_checkpoint, describe_model, load_checkpoint
from dinokit.backbones.loading import POS_EMBED_OFFSET, bicubic_matrix
from dinokit.prediction.modes import InferenceMode
from dinokit.tasks import get_task
from inference import Predictor
from tests.conftest import run_script
from tests.test_inference import make_video

onnx = pytest.importorskip("onnx", reason="pip install -r requirements-export.txt")
pytest.importorskip("onnxruntime", reason="pip install -r requirements-export.txt")
pytest.importorskip("onnxscript", reason="pip install -r requirements-export.txt")

from dinokit.prediction.deployment import OnnxNetwork, export_network, write_metadata  # noqa: E402  (needs the packages above)

pytestmark = pytest.mark.slow  # every test exports a model (module fixture) and runs onnxruntime


@pytest.mark.parametrize("out_size", [16, 23, 37, 46, 1])
def test_bicubic_matrix_is_the_position_embedding_interpolation(out_size):
    grid = torch.randn(1, 8, 37, 37, generator=torch.Generator().manual_seed(0))
    scale = (out_size + POS_EMBED_OFFSET) / 37
    expected = (
        grid if out_size == 37 else F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    )
    matrix = bicubic_matrix(out_size, 37)
    torch.testing.assert_close(matrix @ grid @ matrix.T, expected, atol=2e-5, rtol=1e-5)
    if out_size == 37:  # Meta's code skips the interpolation at 518x518; so must the graph
        assert torch.equal(matrix, torch.eye(37))


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """export.py run on the trained tiny checkpoint (120x90 images, a 126x98 training size)."""
    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = run_script("export.py", "--model", run_dir / "best_model_iou.pth", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "best_model_iou.pth", out, result.stdout


def test_export_checks_itself_against_pytorch_before_writing(exported):
    _, out, stdout = exported
    assert out.is_file() and not list(out.parent.glob(".*tmp-*"))
    assert "check passed" in stdout
    sizes = {
        line.split(":")[0].split()[-1]
        for line in stdout.splitlines()
        if "argmax agreement" in line and "random" in line
    }
    assert sizes == {"126x98", "94x73"}  # the training size and one that is not a multiple of 14
    assert "valid_0000.jpg" in stdout  # real images: the training data's validation split


@pytest.mark.parametrize("size", [(98, 126), (73, 94), (140, 140), (45, 201)])
def test_onnx_reproduces_pytorch_at_any_size_and_batch(exported, size):
    checkpoint, out, _ = exported
    model = build_model_from_checkpoint(load_checkpoint(checkpoint))
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
    actual = OnnxNetwork(out, device="cpu")(images)
    assert actual.shape == expected.shape == (2, 21, *size)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_metadata_round_trips(exported):
    checkpoint, out, _ = exported
    network = OnnxNetwork(out, device="cpu")
    info = load_checkpoint(checkpoint)["model_info"]
    assert {key: network.info[key] for key in info} == json.loads(json.dumps(info))
    assert (network.info["output"], network.info["precision"], network.info["dynamic"]) == ("logits", "fp32", True)
    props = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
    assert json.loads(props["classes"])[15] == "person" and json.loads(props["mean"]) == info["mean"]


def masks(folder):
    return {path.name: np.array(Image.open(path)) for path in sorted(folder.glob("*_mask.png"))}


def test_infer_image_with_the_onnx_file_writes_the_same_masks(exported, tiny_dataset, tmp_path):
    checkpoint, out, _ = exported
    images = tiny_dataset / "valid_images"
    for model, folder in ((checkpoint, tmp_path / "pth"), (out, tmp_path / "onnx")):
        result = run_script("infer_image.py", "--input", images, "--model", model, "--out-dir", folder)
        assert result.returncode == 0, result.stderr[-2000:]
    assert "onnxruntime CPU (fp32)" in result.stdout
    ours, theirs = masks(tmp_path / "pth"), masks(tmp_path / "onnx")
    assert ours.keys() == theirs.keys() and len(ours) == 5
    agreement = np.mean([(ours[name] == theirs[name]).mean() for name in ours])
    assert agreement >= 0.9999
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(p.name for p in (tmp_path / "pth").iterdir())


def test_evaluate_py_scores_the_onnx_file_as_the_checkpoint(exported, tiny_dataset, tmp_path):
    checkpoint, out, _ = exported
    reports = []
    for model in (checkpoint, out):
        result = run_script(
            "evaluate.py",
            "--model",
            model,
            "--data-dir",
            tiny_dataset,
            "--split",
            "valid",
            "--out-dir",
            tmp_path,
            "--workers",
            "0",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        name = f"{model.parent.name}-{model.name}"  # outside the model's folder: its folder's name first
        reports.append(json.loads((tmp_path / f"eval_{name}_valid_whole-126x98.json").read_text()))
    assert "onnxruntime CPU (fp32)" in result.stdout
    pth, onnx_ = reports
    assert onnx_["miou"] == pytest.approx(pth["miou"], abs=1e-4) and onnx_["pixel_accuracy"] == pytest.approx(
        pth["pixel_accuracy"], abs=1e-4
    )


def test_slide_mode_and_video_run_through_onnxruntime(exported, tiny_dataset, tmp_path):
    checkpoint, out, _ = exported
    image = np.array(Image.open(sorted((tiny_dataset / "valid_images").iterdir())[0]).convert("RGB"))
    mode = InferenceMode("slide", short_side=90, crop=56, stride=28, flip=True)  # 4 windows of a batch, flipped
    expected = Predictor.from_checkpoint(checkpoint, "cpu", "off", mode).predict(image)
    assert (Predictor.from_onnx(out, "cpu", mode).predict(image) == expected).mean() >= 0.9999

    make_video(tmp_path / "clip.mp4", frames=6)
    result = run_script(
        "infer_video.py", "--input", tmp_path / "clip.mp4", "--model", out, "--out-dir", tmp_path / "video"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 frames" in result.stdout and "onnxruntime CPU (fp32)" in result.stdout
    capture = cv2.VideoCapture(str(tmp_path / "video" / "clip.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 6


def test_int8_static_argmax_export(exported, tiny_dataset, tmp_path):
    checkpoint, _, _ = exported
    out = tmp_path / "model_int8.onnx"
    result = run_script("export.py", "--model", checkpoint, "--out", out, "--int8", "--argmax", "--no-dynamic")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8: lowest argmax agreement" in result.stdout and "not held to the float32 tolerance" in result.stdout
    assert out.stat().st_size < checkpoint.stat().st_size / 2  # int8 weights
    network = OnnxNetwork(out, device="cpu")
    assert network.info["output"] == "classes" and network.static_size == (98, 126)
    scores = network(torch.randn(1, 3, 98, 126))
    assert scores.shape == (1, 21, 98, 126) and torch.equal(scores.sum(1), torch.ones(1, 98, 126))  # one-hot
    result = run_script(
        "infer_image.py",
        "--input",
        tiny_dataset / "valid_images",
        "--model",
        out,
        "--mode",
        "slide",
        "--out-dir",
        tmp_path / "slide",
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {out}: exported for 126x98 inputs only: it runs with --mode whole at that size (no --imgsz, --native, "
        "--scales); export with --dynamic for the others"
    ]
    assert not (tmp_path / "slide").exists()


def test_centre_padded_model_exports_at_odd_sizes(tmp_path):
    """Meta's padding (the paper recipe's models) is also computed in the graph."""
    from dinokit.data.labels import VOC
    from dinokit.tasks.segmentation import segmentation_model

    torch.manual_seed(0)
    model = segmentation_model(21, source="timm", pretrained=False, padding="center", head_layers=1).eval()
    proto = export_network(model, size=(56, 70), dynamic=True)
    write_metadata(
        proto,
        describe_model(get_task("segmentation"), model, VOC, (70, 56)),
        output="logits",
        precision="fp32",
        dynamic=True,
        summary="segmentation (21 classes)",
    )
    onnx.save(proto, tmp_path / "centre.onnx")
    network = OnnxNetwork(tmp_path / "centre.onnx", device="cpu")
    for size in ((57, 71), (30, 100)):
        images = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(network(images), model(images), atol=1e-4, rtol=1e-4)


def test_broken_onnx_files_are_one_line_errors(exported, tiny_dataset, tmp_path):
    _, out, _ = exported
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(out.read_bytes()[:5000])
    foreign = tmp_path / "foreign.onnx"  # a valid ONNX graph, but not one of ours
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["logits"])],
        "g",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign)
    expected = {
        truncated: f"error: {truncated}: not a readable ONNX model (truncated or not an ONNX file): ",
        foreign: f"error: {foreign}: an ONNX model without this project's metadata",
    }
    for path, message in expected.items():
        result = run_script(
            "infer_image.py", "--input", tiny_dataset / "valid_images", "--model", path, "--out-dir", tmp_path / "out"
        )
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(message), result.stderr
        assert not (tmp_path / "out").exists()
    result = run_script("export.py", "--model", out)  # an .onnx is not a checkpoint to export
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {out}: is an ONNX model, not a training checkpoint; it goes to --model of "
        "infer_image.py / infer_video.py / evaluate.py / app.py"
    )


def test_failed_self_check_writes_nothing(exported, tmp_path, monkeypatch, capsys):
    import export
    from dinokit.errors import UserError

    checkpoint, _, _ = exported
    monkeypatch.setattr(export, "self_check", lambda *a, **k: [export.Agreement("random", (98, 126), 0.5, 0.97)])
    out = tmp_path / "model.onnx"
    args = export.get_args_parser().parse_args(["--model", str(checkpoint), "--out", str(out)])
    with pytest.raises(
        UserError,
        match=r"export check failed: max \|logit diff\| 5.00e-01, lowest argmax agreement "
        r"97.0000 % .* nothing was written",
    ):
        export.main(args)
    assert list(tmp_path.iterdir()) == []


def test_the_documented_snippet_runs_the_file_without_pytorch(exported, tiny_dataset, tmp_path):
    """docs/export.md: the file alone, with numpy, Pillow and onnxruntime."""
    import re
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    _, out, _ = exported
    section = (ROOT / "docs" / "export.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shutil.copy(out, tmp_path / "best_model_iou.onnx")
    shutil.copy(sorted((tiny_dataset / "valid_images").iterdir())[0], tmp_path / "photo.jpg")
    code = (
        "import sys; sys.modules['torch'] = None\n" + snippet + "\nprint(mask.shape, mask.max() < len(meta['classes']))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["(98,", "126)", "True"]


def test_weights_too_large_for_one_onnx_file_are_refused_before_tracing(exported, tmp_path, monkeypatch):
    import export
    from dinokit.errors import UserError

    checkpoint, _, _ = exported
    monkeypatch.setattr(export, "SINGLE_FILE_LIMIT", 1000)  # ViT-g's 4.4 GB, scaled down
    args = export.get_args_parser().parse_args(["--model", str(checkpoint), "--out", str(tmp_path / "m.onnx")])
    with pytest.raises(
        UserError, match=r"of float32 weights \(dinov2_vits14\) do not fit one ONNX file \(protobuf's 2 GB limit\)"
    ):
        export.main(args)
    assert list(tmp_path.iterdir()) == []
