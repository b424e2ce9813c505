"""Inputs and faults of the newer scripts that ended with exit 0 and a wrong or replaced result, or
a misleading error (issue 24), grouped as the issue and docs/troubleshooting.md are:
images read wrongly, outputs that replaced other results, resumed runs that were not the run they
said, flags accepted that could not work, misleading errors, a video smaller than its input."""

import argparse
import json
import resource
import shutil
import signal
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import train
from app import shown_in_page
from dinokit.data.image_files import DatasetError, read_image
from dinokit.data.synthetic import make_dataset
from dinokit.errors import UserError
from dinokit.prediction.videos import write_video
from dinokit.runs import resume
from dinokit.runs.run_folder import CLASSIFIER_RESULTS
from tests.conftest import OFFLINE, ROOT, dead_pid, run_script


def one_line_error(result, *fragments, code=1):
    """The run failed with exit `code` and said why in its last stderr line, without a traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-2000:]
    assert lines and lines[-1].startswith("error"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def files_of(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


# --- 1. every pixel format by one rule ------------------------------------------------------------

SIXTEEN = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]], dtype=np.uint16)
HIGH_BYTE = (SIXTEEN >> 8).astype(np.uint8)  # [[0, 0, 1, 15], [128, 156, 255, 255]]
GRAY = np.array([[0, 1, 100], [128, 254, 255]], dtype=np.uint8)
RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)


def gray3(gray):
    return np.repeat(gray[:, :, None], 3, axis=2)


def save_rgb16(path):
    rgb16 = np.stack([SIXTEEN, SIXTEEN[::-1], 65535 - SIXTEEN], axis=2)
    cv2.imwrite(str(path), rgb16[:, :, ::-1])  # OpenCV writes 48-bit PNG/TIFF from BGR uint16
    return (rgb16 >> 8).astype(np.uint8)


def palette_image():
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    image.putpalette([200, 10, 20, 30, 140, 50, 7, 8, 250] + [0] * (256 * 3 - 9))
    return image


def rgba_image():
    alpha = np.array([[255, 0], [128, 0]], dtype=np.uint8)  # colour kept where fully transparent too
    return Image.fromarray(np.dstack([RGB, alpha]), mode="RGBA")


def cmyk_image():
    pixels = np.array([[[255, 0, 0, 0], [0, 0, 0, 255]], [[0, 0, 0, 0], [0, 255, 255, 0]]], dtype=np.uint8)
    return Image.fromarray(pixels, mode="CMYK")


@pytest.mark.parametrize(
    "name, write, expected",
    [
        ("gray.png", lambda p: Image.fromarray(GRAY, mode="L").save(p), gray3(GRAY)),
        (
            "bilevel.png",
            lambda p: Image.fromarray(GRAY > 127).convert("1").save(p),
            gray3(np.where(GRAY > 127, 255, 0).astype(np.uint8)),
        ),
        (
            "palette.png",
            lambda p: palette_image().save(p),
            np.array([[[200, 10, 20], [30, 140, 50]], [[7, 8, 250], [30, 140, 50]]]),
        ),
        ("rgba.png", lambda p: rgba_image().save(p), RGB),
        ("gray_alpha.png", lambda p: Image.fromarray(np.dstack([GRAY, GRAY[::-1]]), mode="LA").save(p), gray3(GRAY)),
        ("gray16.png", lambda p: Image.fromarray(SIXTEEN).save(p), gray3(HIGH_BYTE)),
        ("gray16.tif", lambda p: Image.fromarray(SIXTEEN).save(p), gray3(HIGH_BYTE)),
        ("int32.tif", lambda p: Image.fromarray(SIXTEEN.astype(np.int32), mode="I").save(p), gray3(HIGH_BYTE)),
        ("float.tif", lambda p: Image.fromarray(GRAY.astype(np.float32) / 255, mode="F").save(p), gray3(GRAY)),
        (
            "cmyk.tif",
            lambda p: cmyk_image().save(p),
            np.array([[[0, 255, 255], [0, 0, 0]], [[255, 255, 255], [255, 0, 0]]]),
        ),
    ],
)
def test_every_pixel_format_is_read_by_one_rule(tmp_path, name, write, expected):
    write(tmp_path / name)
    assert np.array_equal(read_image(tmp_path / name), expected)


def test_sixteen_bit_colour_files_follow_the_same_rule(tmp_path):
    for name in ("rgb16.png", "rgb16.tif"):
        expected = save_rgb16(tmp_path / name)
        assert np.array_equal(read_image(tmp_path / name), expected), name


@pytest.mark.parametrize(
    "name, write, message",
    [
        (
            "hdr.tif",
            lambda p: Image.fromarray(np.array([[0.0, 2.5]], np.float32), mode="F").save(p),
            "a float image with values 0..2.5; float images are read as intensities in 0..1",
        ),
        ("nan.tif", lambda p: Image.fromarray(np.array([[0.5, np.nan]], np.float32), mode="F").save(p), "and NaN/inf"),
        (
            "int32.tif",
            lambda p: Image.fromarray(np.array([[0, 70000]], np.int32), mode="I").save(p),
            "a 32-bit integer image with values 0..70000",
        ),
    ],
)
def test_pixel_values_outside_the_rule_are_refused_naming_the_file(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(DatasetError, match="^" + str(tmp_path / name).replace("\\", "\\\\") + ": ") as caught:
        read_image(tmp_path / name)
    assert message in str(caught.value)


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run[0] / "best_model_iou.pth"


@pytest.mark.slow
def test_a_sixteen_bit_image_is_segmented_as_its_eight_bit_copy(checkpoint, tmp_path):
    """infer_image.py read 16-bit PNGs as pure white (convert("RGB") clips every value to 255)."""
    ramp = (np.linspace(0, 65535, 90 * 120).reshape(90, 120)).astype(np.uint16)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    Image.fromarray(ramp).save(tmp_path / "a" / "scan.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "b" / "scan.png")
    for name in ("a", "b"):
        result = run_script(
            "infer_image.py", "--input", tmp_path / name, "--model", checkpoint, "--out-dir", tmp_path / f"out_{name}"
        )
        assert result.returncode == 0, result.stderr[-2000:]
    drawn = cv2.imread(str(tmp_path / "out_a" / "scan.jpg"))
    assert np.array_equal(drawn, cv2.imread(str(tmp_path / "out_b" / "scan.jpg")))
    assert (tmp_path / "out_a" / "scan_mask.png").read_bytes() == (tmp_path / "out_b" / "scan_mask.png").read_bytes()


@pytest.mark.slow
def test_training_data_in_a_refused_format_stops_before_training(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_valid=2, size=(64, 48), seed=3)
    first = sorted((data / "train_images").iterdir())[0]
    Image.fromarray(np.full((48, 64), 3.0, np.float32), mode="F").save(first.with_suffix(".tif"))
    first.unlink()
    result = run_script(
        "train.py", "--data-dir", data, "--out-dir", tmp_path / "run", "--epochs", "1", "--imgsz", "56", "42", *OFFLINE
    )
    one_line_error(result, f"{first.with_suffix('.tif')}: a float image with values 3..3")
    assert "EPOCH" not in result.stdout


# --- 2. outputs that replaced other results -------------------------------------------------------


def class_folders(root, classes=("ants", "bees"), per_class=4):
    """An ImageFolder: per class, images of one colour with noise (kNN and a probe can tell them apart)."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(60 + 120 * index, 20, (40, 50, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{name}_{i}.png"), pixels)
    return root


