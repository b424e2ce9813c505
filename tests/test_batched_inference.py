"""The batched, pipelined prediction path gives today's results exactly, whatever the batch and threads."""

import threading
import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import model_with_head
from dinokit.data.resize import eval_transform, preprocess
from dinokit.prediction.drawing import most_interior_point
from dinokit.prediction.modes import InferenceMode
from dinokit.prediction.pipeline import BackgroundWriter, in_background, ordered_map, predicted_folder
from dinokit.prediction.scores import contending_classes, predicted_classes, upsampled_classes
from dinokit.prediction.videos import frame_predictions, predicted_frames
from dinokit.tasks.segmentation import segmentation_model
from dinokit.tasks.task import OutputOptions
from inference import Predictor, predict_scores
from tests.conftest import run_script
from tests.test_depth import BACKBONE, meta_file
from tests.test_inference import make_video, read_video

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INFO = {  # the description of the model below (its backbone and its classes)
    "task": "segmentation",
    "arch": {"backbone": "small", "registers": False, "source": "timm"},
    "classes": [f"class {i}" for i in range(5)],
    "colors": [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]],
    "ignore_colors": [],
    "ignore_index": 255,
    "mask_format": "auto",
    "imgsz": [56, 42],
    "mean": list(MEAN),
    "std": list(STD),
}
ODD_SIZES = [(101, 77), (101, 77), (64, 300), (33, 35), (101, 77)]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = segmentation_model(5, source="timm", pretrained=False).eval()
    return Predictor(model, INFO, device=torch.device("cpu"))


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def segment_classes(predictor, image):
    """Today's prediction: `segment` (resize + normalise on the CPU, per image) and the argmax."""
    scores = predict_scores(predictor.model, image, predictor.mode, mean=MEAN, std=STD, device=predictor.device)
    return predicted_classes(scores, 0).to(torch.uint8).numpy()


@pytest.mark.parametrize("size, imgsz", [((37, 53), (41, 30)), ((375, 500), (644, 644)), ((99, 101), (101, 99))])
def test_normalising_on_the_device_gives_validation_preprocessing_exactly(size, imgsz):
    image = random_images([size])[0]
    expected = eval_transform(imgsz, MEAN, STD)(image=image)["image"].transpose(2, 0, 1)
    assert torch.equal(preprocess(image, imgsz[::-1], MEAN, STD)[0], torch.from_numpy(np.ascontiguousarray(expected)))


