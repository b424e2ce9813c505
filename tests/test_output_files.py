"""What the scripts write: into folders they own, never over their inputs or another run's results,
atomically (a killed, interrupted or disk-full write leaves the previous file), with plain-file
permissions, and reports that say what was evaluated."""

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from dinokit.runs.run_folder import CLASSIFIER_RESULTS
from dinokit.writing import json_ready, remove_stale_temp_files
from tests.conftest import (
    OFFLINE,
    ROOT,
    dead_pid,
    files_of,
    one_line_error,
    run_script,
    train_cli,
)
from tests.test_inference import make_video

CLASSIFY = ("--imgsz", "28", "--source", "timm", "--no-pretrained", "--workers", "0", "--k", "2", "--epochs", "2")


def classify_cli(photos, out, *flags):
    """classify.py on generated class folders written to `photos`, into `out`: small and offline."""
    return run_script(
        "classify.py", "--data-dir", class_folders(photos), "--val-fraction", "0.5", "--out-dir", out, *CLASSIFY, *flags
    )


def class_folders(root, classes=("ants", "bees"), per_class=4):
    """An ImageFolder: per class, images of one colour with noise (kNN and a probe can tell them apart)."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 120 * index, 20, (40, 50, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{name}_{i}.png"), pixels)
    return root


@pytest.mark.slow
def test_classify_refuses_a_training_run_folder(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    before = files_of(run)
    result = classify_cli(tmp_path / "photos", run)
    one_line_error(result, f"{run}: holds a training run (train.py): last.pth", "choose another --out-dir")
    assert files_of(run) == before


@pytest.mark.slow
def test_train_refuses_a_classifier_folder(tmp_path, tiny_dataset):
    out = tmp_path / "classifier"
    result = classify_cli(tmp_path / "photos", out)
    assert result.returncode == 0, result.stderr[-2000:]
    before = files_of(out)
    result = run_script(
        "train.py", "--data-dir", tiny_dataset, "--out-dir", out, "--epochs", "1", "--exist-ok", *OFFLINE
    )
    one_line_error(result, f"{out}: holds a classifier (classify.py)")
    assert files_of(out) == before


@pytest.mark.slow
def test_a_classifier_rerun_leaves_only_its_own_results(tmp_path):
    photos, out = class_folders(tmp_path / "photos"), tmp_path / "classifier"
    first = run_script("classify.py", "--data-dir", photos, "--val-fraction", "0.5", "--out-dir", out, *CLASSIFY)
    assert first.returncode == 0, first.stderr[-2000:]
    predicted = run_script(
        "classify.py", "--predict", "--model", out / "classifier.pth", "--input", photos / "ants", "--workers", "0"
    )
    assert predicted.returncode == 0 and (out / "predictions.csv").exists(), predicted.stderr[-2000:]
    assert {"metrics.csv", "confusion_linear.png"} <= set(files_of(out))
    second = run_script(
        "classify.py", "--data-dir", photos, "--val-fraction", "0.5", "--out-dir", out, *CLASSIFY, "--method", "knn"
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "from the cache" in second.stdout  # the embeddings were kept
    left = set(files_of(out)) & set(CLASSIFIER_RESULTS)
    assert left == {"classifier.pth", "split.json", "metrics.json", "confusion_knn.png", "neighbours.png"}
    assert "linear" not in json.loads((out / "metrics.json").read_text())


def test_a_classifier_run_that_fails_leaves_no_half_set_of_results(tmp_path, monkeypatch):
    import checkpoint as checkpoint_module
    import classify

    def full_disk(value, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_torch_save", full_disk)
    out = tmp_path / "classifier"
    args = classify.get_args_parser().parse_args(
        [
            "--data-dir",
            str(class_folders(tmp_path / "photos")),
            "--val-fraction",
            "0.5",
            "--out-dir",
            str(out),
            *CLASSIFY,
        ]
    )
    with pytest.raises(OSError, match=r"classifier.pth: could not be written \(No space left on device\)$"):
        classify.main(args)
    assert not set(files_of(out)) & set(CLASSIFIER_RESULTS)


@pytest.mark.slow
def test_evaluation_reports_say_what_was_evaluated(checkpoint, tiny_dataset, tmp_path):
    reports = []
    for flags in ((), ("--flip",), ("--mode", "slide", "--short-side", "60", "--crop", "56", "--stride", "28")):
        result = run_script(
            "evaluate.py",
            "--model",
            checkpoint,
            "--data-dir",
            tiny_dataset,
            "--out-dir",
            tmp_path,
            "--workers",
            "0",
            *flags,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        reports.append(sorted(p.name for p in tmp_path.glob("eval_*.json")))
    assert reports[-1] == [  # the run folder's name first (outside it, two runs' best_model_iou.pth differ)
        "eval_transfer_learning-best_model_iou.pth_valid_slide-60-56-28.json",
        "eval_transfer_learning-best_model_iou.pth_valid_whole-126x98.json",
        "eval_transfer_learning-best_model_iou.pth_valid_whole-126x98_flip.json",
    ]
    assert len(list(tmp_path.glob("confusion_*.png"))) == 3


@pytest.mark.slow
def test_feature_maps_refuse_the_input_folder_like_inference(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((30, 40, 3), np.uint8))
    before = files_of(images)
    for script, extra in (
        ("visualize_features.py", ("--source", "timm", "--no-pretrained")),
        ("infer_image.py", ("--model", "x.pth")),
    ):
        result = run_script(script, "--input", images, "--out-dir", images, *extra)
        one_line_error(result, f"--out-dir {images}: is the folder of the inputs")
    assert files_of(images) == before


@pytest.mark.slow
def test_inference_refuses_a_training_run_folder(checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parent, run)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((30, 40, 3), np.uint8))
    result = run_script("infer_image.py", "--input", tmp_path / "a.png", "--model", checkpoint, "--out-dir", run)
    one_line_error(result, f"{run}: holds a training run (train.py)")


@pytest.mark.slow
def test_export_removes_the_temporary_files_of_killed_exports(checkpoint, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    stale = out / f".m.onnx.tmp-{socket.gethostname()}-{dead_pid()}-abcdefgh.onnx"
    stale.write_bytes(b"x" * 1000)
    result = run_script(
        "export.py", "--model", checkpoint, "--out", out / "m.onnx", "--check-images", tmp_path / "none"
    )
    one_line_error(result, "--check-images")  # fails after claiming its folder, before exporting
    assert not stale.exists() and f"Removed {stale.name}" in result.stdout


@pytest.mark.parametrize(
    "script, flags",
    [
        ("export.py", ("--out", "{blocker}/m.onnx")),
        ("evaluate.py", ("--out-dir", "{blocker}/reports")),
    ],
)
def test_an_unwritable_output_folder_fails_before_the_work(checkpoint, tiny_dataset, tmp_path, script, flags):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    extra = ("--data-dir", tiny_dataset) if script == "evaluate.py" else ()
    result = run_script(script, "--model", checkpoint, *extra, *(f.format(blocker=blocker) for f in flags))
    one_line_error(result, "cannot write there", "choose another --out-dir")
    assert "Scoring" not in result.stdout and "self-check" not in result.stdout


@pytest.mark.slow
def test_a_refused_report_folder_stops_every_torchrun_process(checkpoint, tiny_dataset, tmp_path):
    """Rank 0 checks the folder; its refusal reaches rank 1 instead of leaving it waiting in a collective."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "evaluate.py"),
            "--model",
            str(checkpoint),
            "--data-dir",
            str(tiny_dataset),
            "--out-dir",
            str(blocker / "reports"),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): {blocker / 'reports'}: cannot write there" in result.stderr, result.stderr[-3000:]


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path):
    """torch's own writer turned a full disk into `RuntimeError: [enforce fail at inline_container.cc]`."""

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing

    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from checkpoint import save_checkpoint; "
        "from cli import ArgumentParser, run_cli; parser = ArgumentParser(); parser.add_argument('root'); "
        "parser.add_argument('out'); run_cli(lambda a: save_checkpoint({'model': torch.zeros(10**6)}, a.out), parser)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(tmp_path / "last.pth")],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=120,
    )
    one_line_error(result, f"{tmp_path / 'last.pth'}: could not be written (File too large)")
    assert list(tmp_path.iterdir()) == []