CLASSIFY = ("--imgsz", "28", "--source", "timm", "--no-pretrained", "--workers", "0", "--k", "2", "--epochs", "2")


@pytest.mark.slow
def test_classify_refuses_a_training_run_folder(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    before = files_of(run)
    result = run_script(
        "classify.py",
        "--data-dir",
        class_folders(tmp_path / "photos"),
        "--val-fraction",
        "0.5",
        "--out-dir",
        run,
        *CLASSIFY,
    )
    one_line_error(result, f"{run}: holds a training run (train.py): last.pth", "choose another --out-dir")
    assert files_of(run) == before


@pytest.mark.slow
def test_train_refuses_a_classifier_folder(tmp_path, tiny_dataset):
    out = tmp_path / "classifier"
    result = run_script(
        "classify.py",
        "--data-dir",
        class_folders(tmp_path / "photos"),
        "--val-fraction",
        "0.5",
        "--out-dir",
        out,
        *CLASSIFY,
    )
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


# --- 3. what a resumed run may change --------------------------------------------------------------

# One other value for every train.py flag, to try each on resume.
OTHER_VALUES = {
    "task": ["--task", "depth"],
    "gradient_loss": ["--gradient-loss", "0.5"],
    "data_dir": ["--data-dir", "/elsewhere"],
    "classes": ["--classes", "other.json"],
    "imgsz": ["--imgsz", "320", "240"],
    "workers": ["--workers", "7"],
    "backbone": ["--backbone", "base"],
    "registers": ["--registers"],
    "source": ["--source", "timm"],
    "hub_dir": ["--hub-dir", "/clone"],
    "weights": ["--weights", "w.pth"],
    "no_pretrained": ["--no-pretrained"],
    "fine_tune": ["--fine-tune"],
    "head_layers": ["--head-layers", "1"],
    "head_weights": ["--head-weights", "voc2012_ms"],
    "recipe": ["--recipe", "paper"],
    "epochs": ["--epochs", "30"],
    "steps": ["--steps", "500"],
    "batch": ["--batch", "8"],
    "lr": ["--lr", "2e-4"],
    "weight_decay": ["--weight-decay", "0.5"],
    "scheduler": ["--scheduler", "cosine"],
    "scheduler_epochs": ["--scheduler-epochs", "3"],
    "scheduler_gamma": ["--scheduler-gamma", "0.5"],
    "warmup_steps": ["--warmup-steps", "5"],
    "head_dropout": ["--head-dropout", "0.2"],
    "backbone_lr": ["--backbone-lr", "1e-6"],
    "mode": ["--eval-mode", "slide"],
    "short_side": ["--short-side", "400"],
    "crop": ["--crop", "448"],
    "stride": ["--stride", "300"],
    "scales": ["--scales", "0.5", "1"],
    "flip": ["--flip"],
    "amp": ["--amp", "bf16"],
    "grad_checkpointing": ["--grad-checkpointing"],
    "compile": ["--compile"],
    "no_val_cache": ["--no-val-cache"],
    "train_views": ["--train-views", "3"],
    "cache_ram_gb": ["--cache-ram-gb", "1"],
    "out_dir": ["--out-dir", "elsewhere"],
    "device": ["--device", "cpu"],
    "seed": ["--seed", "5"],
    "resume": ["--resume", "other.pth"],
    "exist_ok": ["--exist-ok"],
    "tensorboard": ["--tensorboard"],
    "tensorboard_images": ["--tensorboard-images", "2"],
    "tensorboard_every": ["--tensorboard-every", "3"],
    "dist_timeout": ["--dist-timeout", "5"],
}


def saved_flags() -> dict:
    """The flags a checkpoint of a default run stores."""
    args = train.get_args_parser().parse_args([])
    train.settle(args, None)
    return {k: resume.plain(v) for k, v in vars(args).items() if k in resume.RESUME_RULES}


def test_every_train_flag_has_one_resume_rule():
    dests = {action.dest for action in train.get_args_parser()._actions} - {"help"}
    assert dests == set(resume.RESUME_RULES) == set(OTHER_VALUES)


@pytest.mark.parametrize("flag", sorted(resume.RESUME_RULES))
def test_each_flag_on_resume_follows_its_rule(flag):
    saved = saved_flags()
    argv = (["--resume", "ckpt.pth"] if flag != "resume" else []) + OTHER_VALUES[flag]
    args = train.get_args_parser().parse_args(argv)
    rule = resume.RESUME_RULES[flag]
    if rule == resume.KEEP:
        with pytest.raises(
            ValueError, match=f"checkpoint was trained with --{flag.replace('_', '-')} .* but this run has"
        ):
            train.settle(args, {"args": saved})
        return
    changes = train.settle(args, {"args": saved})
    given = resume.plain(getattr(args, flag))
    assert given != saved[flag]  # applied
    if rule == resume.CHANGE:
        assert changes == [resume.FlagChange(f"--{flag.replace('_', '-')}", saved[flag], given)]
    else:
        assert changes == []  # this invocation's own: applied, not recorded


def test_flags_not_given_on_resume_are_the_checkpoints():
    saved = {**saved_flags(), "imgsz": [320, 240], "train_views": 3, "fine_tune": True, "lr": 5e-4, "workers": 7}
    args = train.get_args_parser().parse_args(["--resume", "ckpt.pth"])
    assert train.settle(args, {"args": saved}) == []
    assert (args.imgsz, args.train_views, args.fine_tune, args.lr) == ([320, 240], 3, True, 5e-4)
    assert args.workers != 7  # where this process runs is its own


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (("--imgsz", "56", "42"), "checkpoint was trained with --imgsz [120, 90] but this run has [56, 42]"),
        (("--train-views", "2"), "checkpoint was trained with --train-views 0 but this run has 2"),
    ],
)
def test_a_resume_that_would_be_another_run_is_refused(trained_run, tmp_path, flags, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    before = files_of(run)
    result = run_script("train.py", "--resume", run / "last.pth", "--out-dir", run, "--epochs", "4", *OFFLINE, *flags)
    one_line_error(result, message, "a resumed run keeps it")
    assert files_of(run) == before


# --- 4. flags that cannot work, refused when parsed ------------------------------------------------


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("app.py", ("--max-upload-mb", "0"), "argument --max-upload-mb: must be > 0, got 0"),
        ("export.py", ("--model", "m.pth", "--opset", "5"), "argument --opset: invalid choice: 5"),
    ],
)
def test_numeric_flags_are_checked_when_parsed(script, flags, message):
    result = run_script(script, *flags)
    assert one_line_error(result, message, code=2).endswith(f"(see {script} --help)")


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("app", ("--port", "99999"), "argument --port: must be in 1..65535, got 99999"),
        (
            "export",
            ("--model", "m.pth", "--opset", "99"),
            "argument --opset: invalid choice: 99 (choose from 18, 19, 20, 21, 22, 23)",
        ),
        ("train", ("--batch", "0"), "argument --batch: must be >= 1, got 0"),
        ("train", ("--lr", "-1"), "argument --lr: must be > 0, got -1"),
        ("classify", ("--temperature", "nan"), "argument --temperature: must be a number, got 'nan'"),
        ("evaluate", ("--workers", "-1"), "argument --workers: must be >= 0, got -1"),
        ("infer_image", ("--input", "x", "--alpha", "1.5"), "argument --alpha: must be in [0, 1], got 1.5"),
        ("infer_video", ("--input", "x", "--max-frames", "-3"), "argument --max-frames: must be >= 0, got -3"),
        ("visualize_features", ("--input", "x", "--batch", "0"), "argument --batch: must be >= 1, got 0"),
    ],
)
def test_every_scripts_ranges_are_declared_with_its_flags(script, flags, message, capsys):
    """The same parser class as above, each script's own ranges (in-process: start-up is seconds each)."""
    parser = __import__(script).get_args_parser()
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args(list(flags))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {message} (see {parser.prog} --help)\n"


