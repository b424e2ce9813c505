"""train.py --tensorboard: the curves and example predictions are in the event files, at the right steps."""

import csv
import math

import pytest

from tests.conftest import OFFLINE, run_script

pytestmark = pytest.mark.slow  # every test reads a trained run's event files

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="pip install tensorboard"
)


def read_events(folder):
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalars(events, tag):
    return {event.step: event.value for event in events.Scalars(tag)}


@pytest.fixture(scope="module")
def board_run(tiny_dataset, tmp_path_factory):
    """2 epochs of 3 steps (12 images, batch 4), poly schedule, examples every epoch."""
    out = tmp_path_factory.mktemp("board") / "run"
    result = run_script(
        "train.py",
        "--data-dir",
        tiny_dataset,
        "--epochs",
        "2",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "4",
        "--scheduler",
        "poly",
        "--tensorboard",
        "--tensorboard-images",
        "2",
        "--out-dir",
        out,
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_per_step_loss_and_learning_rate(board_run):
    out, stdout = board_run
    assert f"TensorBoard: {out / 'tensorboard'}" in stdout
    events = read_events(out / "tensorboard")
    losses, rates = scalars(events, "step/loss"), scalars(events, "step/lr")
    assert sorted(losses) == sorted(rates) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
    # poly (power 1) over 6 steps from 1e-4: the rate each step used
    assert [rates[s] for s in range(1, 7)] == pytest.approx([1e-4 * (1 - s / 6) for s in range(6)], rel=1e-6)


def test_epoch_scalars_equal_metrics_csv(board_run):
    out, _ = board_run
    events = read_events(out / "tensorboard")
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for tag, column in (
        ("loss/train", "train_loss"),
        ("loss/valid", "valid_loss"),
        ("miou/valid", "valid_miou"),
        ("pixel_accuracy/train", "train_pixacc"),
        ("miou/train", "train_miou"),
    ):
        assert scalars(events, tag) == pytest.approx({int(r["epoch"]): float(r[column]) for r in rows}, rel=1e-6), tag
    per_class = [tag for tag in events.Tags()["scalars"] if tag.startswith("iou_valid/")]
    assert "iou_valid/background" in per_class and sorted(scalars(events, per_class[0])) == [1, 2]


def test_example_predictions_beside_the_ground_truth(board_run, tiny_dataset):
    out, _ = board_run
    events = read_events(out / "tensorboard")
    names = sorted(p.stem for p in (tiny_dataset / "valid_images").iterdir())[:2]
    assert sorted(events.Tags()["images"]) == [f"valid/{name} (truth | prediction)" for name in names]
    for tag in events.Tags()["images"]:
        images = events.Images(tag)
        assert [i.step for i in images] == [1, 2]
        assert (images[0].width, images[0].height) == (2 * 120, 90)  # original size, truth | prediction


def test_exist_ok_removes_the_previous_runs_events(board_run, tiny_dataset):
    out, _ = board_run
    result = run_script(
        "train.py",
        "--data-dir",
        tiny_dataset,
        "--epochs",
        "1",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "4",
        "--out-dir",
        out,
        "--exist-ok",
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorboard" in result.stdout.split("--exist-ok: deleted the previous run's")[1].splitlines()[0]
    assert not (out / "tensorboard").exists()
