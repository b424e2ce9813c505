"""The bad-input catalogue (one clear line, exit 1, nothing half-written) and crash-safe, exact resume."""

import csv
import errno
import os
import signal
import subprocess
import sys
from functools import partial

import cv2
import numpy as np
import pytest
import torch

import train
from checkpoint import load_checkpoint, save_checkpoint
from dinokit.data.synthetic import make_dataset
from dinokit.tasks.segmentation.scoring import SegmentationScoring
from tests.conftest import OFFLINE, ROOT, run_script

SMALL = ("--imgsz", "56", "42", "--batch", "4")


@pytest.fixture
def dataset(tmp_path):
    """A fresh copy per test, free to break."""
    return make_dataset(tmp_path / "data", n_train=6, n_valid=3, size=(64, 48), seed=1)


def train_cli(data, out, *flags, workers="0"):
    flags = (*flags, "--workers", workers)
    return run_script("train.py", "--data-dir", data, "--out-dir", out, "--epochs", "1", *SMALL, *OFFLINE[:3], *flags)


def assert_one_line_error(result, *fragments):
    """Exit 1 and the error as the last line of stderr (progress bars may stand above it), no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1]


def assert_nothing_written(out):
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".pth", ".csv", ".tmp")]


def test_empty_split_folder(dataset, tmp_path):
    for f in (dataset / "valid_images").iterdir():
        f.unlink()
    result = train_cli(dataset, tmp_path / "out")
    assert_one_line_error(result, "valid_images: no image files")
    assert_nothing_written(tmp_path / "out")


def test_image_without_mask_is_listed(dataset, tmp_path):
    (dataset / "train_labels" / "train_0002.png").unlink()
    assert_one_line_error(train_cli(dataset, tmp_path / "out"), "no mask for train_0002.jpg")


def test_image_and_mask_of_different_sizes_fail_before_training(dataset, tmp_path):
    mask_path = dataset / "train_labels" / "train_0001.png"
    cv2.imwrite(str(mask_path), cv2.resize(cv2.imread(str(mask_path)), (60, 48), interpolation=cv2.INTER_NEAREST))
    result = train_cli(dataset, tmp_path / "out")
    assert_one_line_error(result, "train_0001.png: mask is 60x48 but its image train_0001.jpg is 64x48")
    assert "EPOCH" not in result.stdout


def test_garbage_image_file(dataset, tmp_path):
    (dataset / "valid_images" / "valid_0000.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert_one_line_error(train_cli(dataset, tmp_path / "out"), "valid_0000.jpg: not a readable image")


def test_truncated_mask_is_found_before_training(dataset, tmp_path):
    mask_path = dataset / "train_labels" / "train_0003.png"
    data = mask_path.read_bytes()
    mask_path.write_bytes(data[: len(data) // 3])  # header intact, pixel data cut
    result = train_cli(dataset, tmp_path / "out")
    assert_one_line_error(result, "train_0003.png: not a readable image")
    assert "EPOCH" not in result.stdout


@pytest.mark.slow
def test_unknown_mask_colour_in_validation_is_found_before_training(dataset, tmp_path):
    mask_path = dataset / "valid_labels" / "valid_0001.png"
    mask = cv2.imread(str(mask_path))
    mask[:2, :5] = (3, 2, 1)  # BGR on disk: RGB (1, 2, 3)
    cv2.imwrite(str(mask_path), mask)
    result = train_cli(dataset, tmp_path / "out", workers="1")
    assert_one_line_error(result, "valid_0001.png: colours not in the class palette", "(1,2,3) x10")
    assert "EPOCH" not in result.stdout  # not after a whole training epoch


def test_an_error_inside_a_dataloader_worker_is_one_line(dataset, tmp_path):
    from datasets import SegmentationDataset, make_loader
    from dinokit.data.labels import VOC
    from dinokit.data.resize import eval_transform
    from dinokit.errors import one_line

    pairs = [(dataset / "valid_images" / "valid_0000.jpg", dataset / "valid_labels" / "missing.png")]
    loader = make_loader(
        SegmentationDataset(pairs, VOC.color_map(), eval_transform((56, 42))), 1, shuffle=False, workers=1
    )
    with pytest.raises(Exception) as excinfo:
        next(iter(loader))
    assert one_line(excinfo.value) == f"{pairs[0][1]}: file not found"


@pytest.mark.slow
def test_grayscale_and_rgba_images_are_converted(dataset, tmp_path):
    image = cv2.imread(str(dataset / "train_images" / "train_0000.jpg"))
    cv2.imwrite(str(dataset / "train_images" / "train_0000.jpg"), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    (dataset / "train_images" / "train_0001.jpg").unlink()
    rgba = cv2.cvtColor(cv2.imread(str(dataset / "train_labels" / "train_0001.png")), cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(dataset / "train_images" / "train_0001.png"), rgba)
    result = train_cli(dataset, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, fragment",
    [
        (("--batch", "7"), "--batch 7 is larger than the training split (6 images"),
        (("--imgsz", "9000", "100"), "--imgsz 9000 100: each side must be in [14, 4096]"),
        (("--amp", "fp16", "--device", "cpu"), "--amp fp16 needs a GPU"),
        (("--grad-checkpointing",), "--grad-checkpointing only matters with --fine-tune"),
    ],
)
def test_bad_flags(dataset, tmp_path, flags, fragment):
    assert_one_line_error(train_cli(dataset, tmp_path / "out", *flags), fragment)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.slow
def test_checkpoint_of_another_class_count_is_refused(trained_run, tmp_path):
    checkpoint = load_checkpoint(trained_run[0] / "best_model_iou.pth")
    checkpoint["model_info"]["arch"]["num_classes"] = 5  # weights are for 21 classes
    torch.save(checkpoint, tmp_path / "edited.pth")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 20, 3), np.uint8))
    result = run_script(
        "infer_image.py", "--input", tmp_path / "a.png", "--model", tmp_path / "edited.pth", "--out-dir", tmp_path / "o"
    )
    assert_one_line_error(result, "checkpoint weights do not fit the model")


def test_missing_checkpoint(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 20, 3), np.uint8))
    result = run_script("infer_image.py", "--input", tmp_path / "a.png", "--model", tmp_path / "nope.pth")
    assert_one_line_error(result, "nope.pth: checkpoint not found")


def test_checkpoints_never_run_code_from_the_file(trained_run, tmp_path):
    checkpoint = load_checkpoint(trained_run[0] / "best_model_iou.pth")
    checkpoint["payload"] = subprocess.CompletedProcess(["x"], 0)  # an arbitrary pickled object
    torch.save(checkpoint, tmp_path / "tampered.pth")
    with pytest.raises(ValueError, match="tampered.pth: not a readable training checkpoint"):
        load_checkpoint(tmp_path / "tampered.pth")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkp")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        OSError, match="last.pth: could not be written \\(No space left on device\\); the previous file is unchanged"
    ):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_nan_loss_names_the_step(tiny_dataset):
    from datasets import build_datasets, make_loader
    from dinokit.tasks.segmentation import segmentation_model
    from engine import LoopSettings, NonFiniteLossError, train_one_epoch

    train_set, _, _ = build_datasets(tiny_dataset, (56, 42))
    model = segmentation_model(21, source="timm", pretrained=False)
    with torch.no_grad():
        model.head.classifier.bias.fill_(float("nan"))
    optimizer = torch.optim.AdamW(model.head.parameters())
    with pytest.raises(NonFiniteLossError, match="Train 3, step 1/3: loss is nan"):
        train_one_epoch(
            model,
            make_loader(train_set, 4, shuffle=True, workers=0),
            optimizer,
            LoopSettings(torch.device("cpu"), partial(SegmentationScoring, 21, 255)),
            epoch=3,
        )


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    import engine
    from engine import NonFiniteLossError

    real_epoch = engine.train_one_epoch

    def diverge_in_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 2:
            raise NonFiniteLossError("Train 2, step 1/2: loss is nan")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", diverge_in_epoch_2)
    args = train.get_args_parser().parse_args(
        ["--data-dir", str(dataset), "--out-dir", str(tmp_path), "--epochs", "3", *SMALL, *OFFLINE]
    )
    with pytest.raises(
        NonFiniteLossError,
        match=r"training diverged: Train 2, step 1/2: loss is nan; .*last.pth \(epoch 1\) is the last good checkpoint",
    ):
        train.main(args)
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0
    assert not (tmp_path / "final_model.pth").exists()


def read_metrics(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if k not in ("seconds",)} for row in csv.DictReader(f)]


def start_training(data, out, epochs):
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data-dir",
        str(data),
        "--out-dir",
        str(out),
        "--epochs",
        str(epochs),
        *SMALL,
        "--lr",
        "1e-3",
        *OFFLINE[:3],
        "--workers",
        "1",
        "--seed",
        "7",
    ]
    return command, subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(process, text):
    for line in process.stdout:
        if text in line:
            return
    pytest.fail(f"{text!r} never printed: {process.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_metrics(dataset, tmp_path):
    reference = run_script(
        "train.py",
        "--data-dir",
        dataset,
        "--out-dir",
        tmp_path / "straight",
        "--epochs",
        "3",
        *SMALL,
        "--lr",
        "1e-3",
        *OFFLINE[:3],
        "--workers",
        "1",
        "--seed",
        "7",
    )
    assert reference.returncode == 0, reference.stderr[-2000:]

    _, process = start_training(dataset, tmp_path / "killed", 3)
    wait_for(process, "EPOCH: 3/3")  # epochs 1 and 2 are saved; kill it in the middle of epoch 3
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(tmp_path / "killed" / "last.pth")["epoch"] == 1
    resumed = run_script(
        "train.py",
        "--data-dir",
        dataset,
        "--out-dir",
        tmp_path / "killed",
        "--epochs",
        "3",
        *SMALL,
        "--lr",
        "1e-3",
        *OFFLINE[:3],
        "--workers",
        "1",
        "--seed",
        "7",
        "--resume",
        tmp_path / "killed" / "last.pth",
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = (
        read_metrics(tmp_path / "straight" / "metrics.csv"),
        read_metrics(tmp_path / "killed" / "metrics.csv"),
    )
    assert len(got) == 3
    for row_expected, row_got in zip(expected, got):
        assert row_got == pytest.approx(row_expected, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_ctrl_c_keeps_last_checkpoint_and_prints_the_resume_command(dataset, tmp_path):
    _, process = start_training(dataset, tmp_path, 3)
    wait_for(process, "EPOCH: 2/3")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "holds epoch 1; continue with:" in stderr and f"--resume {tmp_path / 'last.pth'}" in stderr
    assert load_checkpoint(tmp_path / "last.pth")["epoch"] == 0
    assert not list(tmp_path.glob(".*.tmp"))