def test_a_port_in_use_is_named_as_the_flag_before_the_models_load(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("app.py", "--model", checkpoint, "--port", str(port), timeout=120)
    one_line_error(result, f"--port {port}: cannot listen on 127.0.0.1:{port}", "choose another --port")
    assert "models:" not in result.stdout


# --- 5. errors that say what a file is ------------------------------------------------------------


@pytest.fixture
def odd_files(tmp_path, checkpoint):
    photo = tmp_path / "notes.jpg"
    cv2.imwrite(str(photo), np.zeros((20, 20, 3), np.uint8))
    head = tmp_path / "head.pth"  # Meta's layout: a 4-layer ViT-S head for the 21 VOC classes
    width = 4 * 384
    torch.save(
        {
            "state_dict": {
                "decode_head.conv_seg.weight": torch.zeros(21, width, 1, 1),
                "decode_head.conv_seg.bias": torch.zeros(21),
                "decode_head.bn.weight": torch.ones(width),
                "decode_head.bn.bias": torch.zeros(width),
                "decode_head.bn.running_mean": torch.zeros(width),
                "decode_head.bn.running_var": torch.ones(width),
            }
        },
        head,
    )
    unsafe = tmp_path / "pickled.pth"
    torch.save({"config": argparse.Namespace(a=1)}, unsafe)  # a Python object a safe load refuses
    onnx_like = tmp_path / "model.pth"
    onnx_like.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(200))  # an ONNX ModelProto's first fields
    return {"photo": photo, "head": head, "unsafe": unsafe, "onnx": onnx_like, "checkpoint": checkpoint}


