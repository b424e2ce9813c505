"""Resuming a run: what each flag may do (dinokit/runs/resume.py, as units), what is refused, and that
a killed or interrupted run continues to the very metrics of an uninterrupted one."""

import csv
import dataclasses
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train
from checkpoint import describe_model, load_checkpoint
from dinokit.data.labels import VOC
from dinokit.runs import resume
from dinokit.tasks import get_task
from dinokit.tasks.segmentation import segmentation_model
from tests.conftest import OFFLINE, ROOT, SMALL, files_of, one_line_error, run_script, train_cli


def small_model():
    """A random-init ViT-S/14 segmentation model for VOC's 21 classes."""
    return segmentation_model(21, source="timm", pretrained=False)


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
    "head": ["--head", "eomt"],
    "queries": ["--queries", "20"],
    "query_blocks": ["--query-blocks", "2"],
    "no_masked_attention": ["--no-masked-attention"],
    "layer_decay": ["--layer-decay", "0.7"],
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
    ],  # every other KEEP flag: test_each_flag_on_resume_follows_its_rule
)
def test_a_resume_that_would_be_another_run_is_refused(trained_run, tmp_path, flags, message):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    before = files_of(run)
    result = run_script("train.py", "--resume", run / "last.pth", "--out-dir", run, "--epochs", "4", *OFFLINE, *flags)
    one_line_error(result, message, "a resumed run keeps it")
    assert files_of(run) == before


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
    assert "Resumed from" in result.stdout and "EPOCH: 1/2" not in result.stdout  # it continues after epoch 1
    assert "--lr 0.0002 (was 0.001)" in result.stdout and "--weight-decay 0.05 (was 0.01)" in result.stdout
    rows = read_rows(out / "metrics.csv")
    assert [int(row["epoch"]) for row in rows] == [1, 2] and [float(row["lr"]) for row in rows] == [1e-3, 2e-4]
    checkpoint = load_checkpoint(out / "last.pth")
    assert checkpoint["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    assert {"epoch": 2, "flag": "--lr", "from": 1e-3, "to": 2e-4} in checkpoint["overrides"]
    # Flags not given on resume are the checkpoint's: test_flags_not_given_on_resume_are_the_checkpoints


def test_resume_with_other_class_names_is_refused():
    """Two classes swapped in classes.json: other targets under the same indices."""
    info = describe_model(get_task("segmentation"), small_model(), VOC, (56, 42))
    swap = {"dog": "cat", "cat": "dog"}
    renamed = dataclasses.replace(VOC, classes=[swap.get(name, name) for name in VOC.classes], source="classes.json")
    task = get_task("segmentation")
    task.check_resume(info, VOC, "last.pth")  # the same classes: resumes
    with pytest.raises(ValueError, match=r"class 8 is 'cat' \(64, 0, 0\) in the checkpoint but 'dog' \(64, 0, 0\)"):
        task.check_resume(info, renamed, "last.pth")


def test_resuming_a_bf16_or_fp32_run_with_fp16_starts_a_fresh_loss_scaler():
    from dinokit.runs.resume import restore_scaler

    scaler = torch.amp.GradScaler("cpu", enabled=True)
    restore_scaler(scaler, {})  # what a bf16/fp32 run saved
    assert scaler.get_scale() == 2.0**16


def read_metrics(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if k not in ("seconds",)} for row in csv.DictReader(f)]


def run_flags(data, out, epochs):
    """train.py's flags of the runs that are killed or interrupted, and of their references."""
    common = ("--epochs", str(epochs), *SMALL, "--lr", "1e-3", *OFFLINE[:3], "--workers", "1", "--seed", "7")
    return ["--data-dir", str(data), "--out-dir", str(out), *common]


def start_training(data, out, epochs):
    command = [sys.executable, str(ROOT / "train.py"), *run_flags(data, out, epochs)]
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
    reference = run_script("train.py", *run_flags(dataset, tmp_path / "straight", 3))
    assert reference.returncode == 0, reference.stderr[-2000:]

    _, process = start_training(dataset, tmp_path / "killed", 3)
    wait_for(process, "EPOCH: 3/3")  # epochs 1 and 2 are saved; kill it in the middle of epoch 3
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(tmp_path / "killed" / "last.pth")["epoch"] == 1
    resumed = run_script(
        "train.py", *run_flags(dataset, tmp_path / "killed", 3), "--resume", tmp_path / "killed" / "last.pth"
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
