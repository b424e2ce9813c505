"""infer_image.py, infer_video.py and the notebook, run on a checkpoint from a real (tiny) training run."""

import cv2
import numpy as np
import pytest
from PIL import Image

from dinokit.prediction.drawing import indexed_png, overlay
from dinokit.prediction.videos import write_video
from inference import Predictor
from tests.conftest import ROOT, run_script
from tests.test_heads import mmseg_head_file


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run[0] / "best_model_iou.pth"


def test_predictor_returns_a_mask_of_the_original_size(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert predictor.imgsz == (126, 98) and len(predictor.classes) == 21
    for height, width in ((333, 517), (17, 1000), (98, 126)):
        image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        mask = predictor.predict(image)
        assert mask.shape == (height, width) and mask.dtype == np.uint8 and mask.max() < 21


def test_indexed_png_stores_class_indices_with_the_palette(checkpoint, tmp_path):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    mask = np.array([[0, 1, 15], [20, 255, 0]], dtype=np.uint8)
    indexed_png(mask, predictor.color_map).save(tmp_path / "m.png")
    loaded = Image.open(tmp_path / "m.png")
    assert loaded.mode == "P" and np.array_equal(np.array(loaded), mask)
    assert loaded.getpalette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]  # person
    assert loaded.getpalette()[255 * 3 : 255 * 3 + 3] == [224, 224, 192]  # void


def test_overlay_leaves_background_pixels_untouched(checkpoint):
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = 15
    blended = overlay(image, mask, predictor.color_map, alpha=0.5)
    assert (blended[1:, 1:] == 100).all()
    assert blended[0, 0].tolist() == [146, 114, 114]  # halfway between grey 100 and person (192,128,128)