@pytest.mark.parametrize(
    "script, flag, file, message",
    [
        ("infer_image.py", "--head-weights", "photo", "notes.jpg: is a JPEG image, not a segmentation head"),
        (
            "infer_image.py",
            "--weights",
            "checkpoint",
            "best_model_iou.pth: is a training checkpoint, not backbone weights; it goes to --model of infer_image.py",
        ),
        (
            "infer_image.py",
            "--weights",
            "head",
            "head.pth: is a segmentation head, not backbone weights; it goes to --head-weights",
        ),
        (
            "train.py",
            "--resume",
            "onnx",
            "model.pth: is an ONNX model, not a training checkpoint; it goes to --model of",
        ),
        (
            "train.py",
            "--resume",
            "unsafe",
            "pickled.pth: not a readable training checkpoint (it holds Python objects that a safe load refuses",
        ),
        (
            "export.py",
            "--model",
            "head",
            "head.pth: is a segmentation head, not a training checkpoint; it goes to --head-weights",
        ),
    ],
)
def test_a_file_given_to_the_wrong_flag_is_named_for_what_it_is(odd_files, tmp_path, script, flag, file, message):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 20, 3), np.uint8))
    common = {
        "infer_image.py": ("--input", tmp_path / "a.png", "--out-dir", tmp_path / "o", "--source", "timm"),
        "train.py": ("--data-dir", tmp_path, *OFFLINE),
        "export.py": (),
    }[script]
    if flag == "--weights":
        common += ("--head-weights", odd_files["head"])
    result = run_script(script, *common, flag, odd_files[file])
    one_line_error(result, message)


@pytest.mark.slow
def test_an_offline_head_download_says_nothing_about_the_backbone(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 20, 3), np.uint8))
    result = run_script(
        "infer_image.py",
        "--input",
        tmp_path / "a.png",
        "--out-dir",
        tmp_path / "o",
        "--head-weights",
        "voc2012_ms",
        "--source",
        "timm",
        "--no-pretrained",
    )
    line = one_line_error(result, "could not load dinov2_vits14_voc2012_ms_head.pth", "pass its path to --head-weights")
    assert "backbone" not in line


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


def test_the_web_demo_says_nothing_about_the_webm_codec_tag(tmp_path, capfd):
    frames = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(3)]
    assert write_video(tmp_path / "clip.webm", frames, 10, (64, 48)) == 3
    assert "not supported" not in capfd.readouterr().err


def test_errors_in_the_web_page_keep_their_quotes():
    def refuse(path):
        raise UserError(f"{path}: can't read 'it' <here>")

    status = shown_in_page(refuse, 2)("/tmp/gradio/x.jpg")[-1]
    assert status == "**Could not segment it:** x.jpg: can't read 'it' &lt;here&gt;"


# --- 6. a video keeps every pixel of its input -----------------------------------------------------


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
