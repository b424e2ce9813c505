"""Inputs and faults that used to end with exit 0 and a wrong result, or a destroyed file (issue 11).

Grouped as docs/troubleshooting.md is: data read wrongly without a word, files destroyed
or mixed up, recovery that did not recover. Scripts run as users run them, in a subprocess."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import load_checkpoint
from datasets import build_datasets, find_pairs
from dinokit.data.image_files import DatasetError, list_image_files, read_image
from dinokit.data.labels import ColorMap, load_dataset_spec, parse_dataset_spec, read_mask
from dinokit.data.synthetic import make_dataset
from dinokit.writing import json_ready, remove_stale_temp_files
from tests.conftest import OFFLINE, ROOT, dead_pid, run_script

SMALL = ("--imgsz", "56", "42", "--batch", "4")


@pytest.fixture
def dataset(tmp_path):
    return make_dataset(tmp_path / "data", n_train=6, n_valid=3, size=(64, 48), seed=1)


def train_cli(data, out, *flags, epochs="1"):
    return run_script("train.py", "--data-dir", data, "--out-dir", out, "--epochs", epochs, *SMALL, *OFFLINE, *flags)


def assert_one_line_error(result, *fragments, code=1):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


# ---------------------------------------------------------------- 1. data read wrongly without a word

BINARY_CLASSES = {"classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "defect", "color": [255, 255, 255]}]}


def make_binary_dataset(root, classes=BINARY_CLASSES, n_train=4, n_valid=2):
    """Single-channel 0/255 masks (a white square on black), the commonest custom dataset."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("valid", n_valid)):
        (root / f"{split}_images").mkdir(parents=True)
        (root / f"{split}_labels").mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((42, 56), np.uint8)
            mask[10:30, 15 + i : 40 + i] = 255
            image = rng.integers(0, 80, (42, 56, 3), dtype=np.uint8)
            image[mask > 0] = 220
            cv2.imwrite(str(root / f"{split}_images" / f"{i}.jpg"), image)
            cv2.imwrite(str(root / f"{split}_labels" / f"{i}.png"), mask)
    (root / "classes.json").write_text(json.dumps(classes))
    return root


@pytest.mark.slow
def test_binary_masks_with_a_white_class_are_read_as_that_class(tmp_path):
    data = make_binary_dataset(tmp_path / "binary")
    train, _, check = build_datasets(data, (56, 42), load_dataset_spec(data))
    assert check.spec.mask_format == "color" and "value 255 is the ignore index" in check.notes[0]
    _, mask = train.load_pair(0)
    assert set(np.unique(mask)) == {0, 1}  # the defect is class 1, not "ignore"
    result = run_script(
        "train.py",
        "--data-dir",
        data,
        "--out-dir",
        tmp_path / "run",
        "--epochs",
        "1",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "2",
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "single-channel masks are read as gray colours" in result.stdout
    assert load_checkpoint(tmp_path / "run" / "last.pth")["model_info"]["mask_format"] == "color"


def test_explicit_index_format_keeps_255_as_ignore(tmp_path):
    data = make_binary_dataset(tmp_path / "binary", dict(BINARY_CLASSES, mask_format="index"))
    _, _, check = build_datasets(data, (56, 42), load_dataset_spec(data))
    assert check.spec.mask_format == "index" and not check.notes


def test_masks_that_fit_both_readings_differently_are_refused_with_the_fix(tmp_path):
    swapped = {"classes": [{"name": "a", "color": [1, 1, 1]}, {"name": "b", "color": [0, 0, 0]}]}
    data = make_binary_dataset(tmp_path / "binary", swapped)
    for path in (data / "train_labels").iterdir():
        cv2.imwrite(str(path), (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) > 0).astype(np.uint8))  # values 0/1
    for path in (data / "valid_labels").iterdir():
        cv2.imwrite(str(path), (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) > 0).astype(np.uint8))
    with pytest.raises(DatasetError, match='both as class indices and as gray colours.*set "mask_format"'):
        build_datasets(data, (56, 42), load_dataset_spec(data))


