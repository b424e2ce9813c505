"""Command lines: flags checked when parsed with the flag named, a file given to the wrong flag named
for what it is, missing or unsafe checkpoints, offline sources: each one line and a non-zero exit."""

import argparse
import socket
import subprocess

import cv2
import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from tests.conftest import OFFLINE, assert_nothing_written, one_line_error, run_script, train_cli


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


def test_a_missing_hub_directory_is_one_line_when_run_as_a_script(tmp_path):
    result = run_script("bench.py", "--summary", "--hub-dir", tmp_path)  # no hubconf.py: no backbone to be had
    one_line_error(result, "not a torch.hub directory")


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
    one_line_error(train_cli(dataset, tmp_path / "out", *flags), fragment)
    assert_nothing_written(tmp_path / "out")


def test_missing_checkpoint(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 20, 3), np.uint8))
    result = run_script("infer_image.py", "--input", tmp_path / "a.png", "--model", tmp_path / "nope.pth")
    one_line_error(result, "nope.pth: checkpoint not found")


def test_checkpoints_never_run_code_from_the_file(trained_run, tmp_path):
    checkpoint = load_checkpoint(trained_run[0] / "best_model_iou.pth")
    checkpoint["payload"] = subprocess.CompletedProcess(["x"], 0)  # an arbitrary pickled object
    torch.save(checkpoint, tmp_path / "tampered.pth")
    with pytest.raises(ValueError, match="tampered.pth: not a readable training checkpoint"):
        load_checkpoint(tmp_path / "tampered.pth")


def test_renamed_flags_work_for_a_release_and_say_their_new_name(capsys):
    """The reference article's recipe and metric were named "seed" (a random seed's word)."""
    import evaluate
    import train

    args = train.get_args_parser().parse_args(["--recipe", "seed"])
    train.settle(args, resumed=None)
    assert args.recipe == "article" and args.lr == 1e-4  # the article's defaults
    args = evaluate.get_args_parser().parse_args(["--model", "m.pth", "--seed-metric", "--seed-batch", "3"])
    assert (args.article_metric, args.article_batch) == (True, 3)
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        "warning: --recipe seed is now --recipe article",
        "warning: --seed-metric is renamed --article-metric; the old name goes in the next release",
        "warning: --seed-batch is renamed --article-batch; the old name goes in the next release",
    ]
    assert "--seed-metric" not in evaluate.get_args_parser().format_help()  # hidden: the new names are shown