def test_upsampled_classes_are_the_argmax_of_the_full_interpolation():
    generator = torch.Generator().manual_seed(0)
    for trial in range(120):
        batch, classes = 1 + trial % 3, 1 + trial % 23
        height, width = 1 + trial % 17, 1 + (trial * 7) % 19
        scores = torch.randn(batch, classes, height, width, generator=generator) * 10.0 ** (trial % 5 - 2)
        if trial % 4 == 0:  # one-hot scores (an ONNX file exported with --argmax): ties everywhere
            winners = torch.randint(0, classes, (batch, height, width), generator=generator)
            scores = F.one_hot(winners, classes).permute(0, 3, 1, 2).float()
        if trial % 4 == 1:
            scores[:, classes // 2] += 3  # one class far ahead: the others are left out
        size = (1 + (trial * 13) % 97, 1 + (trial * 29) % 113)  # up and down
        full = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
        assert torch.equal(upsampled_classes(scores, size).long(), predicted_classes(full)), trial


def test_a_class_never_first_at_a_pixel_can_still_win_between_pixels():
    """Left pixel: A 10, B 0, C 9; right pixel: A 0, B 10, C 9. Half-way C (9) beats A and B (5)."""
    scores = torch.tensor([[10.0, 0.0], [0.0, 10.0], [9.0, 9.0], [-5.0, -5.0]])[None, :, None, :]
    assert contending_classes(scores).tolist() == [0, 1, 2]  # D is behind everywhere: left out
    assert upsampled_classes(scores, (1, 4)).tolist() == [[[0, 2, 2, 1]]]


def test_predict_and_batches_of_any_size_give_segments_masks_exactly(predictor):
    images = random_images(ODD_SIZES)
    expected = [segment_classes(predictor, image) for image in images]
    assert all(np.array_equal(predictor.predict(image), mask) for image, mask in zip(images, expected))
    prepared = [predictor.prepare(image) for image in images]
    for batch in (2, 5):
        masks = [m for start in range(0, 5, batch) for m in predictor.predict_prepared(prepared[start : start + batch])]
        assert all(mask.dtype == np.uint8 and np.array_equal(mask, e) for mask, e in zip(masks, expected))
    native = predictor.with_mode(InferenceMode(native=True))  # every image at its own size
    masks = native.predict_prepared([native.prepare(image) for image in images])
    assert all(np.array_equal(mask, segment_classes(native, image)) for mask, image in zip(masks, images))


def test_depth_one_by_one_is_segment_exactly_and_batches_agree_to_float_rounding(tmp_path):
    """A batch changes the shapes the matrix products run at, and with them the order of a few
    additions (this depth model on this CPU: 2e-6 m); one image at a time is today's path exactly."""
    model, info = model_with_head(meta_file(tmp_path / "dinov2_vits14_nyu_linear_head.pth", "linear"), **BACKBONE)
    depth = Predictor(model, info, device=torch.device("cpu"), mode=InferenceMode(imgsz=(84, 56)))
    images = random_images(ODD_SIZES[:4])
    batched = depth.predict_prepared([depth.prepare(image) for image in images])
    for image, metres in zip(images, batched):
        with torch.inference_mode():
            expected = predict_scores(
                model,
                image,
                depth.mode,
                mean=info["mean"],
                std=info["std"],
                device=depth.device,
                combine=lambda scores: scores,
            )
        assert np.array_equal(depth.predict(image), expected[0].numpy())
        assert metres.dtype == np.float32 and metres.shape == image.shape[:2]
        np.testing.assert_allclose(metres, expected[0].numpy(), rtol=1e-5)


def test_other_modes_go_image_by_image_through_predict_scores(predictor):
    flip = predictor.with_mode(InferenceMode(imgsz=(56, 42), flip=True, scales=(1.0, 1.5)))
    images = random_images(ODD_SIZES[:3])
    masks = flip.predict_prepared([flip.prepare(image) for image in images])
    assert all(np.array_equal(mask, segment_classes(flip, image)) for mask, image in zip(masks, images))


def test_folder_predictions_do_not_depend_on_batch_or_workers(predictor, tmp_path):
    paths = []
    for index, image in enumerate(random_images(ODD_SIZES)):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(image).save(paths[-1])
    paths.insert(2, tmp_path / "broken.jpg")
    paths[2].write_bytes(b"not an image")
    results = {}
    for batch, workers in ((1, 0), (3, 2)):
        timings = []
        items = list(
            predicted_folder(paths, predictor, predictor.prepare, batch=batch, workers=workers, timings=timings)
        )
        assert [item.path for item in items] == paths and len(timings) == 5
        assert items[2].prediction is None and "broken.jpg" in items[2].error
        results[batch] = [item.prediction for item in items if item.error is None]
    expected = [segment_classes(predictor, np.array(Image.open(path))) for path in paths if path.suffix == ".png"]
    for masks in results.values():
        assert all(np.array_equal(mask, e) for mask, e in zip(masks, expected))


def test_video_predictions_do_not_depend_on_batch_or_threads(predictor):
    frames = random_images([(60, 80)] * 7, seed=3)
    expected = [segment_classes(predictor, frame) for frame in frames]
    for batch, ahead in ((1, 0), (3, 0), (3, 6), (4, 2)):
        predicted = list(frame_predictions(iter(frames), predictor, [], batch=batch, ahead=ahead))
        assert len(predicted) == 7 and all(f is frame for (f, _, _), frame in zip(predicted, frames))
        assert all(np.array_equal(mask, e) for (_, mask, _), e in zip(predicted, expected))


def test_closing_a_pipelined_video_stops_its_threads(predictor):
    before = threading.active_count()
    draw, size = predictor.task.frame_drawer(predictor.info, (80, 60), OutputOptions())
    frames = predicted_frames(
        (frame for frame in random_images([(60, 80)] * 50)), predictor, draw, [], batch=2, workers=2
    )
    next(frames), next(frames)
    assert threading.active_count() > before
    frames.close()
    assert threading.active_count() == before and size == (80, 60)


def test_background_items_keep_their_order_and_raise_where_they_failed():
    def numbers():
        yield from range(5)
        raise OSError("disk gone")

    produced = []
    with pytest.raises(OSError, match="disk gone"):
        for item in in_background(numbers(), ahead=2):
            produced.append(item)
    assert produced == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("threads", [0, 3])
def test_frames_drawn_by_threads_come_back_in_order_and_errors_at_their_frame(threads):
    def slow_square(n):
        time.sleep(0.001 * (n % 4))  # later items often finish first
        if n == 7:
            raise ValueError("cannot draw frame 7")
        return n * n

    results = ordered_map(slow_square, iter(range(7)), threads)
    assert list(results) == [n * n for n in range(7)]
    drawn = []
    with pytest.raises(ValueError, match="frame 7"):
        for square in ordered_map(slow_square, iter(range(20)), threads):
            drawn.append(square)
    assert drawn == [n * n for n in range(7)]


@pytest.mark.parametrize("threads", [0, 2])
def test_background_writer_runs_every_job_and_raises_the_first_error(threads):
    done = []
    with BackgroundWriter(threads) as writer:
        for index in range(10):
            writer.submit(done.append, index)
    assert sorted(done) == list(range(10))

    def fail(index):
        raise ValueError(f"cannot write {index}")

    with pytest.raises(ValueError, match="cannot write"), BackgroundWriter(threads) as writer:
        for index in range(10):
            writer.submit(fail, index)


def test_class_names_go_where_a_whole_image_distance_transform_puts_them():
    """most_interior_point works on the region's bounding box only; the point is the whole image's."""
    rng = np.random.default_rng(0)
    for trial in range(150):
        height, width = rng.integers(1, 80, 2)
        blocks = rng.integers(0, 4, (max(1, height // 8), max(1, width // 8))).astype(np.uint8)
        mask = cv2.resize(blocks, (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
        if trial % 3 == 0:
            mask = rng.integers(0, 3, (height, width)).astype(np.uint8)  # scattered pixels, ties everywhere
        for cls in np.unique(mask):
            distance = cv2.distanceTransform(np.pad((mask == cls).astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
            expected = np.unravel_index(distance.argmax(), distance.shape)
            assert most_interior_point(mask == cls) == tuple(int(v) for v in expected), trial


@pytest.mark.slow
def test_infer_image_writes_the_same_files_for_any_batch_and_workers(trained_run, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(random_images(ODD_SIZES)):
        cv2.imwrite(str(folder / f"{index}.jpg"), image)
    (folder / "broken.jpg").write_bytes(b"not an image")
    checkpoint = trained_run[0] / "best_model_iou.pth"
    outputs = {}
    for batch, workers in (("1", "0"), ("3", "2")):
        out = tmp_path / f"out_{batch}"
        result = run_script(
            "infer_image.py", "--input", folder, "--model", checkpoint, "--out-dir", out, "--batch", batch,
            "--workers", workers, "--device", "cpu",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "5 images (1 skipped)" in result.stdout and f"batch {batch}" in result.stdout
        assert "broken.jpg" in result.stderr
        outputs[batch] = {path.name: path.read_bytes() for path in out.iterdir()}
    assert len(outputs["1"]) == 10 and outputs["1"] == outputs["3"]


@pytest.mark.slow
def test_infer_video_batched_and_threaded_keeps_every_frame(trained_run, tmp_path):
    make_video(tmp_path / "clip.mp4", frames=11, size=(150, 110), fps=12.0)
    checkpoint = trained_run[0] / "best_model_iou.pth"
    result = run_script(
        "infer_video.py", "--input", tmp_path / "clip.mp4", "--model", checkpoint, "--out-dir", tmp_path / "out",
        "--batch", "4", "--workers", "1", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_video(tmp_path / "out" / "clip.mp4") == (11, (150, 110), 12.0)
    assert "11 frames, average" in result.stdout and "batch 4" in result.stdout
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["clip.mp4"]