def test_json_reports_write_null_for_undefined_numbers(trained_run):
    assert json_ready({"a": float("nan"), "b": [1.0, float("inf")]}) == {"a": None, "b": [1.0, None]}
    text = (trained_run[0] / "best_validation.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert None in report["iou"].values()  # classes absent from the tiny split


@pytest.mark.slow
def test_infer_image_never_writes_over_its_inputs(checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.jpg"), np.full((30, 40, 3), 90, np.uint8))
    before = (folder / "a.jpg").read_bytes()
    result = run_script(
        "infer_image.py", "--input", folder, "--model", checkpoint, "--out-dir", folder, "--device", "cpu"
    )
    one_line_error(result, "is the folder of the inputs")
    result = run_script(
        "infer_image.py", "--input", folder / "a.jpg", "--model", checkpoint, "--out-dir", folder, "--device", "cpu"
    )
    one_line_error(result, f"--out-dir {folder}: is the folder of the inputs")
    assert (folder / "a.jpg").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["a.jpg"]


@pytest.mark.slow
def test_results_get_the_permissions_of_a_plain_file(checkpoint, tmp_path):
    # written under a private temporary name, then renamed: the result must not stay owner-only (0600)
    make_video(tmp_path / "clip.mp4", frames=2, size=(64, 48), fps=10.0)
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
    make_video(tmp_path / "clip.mp4", frames=3, size=(64, 48), fps=10.0)
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
    one_line_error(result, f"--out-dir {tmp_path}: is the folder of the inputs")
    assert (tmp_path / "clip.mp4").read_bytes() == before


def test_an_incomplete_video_never_replaces_the_previous_result(checkpoint, tmp_path, monkeypatch):
    import infer_video

    make_video(tmp_path / "clip.mp4", frames=6, size=(64, 48), fps=10.0)
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
    make_video(tmp_path / "clip.mp4", frames=400, size=(64, 48), fps=10.0)
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
    one_line_error(train_cli(dataset, out), "holds another run", "--resume", "--exist-ok")
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
    one_line_error(train_cli(dataset, out), "another run is using this folder", f"pid {holder.pid}")
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