def exif_jpeg(path, pixels, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def test_images_and_masks_follow_one_orientation_rule(tmp_path):
    raw = np.zeros((40, 60, 3), np.uint8)
    raw[:, :30] = 255  # left half white as stored
    exif_jpeg(tmp_path / "photo.jpg", raw, orientation=3)  # "rotate 180 to display"
    assert read_image(tmp_path / "photo.jpg")[:, 45:].mean() > 200  # displayed: the white half is on the right
    mask = np.zeros((40, 60), np.uint8)
    mask[:, :30] = 1
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(mask).save(tmp_path / "mask.png", exif=exif.tobytes())
    assert read_mask(tmp_path / "mask.png", ColorMap([(0, 0, 0), (1, 1, 1)]))[:, 45:].min() == 1  # the same rule


def test_a_mask_drawn_on_the_unrotated_pixels_is_explained(dataset):
    image = cv2.cvtColor(cv2.imread(str(dataset / "train_images" / "train_0000.jpg")), cv2.COLOR_BGR2RGB)
    exif_jpeg(dataset / "train_images" / "train_0000.jpg", image, orientation=6)  # displayed 48x64
    with pytest.raises(
        DatasetError, match="train_0000.png: mask is 64x48 but its image train_0000.jpg is 48x64 after its EXIF"
    ):
        build_datasets(dataset, (56, 42))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_jpeg_stops_before_training_naming_the_file(dataset, tmp_path, damage):
    path = dataset / "train_images" / "train_0004.jpg"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)  # libjpeg: "Corrupt JPEG data", decoded as garbage
    path.write_bytes(bytes(data))
    assert cv2.imread(str(path)) is not None  # OpenCV (and PIL) would have trained on it
    result = train_cli(dataset, tmp_path / "out")
    assert_one_line_error(result, "train_0004.jpg: not a readable image")
    assert "EPOCH" not in result.stdout


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"classes": [{"name": "a", "color": [1, 2, 3]}], "ignore_colour": [0, 0, 0]},
            "unknown key 'ignore_colour'.*did you mean 'ignore_color'",
        ),
        ({"classes": [{"name": "a", "color": [1, 2, 3], "colour": [1, 2, 3]}]}, r"classes\[0\]: unknown key 'colour'"),
        (
            {"classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "a", "color": [4, 5, 6]}]},
            r"classes\[1\].name 'a' is already the name of classes\[0\]",
        ),
        ({"classes": [{"name": "a", "color": [True, 0, 0]}]}, r"classes\[0\].color must be \[r, g, b\] with integers"),
        ({"classes": [{"name": "a", "color": [1.0, 0, 0]}]}, r"classes\[0\].color must be \[r, g, b\] with integers"),
        ({"classes": [{"name": "a", "color": [1, 2, 3]}], "ignore_index": True}, '"ignore_index" must be an integer'),
    ],
)
def test_dataset_descriptions_are_validated_strictly(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_dataset_spec(raw, "classes.json")


def test_documentation_keys_are_allowed():
    spec = parse_dataset_spec(
        {
            "classes": [{"name": "a", "color": [1, 2, 3]}],
            "source": "CamVid",
            "counts": {"train": 3},
            "_comment": "anything",
        },
        "classes.json",
    )
    assert spec.classes == ["a"]


def test_strict_description_through_train_py(dataset, tmp_path):
    (dataset / "classes.json").write_text(
        json.dumps({"classes": [{"name": "a", "color": [0, 0, 0]}], "ignore_colour": [1, 1, 1]})
    )
    assert_one_line_error(train_cli(dataset, tmp_path / "out"), "classes.json: unknown key 'ignore_colour'")


def test_two_files_of_one_name_are_an_error_and_hidden_files_are_skipped(dataset, tmp_path):
    (dataset / "train_images" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (dataset / "train_images" / "._train_0000.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    assert len(find_pairs(dataset, "train")) == 6
    cv2.imwrite(str(dataset / "train_images" / "train_0001.png"), np.zeros((48, 64, 3), np.uint8))
    assert_one_line_error(train_cli(dataset, tmp_path / "out"), "train_0001.jpg and train_0001.png")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "a.png"):
        cv2.imwrite(str(folder / name), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(DatasetError, match="a.jpg and a.png"):
        list_image_files(folder)


def test_a_validation_split_without_labelled_pixels_stops_before_training(dataset, tmp_path):
    for path in (dataset / "valid_labels").iterdir():
        cv2.imwrite(str(path), np.full((48, 64, 3), (192, 224, 224), np.uint8))  # all void (BGR)
    result = train_cli(dataset, tmp_path / "out")
    assert_one_line_error(result, "the valid split has no labelled pixel")
    assert "EPOCH" not in result.stdout


def test_json_reports_write_null_for_undefined_numbers(trained_run):
    assert json_ready({"a": float("nan"), "b": [1.0, float("inf")]}) == {"a": None, "b": [1.0, None]}
    text = (trained_run[0] / "best_validation.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert None in report["iou"].values()  # classes absent from the tiny split


# ---------------------------------------------------------------- 2. files destroyed or mixed up


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run[0] / "best_model_iou.pth"


@pytest.mark.slow
def test_infer_image_never_writes_over_its_inputs(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), np.full((30, 40, 3), 90, np.uint8))
    before = (folder / "a.jpg").read_bytes()
    result = run_script(
        "infer_image.py", "--input", folder, "--model", checkpoint, "--out-dir", folder, "--device", "cpu"
    )
    assert_one_line_error(result, "is the folder of the inputs")
    result = run_script(
        "infer_image.py", "--input", folder / "a.jpg", "--model", checkpoint, "--out-dir", folder, "--device", "cpu"
    )
    assert_one_line_error(result, f"--out-dir {folder}: is the folder of the inputs")
    assert (folder / "a.jpg").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["a.jpg"]


def write_video(path, frames, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), (i * 5) % 255, np.uint8))
    writer.release()


@pytest.mark.slow
def test_results_get_the_permissions_of_a_plain_file(checkpoint, tmp_path):
    # written under a private temporary name, then renamed: the result must not stay owner-only (0600)
    write_video(tmp_path / "clip.mp4", 2)
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
    assert result.returncode == 0, result.stderr[-2000:]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out" / "clip.mp4").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow
def test_infer_video_never_writes_over_its_input(checkpoint, tmp_path):
    write_video(tmp_path / "clip.mp4", 3)
    before = (tmp_path / "clip.mp4").read_bytes()
    result = run_script(
        "infer_video.py",
        "--input",
        tmp_path / "clip.mp4",
        "--model",
        checkpoint,
        "--out-dir",
        tmp_path,
        "--device",
        "cpu",
    )
    assert_one_line_error(result, f"--out-dir {tmp_path}: is the folder of the inputs")
    assert (tmp_path / "clip.mp4").read_bytes() == before


def test_an_incomplete_video_never_replaces_the_previous_result(checkpoint, tmp_path, monkeypatch):
    import infer_video

    write_video(tmp_path / "clip.mp4", 6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip.mp4").write_bytes(b"the previous, complete result")
    real_writer = cv2.VideoWriter

    class DiskFullWriter:  # what OpenCV does on a full disk: accepts frames, writes nothing
        def __init__(self, *args):
            self.writer = real_writer(*args)
            self.frames = 0

        def isOpened(self):
            return self.writer.isOpened()

        def write(self, frame):
            self.frames += 1
            if self.frames <= 2:
                self.writer.write(frame)

        def release(self):
            self.writer.release()

    monkeypatch.setattr(infer_video.cv2, "VideoWriter", DiskFullWriter)
    args = infer_video.get_args_parser().parse_args(
        ["--input", str(tmp_path / "clip.mp4"), "--model", str(checkpoint), "--out-dir", str(out), "--device", "cpu"]
    )
    with pytest.raises(
        OSError, match=r"incomplete \(2 of 6 frames; disk full\?\); any earlier result was left as it was"
    ):
        infer_video.main(args)
    assert (out / "clip.mp4").read_bytes() == b"the previous, complete result"
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4"]


@pytest.mark.slow
def test_ctrl_c_during_a_video_keeps_the_previous_result(checkpoint, tmp_path):
    write_video(tmp_path / "clip.mp4", 400)
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip.mp4").write_bytes(b"the previous, complete result")
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "infer_video.py"),
            "--input",
            str(tmp_path / "clip.mp4"),
            "--model",
            str(checkpoint),
            "--out-dir",
            str(out),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not [p for p in out.iterdir() if p.name.startswith(".clip.mp4.tmp-")] and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # some frames into the clip
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped at frame") and "clip.mp4 was left as it was" in last, last
    assert "Traceback" not in stderr
    assert (out / "clip.mp4").read_bytes() == b"the previous, complete result"
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4"]


@pytest.mark.slow
def test_a_rerun_without_resume_does_not_overwrite_the_previous_run(dataset, tmp_path):
    out = tmp_path / "run"
    assert train_cli(dataset, out).returncode == 0
    before = (out / "last.pth").read_bytes()
    assert_one_line_error(train_cli(dataset, out), "holds another run", "--resume", "--exist-ok")
    assert (out / "last.pth").read_bytes() == before
    result = train_cli(dataset, out, "--exist-ok", "--lr", "3e-4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--exist-ok: deleted the previous run's" in result.stdout
    assert load_checkpoint(out / "last.pth")["args"]["lr"] == 3e-4
    assert not (out / ".lock").exists()  # a finished run leaves no lock behind


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_at_once_is_refused(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); "
            "from pathlib import Path; from dinokit.runs.run_folder import RunLock; "
            "lock = RunLock(Path(sys.argv[2])); lock.acquire(); print('locked', flush=True); time.sleep(600)",
            str(ROOT),
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    assert_one_line_error(train_cli(dataset, out), "another run is using this folder", f"pid {holder.pid}")
    holder.send_signal(signal.SIGKILL)  # a killed run does not leave the folder blocked
    holder.wait()
    result = train_cli(dataset, out)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_temporary_files_of_killed_processes_are_removed_on_start(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    stale = out / f".last.pth.tmp-{host}-{dead_pid()}-abcd1234"
    live = out / f".last.pth.tmp-{host}-{os.getpid()}-efgh5678"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"someone is writing this")
    result = train_cli(dataset, out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Removed .last.pth.tmp-" in result.stdout
    assert not stale.exists() and live.exists()
    assert remove_stale_temp_files(out) == []


def test_a_file_cache_that_cannot_fit_on_disk_is_one_error_not_a_bus_error(tmp_path, monkeypatch):
    from dinokit.training import feature_cache

    cache = feature_cache.FeatureCache("valid", memory_budget=0, disk_dir=tmp_path)
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10**9})())
    with pytest.raises(
        OSError,
        match=r"valid feature cache needs 4.00 GB on disk but 1.00 GB are free; "
        r"free space, raise --cache-ram-gb .*--no-val-cache",
    ):
        cache.allocate(1000, (1000, 1000), torch.float32, (32, 32))  # refused before anything is allocated
    monkeypatch.undo()

    def full_disk(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feature_cache.os, "posix_fallocate", full_disk)
    with pytest.raises(OSError, match=r"could not be reserved on disk \(No space left on device\)"):
        cache.allocate(4, (16, 8, 8), torch.float32, (32, 32))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 3. recovery that does not recover


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_flags_given_on_resume_override_the_checkpoint(dataset, tmp_path):
    out = tmp_path / "run"
    assert train_cli(dataset, out, "--lr", "1e-3").returncode == 0
    result = run_script(
        "train.py",
        "--data-dir",
        dataset,
        "--out-dir",
        out,
        *SMALL,
        *OFFLINE,
        "--resume",
        out / "last.pth",
        "--epochs",
        "2",
        "--lr",
        "2e-4",
        "--weight-decay",
        "0.05",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--lr 0.0002 (was 0.001)" in result.stdout and "--weight-decay 0.05 (was 0.01)" in result.stdout
    assert [float(row["lr"]) for row in read_rows(out / "metrics.csv")] == [1e-3, 2e-4]
    checkpoint = load_checkpoint(out / "last.pth")
    assert checkpoint["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    assert {"epoch": 2, "flag": "--lr", "from": 1e-3, "to": 2e-4} in checkpoint["overrides"]
    # Not given: the checkpoint's values, not the parser's defaults.
    result = run_script(
        "train.py",
        "--data-dir",
        dataset,
        "--out-dir",
        out,
        *SMALL,
        *OFFLINE,
        "--resume",
        out / "last.pth",
        "--epochs",
        "3",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [float(row["lr"]) for row in read_rows(out / "metrics.csv")][-1] == 2e-4


@pytest.mark.slow
def test_resume_with_other_class_names_is_refused(dataset, tmp_path):
    out = tmp_path / "run"
    assert train_cli(dataset, out).returncode == 0
    spec = load_dataset_spec(dataset)
    renamed = [
        {"name": "cat" if n == "dog" else ("dog" if n == "cat" else n), "color": list(c)}
        for n, c in zip(spec.classes, spec.colors)
    ]
    (dataset / "classes.json").write_text(json.dumps({"classes": renamed, "ignore_color": [224, 224, 192]}))
    result = run_script(
        "train.py",
        "--data-dir",
        dataset,
        "--out-dir",
        out,
        *SMALL,
        *OFFLINE,
        "--resume",
        out / "last.pth",
        "--epochs",
        "2",
    )
    assert_one_line_error(result, "class 8 is 'cat' (64, 0, 0) in the checkpoint but 'dog' (64, 0, 0)")


def test_resuming_a_bf16_or_fp32_run_with_fp16_starts_a_fresh_loss_scaler():
    from train import restore_scaler

    scaler = torch.amp.GradScaler("cpu", enabled=True)
    restore_scaler(scaler, {})  # what a bf16/fp32 run saved
    assert scaler.get_scale() == 2.0**16


@pytest.mark.slow
def test_a_batch_of_one_with_a_one_token_grid_trains(dataset, tmp_path):
    result = run_script(
        "train.py",
        "--data-dir",
        dataset,
        "--out-dir",
        tmp_path / "run",
        "--epochs",
        "1",
        "--imgsz",
        "14",
        "14",
        "--batch",
        "5",
        *OFFLINE,
    )  # 6 images: batches of 5 and 1
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script(
        "train.py",
        "--data-dir",
        dataset,
        "--out-dir",
        tmp_path / "run1",
        "--epochs",
        "1",
        "--imgsz",
        "14",
        "14",
        "--batch",
        "1",
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_missing_hub_directory_is_one_line_when_run_as_a_script(tmp_path):
    result = run_script("bench.py", "--summary", "--hub-dir", tmp_path)  # no hubconf.py: no backbone to be had
    assert_one_line_error(result, "not a torch.hub directory")
