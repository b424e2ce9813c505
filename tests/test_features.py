"""visualize_features.py: the PCA against hand-made cases, colours shared across images, the
foreground split, and the script on images, a video and bad inputs (random-init ViT-S/14)."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.backbones.feature_pca import fit_pca, foreground_split
from tests.conftest import run_script
from tests.test_inference import make_video

BACKBONE = ("--source", "timm", "--no-pretrained", "--imgsz", "70", "56")


def orthonormal(dim, count, seed=0):
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.float()  # [count, dim]


def test_pca_finds_known_directions_in_order_of_variance():
    directions = orthonormal(16, 3)
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(5000, 3, generator=generator) * torch.tensor([3.0, 2.0, 1.0])  # variances 9, 4, 1
    features = weights @ directions + 0.01 * torch.randn(5000, 16, generator=generator) + 5.0
    pca = fit_pca(features)
    for found, expected in zip(pca.components, directions):
        assert abs(float(found @ expected)) == pytest.approx(1.0, abs=1e-3)  # the direction, up to sign
    assert pca.variance.tolist() == pytest.approx([9.0, 4.0, 1.0], rel=0.08)
    assert torch.allclose(pca.mean, torch.full((16,), 5.0), atol=0.1)
    assert all(row[row.abs().argmax()] > 0 for row in pca.components)  # the sign convention: reruns agree


def test_the_same_feature_gets_the_same_colour_in_every_image():
    vectors = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    first = vectors[torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2])].reshape(3, 3, 32)  # two "images" sharing vectors
    second = vectors[torch.tensor([5, 4, 3, 2, 1, 0, 5, 4, 3])].reshape(3, 3, 32)
    pca = fit_pca(torch.cat([first.reshape(-1, 32), second.reshape(-1, 32)]))
    colours_a, colours_b = pca.colors(first), pca.colors(second)
    assert torch.equal(colours_a[0, 0], colours_b[1, 2]) and torch.equal(colours_a[1, 1], colours_b[0, 1])
    assert colours_a.min() >= 0 and colours_a.max() <= 1 and colours_a.shape == (3, 3, 3)
    distinct = {tuple(c.tolist()) for c in pca.colors(vectors)}
    assert len(distinct) == 6


@pytest.mark.parametrize("object_share", [0.25, 0.75])
def test_foreground_is_the_smaller_side_of_the_first_component(object_share):
    first = torch.zeros(8, 8)
    count = int(64 * object_share)
    first.view(-1)[:count] = 0.9  # one block of patches far along the first component
    first.view(-1)[count:] = 0.1
    mask, flipped = foreground_split(first, 0.5)
    expected = torch.zeros(64, dtype=torch.bool)
    expected[:count] = True
    if object_share > 0.5:  # the high side is the larger one: it is the background
        expected = ~expected
    assert torch.equal(mask.view(-1), expected) and flipped == (object_share > 0.5)


@pytest.mark.slow
def test_images_get_a_map_and_an_overlay_at_their_size(tiny_dataset, tmp_path):
    out = tmp_path / "maps"
    result = run_script(
        "visualize_features.py",
        "--input",
        tiny_dataset / "valid_images",
        "--out-dir",
        out,
        "--save-features",
        "--layer",
        "9",
        *BACKBONE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PCA of block 9 over 5 images (5x4 patches each): all 100 patches" in result.stdout
    names = sorted(p.stem for p in (tiny_dataset / "valid_images").iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}_pca.png" for n in names] + [f"{n}_overlay.jpg" for n in names] + ["features.pt"]
    )
    side_by_side = np.array(Image.open(out / f"{names[0]}_pca.png"))
    assert side_by_side.shape == (90, 240, 3)  # image | map, at the image's 120x90
    colours = side_by_side[:, 120:].reshape(-1, 3)
    assert len(np.unique(colours, axis=0)) <= 20  # nearest upsampling: one colour per patch
    saved = torch.load(out / "features.pt")
    assert saved["features"].shape == (5, 4, 5, 384) and saved["grid"] == (4, 5) and saved["names"] == names
    assert saved["layer"] == 9


@pytest.mark.slow
def test_foreground_run_blacks_out_the_background(tiny_dataset, tmp_path):
    result = run_script(
        "visualize_features.py",
        "--input",
        tiny_dataset / "valid_images",
        "--out-dir",
        tmp_path,
        "--foreground",
        "0.5",
        "--upsample",
        "bilinear",
        *BACKBONE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "foreground = first component" in result.stdout and "the larger side is background" in result.stdout
    maps = [np.array(Image.open(p))[:, 120:] for p in sorted(tmp_path.glob("*_pca.png"))]
    black = np.mean([(m == 0).all(-1).mean() for m in maps])
    assert 0.3 < black < 1.0  # the larger side, masked; the rest coloured


@pytest.mark.slow
def test_video_map_keeps_frame_count_size_and_fps(tmp_path):
    make_video(tmp_path / "clip.mp4", frames=7, size=(64, 48), fps=12.0)
    result = run_script(
        "visualize_features.py",
        "--input",
        tmp_path / "clip.mp4",
        "--out-dir",
        tmp_path / "out",
        "--side-by-side",
        "--batch",
        "3",
        *BACKBONE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 frames" in result.stdout
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip_pca.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 7 and capture.get(cv2.CAP_PROP_FPS) == pytest.approx(12.0)
    assert (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (128, 48)


@pytest.mark.slow
def test_a_sampled_pca_when_the_features_do_not_fit(tiny_dataset, tmp_path):
    result = run_script(
        "visualize_features.py",
        "--input",
        tiny_dataset / "valid_images",
        "--out-dir",
        tmp_path,
        "--max-memory-gb",
        "0",
        "--pca-sample",
        "30",
        *BACKBONE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "a seeded sample of 30 patches (features recomputed for the maps" in result.stdout
        and len(list(tmp_path.glob("*_pca.png"))) == 5
    )


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    Image.new("RGB", (40, 30)).save(tmp_path / "one.png")
    cases = {
        (
            tmp_path / "empty",
        ): f"error: {tmp_path / 'empty'}: no image files (.jpg, .jpeg, .png, .bmp, .webp, .tif, .tiff)",
        (
            tmp_path / "broken.mp4",
        ): f"error: {tmp_path / 'broken.mp4'}: cannot be opened as a video (corrupt or unsupported codec)",
        (tmp_path / "one.png", "--layer", "13"): "error: --layer 13: dinov2_vits14 has blocks 1 to 12",
    }
    for args, message in cases.items():
        result = run_script("visualize_features.py", "--input", *args, "--out-dir", tmp_path / "out", *BACKBONE)
        # (FFmpeg itself may print a line about the broken file before ours)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == message, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_features_notebook_executes_headless(tiny_dataset):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    from tests.conftest import ROOT

    notebook = nbformat.read(ROOT / "notebooks" / "features.ipynb", as_version=4)
    next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])).source = (
        f"IMAGES = {str(tiny_dataset / 'valid_images')!r}\nBACKBONE = dict(source='timm', pretrained=False)\n"
        "IMGSZ = (70, 56)\nLAYER = None\nNUM_IMAGES = 3\nFOREGROUND = 0.5"
    )
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "block 12, 3 images, 5x4 patches each" in text and "foreground:" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