def test_overlay_blends_every_pixel_but_black_classes_as_colours_over_the_image():
    """The overlay's definition, pixel by pixel (VOC: background black, void for ignored pixels)."""
    from dinokit.data.labels import VOC

    color_map, rng = VOC.color_map(), np.random.default_rng(0)
    image = rng.integers(0, 255, (61, 83, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (61, 83)).astype(np.uint8)
    mask[:20, :30], mask[40:, 50:] = 0, 255  # background, and ignored pixels
    colours = color_map.decode(mask)
    expected = cv2.addWeighted(image, 0.7, colours, 0.3, 0)
    black = (colours == 0).all(axis=-1)
    expected[black] = image[black]
    assert np.array_equal(overlay(image, mask, color_map, alpha=0.3), expected)
    assert black[:20, :30].all() and not black[40:, 50:].any()


@pytest.mark.slow
def test_infer_image_on_a_folder_of_odd_sizes(checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    cv2.imwrite(str(folder / "wide.jpg"), rng.integers(0, 255, (333, 517, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 255, (50, 70), dtype=np.uint8))  # grayscale: converted
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out"
    result = run_script("infer_image.py", "--input", folder, "--model", checkpoint, "--out-dir", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: skipped" in result.stderr and "broken.jpg" in result.stderr
    assert "2 images (1 skipped)" in result.stdout and "ms/image" in result.stdout
    assert cv2.imread(str(out / "wide.jpg")).shape == (333, 517, 3)
    assert Image.open(out / "wide_mask.png").size == (517, 333) and Image.open(out / "wide_mask.png").mode == "P"
    assert Image.open(out / "gray_mask.png").size == (70, 50)
    assert sorted(p.name for p in out.iterdir()) == ["gray.jpg", "gray_mask.png", "wide.jpg", "wide_mask.png"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda tmp: tmp / "missing", "no such file or folder"),
        (lambda tmp: tmp, "no image files"),
    ],
)
def test_infer_image_errors(checkpoint, tmp_path, make_input, message):
    result = run_script(
        "infer_image.py", "--input", make_input(tmp_path), "--model", checkpoint, "--out-dir", tmp_path / "o"
    )
    assert result.returncode == 1 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_infer_image_rejects_a_truncated_checkpoint(checkpoint, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(checkpoint.read_bytes()[:1000])
    (tmp_path / "a.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((20, 20, 3), np.uint8))[1].tobytes())
    result = run_script("infer_image.py", "--input", tmp_path / "a.jpg", "--model", broken, "--out-dir", tmp_path / "o")
    assert (
        result.returncode == 1
        and "broken.pth: not a readable training checkpoint (truncated or damaged)" in result.stderr
    )


def make_video(path, frames=20, size=(150, 110), fps=12.0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    writer.release()


def read_video(path):
    capture = cv2.VideoCapture(str(path))
    fps, size = capture.get(cv2.CAP_PROP_FPS), (int(capture.get(3)), int(capture.get(4)))
    count = 0
    while capture.read()[0]:
        count += 1
    return count, size, fps


@pytest.mark.slow
def test_infer_video_keeps_frame_count_size_and_fps(checkpoint, tmp_path):
    make_video(tmp_path / "clip.mp4", frames=20, size=(150, 110), fps=12.0)
    result = run_script(
        "infer_video.py",
        "--input",
        tmp_path / "clip.mp4",
        "--model",
        checkpoint,
        "--out-dir",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_video(tmp_path / "out" / "clip.mp4") == (20, (150, 110), 12.0)
    assert "20 frames, average" in result.stdout and "FPS" in result.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["clip.mp4"]  # no partial file left


@pytest.mark.slow
def test_infer_video_truncated_clip_ends_cleanly_with_a_playable_file(checkpoint, tmp_path):
    make_video(tmp_path / "clip.avi", frames=20, size=(96, 64), fps=10.0)
    data = (tmp_path / "clip.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])  # the rest of the stream is missing
    result = run_script(
        "infer_video.py", "--input", tmp_path / "cut.avi", "--model", checkpoint, "--out-dir", tmp_path / "out"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frames, size, _ = read_video(tmp_path / "out" / "cut.mp4")
    assert 0 < frames < 20 and size == (96, 64)


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("name, content", [("fake.mp4", b"\x00" * 1000), ("notes.jpg", b"a text file, not a video")])
def test_infer_video_unopenable_input_is_an_error(checkpoint, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)  # OpenCV "opens" notes.jpg as an image sequence without a frame size
    result = run_script(
        "infer_video.py", "--input", tmp_path / name, "--model", checkpoint, "--out-dir", tmp_path / "out"
    )
    assert result.returncode == 1 and f"{name}: cannot be opened as a video" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def run_notebook(parameters: str, name: str = "visualize.ipynb") -> list:
    """Execute notebooks/<name> headless with its parameters cell replaced; its outputs."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])).source = parameters
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


@pytest.mark.slow
def test_notebook_shows_a_released_head_without_training(tiny_dataset, tmp_path):
    mmseg_head_file(tmp_path / "voc_linear.pth", 384, 21)
    outputs = run_notebook(
        f"DATA_DIR = {str(tiny_dataset)!r}\nCHECKPOINT = None\nHEAD_WEIGHTS = {str(tmp_path / 'voc_linear.pth')!r}\n"
        "BACKBONE = dict(source='timm', pretrained=False)\nNUM_SAMPLES = 1\nDEVICE = 'cpu'\n"
        "MODE = 'slide'\nSCALES = [1.0]\nFLIP = False"
    )
    text = "".join(o.get("text", "") for o in outputs)
    assert "no training curves" in text and "slide" in text and "mIoU" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # samples, predictions, confusion matrix


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        ("--native", "--flip"),
        ("--mode", "slide", "--short-side", "42", "--crop", "42", "--stride", "28", "--scales", "1.0", "1.5", "--flip"),
    ],
)
def test_infer_image_in_every_inference_mode(checkpoint, tmp_path, mode):
    cv2.imwrite(str(tmp_path / "odd.jpg"), np.random.default_rng(3).integers(0, 255, (45, 61, 3), dtype=np.uint8))
    result = run_script(
        "infer_image.py",
        "--input",
        tmp_path / "odd.jpg",
        "--model",
        checkpoint,
        "--out-dir",
        tmp_path / "o",
        "--device",
        "cpu",
        *mode,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "o" / "odd_mask.png").size == (61, 45)
    assert ("+ flip" in result.stdout) and (("slide" in result.stdout) == ("slide" in mode))


def test_an_odd_sized_clip_keeps_its_last_column_and_row(tmp_path):
    frame = np.zeros((119, 161, 3), np.uint8)
    frame[:, -1] = 255  # a white last column and row: what the encoder used to crop away
    frame[-1, :] = 255
    assert write_video(tmp_path / "clip.mp4", [frame] * 3, 10, (161, 119)) == 3
    capture = cv2.VideoCapture(str(tmp_path / "clip.mp4"))
    ok, decoded = capture.read()
    capture.release()
    assert ok and decoded.shape == (120, 162, 3)  # padded to the codec's even sides, never cropped
    assert decoded[:, 160].mean() > 200 and decoded[118].mean() > 200
    assert decoded[10:100, 10:150].mean() < 20


@pytest.mark.slow
def test_infer_video_keeps_an_odd_sized_clip_whole(checkpoint, tmp_path):
    clip = tmp_path / "odd.gif"  # OpenCV's own writers crop odd sizes even for lossless codecs; a GIF keeps them
    frames = [Image.fromarray(np.full((119, 161, 3), 60 * i, np.uint8)) for i in range(3)]
    frames[0].save(clip, save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = run_script("infer_video.py", "--input", clip, "--model", checkpoint, "--out-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    capture = cv2.VideoCapture(str(tmp_path / "out" / "odd.mp4"))
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (162, 120)
    capture.release()
