"""A real `train.py` run on a generated VOC-format dataset, and what a user does with its outputs."""

import csv
import json
from functools import partial

import pytest
import torch

import config
import train
from checkpoint import build_model_from_checkpoint, load_checkpoint
from datasets import SegmentationDataset, build_datasets, find_pairs, make_loader
from dinokit.data.labels import ColorMap
from dinokit.data.resize import eval_transform
from dinokit.tasks.segmentation.scoring import SegmentationScoring
from engine import LoopSettings, validate
from tests.conftest import OFFLINE, SMALL, run_script, train_cli


def read_metrics(out_dir):
    with open(out_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_three_epochs_lower_the_loss_and_write_every_artefact(trained_run):
    out_dir, stdout = trained_run
    for name in (
        "best_model_loss.pth",
        "best_model_iou.pth",
        "final_model.pth",
        "last.pth",
        "metrics.csv",
        "loss.png",
        "accuracy.png",
        "miou.png",
    ):
        assert (out_dir / name).stat().st_size > 0, name
    assert not list(out_dir.glob("*.tmp"))  # no half-written files left behind
    rows = read_metrics(out_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "rounded up to 126 98" in stdout
    assert stdout.count("Train Epoch Loss:") == 3 and "LR for next epoch:" in stdout
    assert (
        "Validating best_model_iou.pth: predicted whole at 126x98, scored at each image's original resolution" in stdout
    )
    assert "warning: random-init backbone (--no-pretrained): these figures say nothing" in stdout


def test_best_iou_checkpoint_is_the_best_epoch_and_rebuilds_from_itself(trained_run):
    out_dir, stdout = trained_run
    rows = read_metrics(out_dir)
    checkpoint = load_checkpoint(out_dir / "best_model_iou.pth")
    best_epoch = max(rows, key=lambda r: r["valid_miou"])["epoch"]
    assert checkpoint["epoch"] + 1 == best_epoch
    info = checkpoint["model_info"]
    assert info["classes"] == config.CLASSES and info["imgsz"] == [126, 98]
    assert [tuple(c) for c in info["colors"]] == config.COLORS
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "epoch", "metrics", "args"}


@pytest.mark.slow
def test_final_validation_is_what_evaluate_py_measures(trained_run, tiny_dataset, tmp_path):
    # train.py's last figure: the best checkpoint on the validation split at original resolution,
    # by the same code as evaluate.py (the per-epoch figures are at the training size).
    out_dir, stdout = trained_run
    final = json.loads((out_dir / "best_validation.json").read_text())
    assert final["backbone_weights"] == "random init (--no-pretrained)"  # a figure from random init says so
    result = run_script(
        "evaluate.py",
        "--model",
        out_dir / "best_model_iou.pth",
        "--out-dir",
        tmp_path,
        "--workers",
        "0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Data: {tiny_dataset} (the model's training data" in result.stdout  # no --data-dir: the run's own
    evaluated = json.loads((tmp_path / "eval_transfer_learning-best_model_iou.pth_valid_whole-126x98.json").read_text())
    assert final["checkpoint"] == "best_model_iou.pth" and final["images"] == evaluated["images"] == 5
    assert final["miou"] == pytest.approx(evaluated["miou"], abs=1e-12)
    assert f"mIoU {final['miou']:.4f}" in stdout


def test_reloaded_checkpoint_gives_identical_logits_and_its_recorded_metrics(trained_run, tiny_dataset):
    out_dir, _ = trained_run
    checkpoint = load_checkpoint(out_dir / "best_model_iou.pth")
    model_a = build_model_from_checkpoint(checkpoint)
    model_b = build_model_from_checkpoint(load_checkpoint(out_dir / "best_model_iou.pth"))
    color_map = ColorMap(config.COLORS, config.IGNORE_COLORS)
    valid_set = SegmentationDataset(find_pairs(tiny_dataset, "valid"), color_map, eval_transform((126, 98)))
    with torch.no_grad():
        assert torch.equal(model_a(valid_set[0][0][None]), model_b(valid_set[0][0][None]))
    # The reloaded weights are the trained ones: they reproduce the validation metrics recorded at save time.
    result = validate(
        model_a,
        make_loader(valid_set, 4, shuffle=False, workers=0),
        LoopSettings(torch.device("cpu"), partial(SegmentationScoring, 21, 255)),
    )
    assert result.metrics["miou"] == pytest.approx(checkpoint["metrics"]["valid_miou"], abs=1e-6)
    assert result.loss == pytest.approx(checkpoint["metrics"]["valid_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--data-dir", "/nonexistent/data"), "error: /nonexistent/data/train_images: folder not found"),
        (("--device", "cuda:0"), "error: --device cuda:0: CUDA is not available"),
        (("--imgsz", "8", "8"), "error: --imgsz 8 8: each side must be in [14, 4096]"),
    ],
)
def test_bad_input_is_one_line_error_and_nonzero_exit(tiny_dataset, tmp_path, flags, message):
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_script(
        "train.py", "--data-dir", tiny_dataset, "--out-dir", tmp_path / "run", "--epochs", "1", *OFFLINE, *flags
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # no empty run folder left behind


def test_a_failed_run_leaves_only_the_folders_that_were_there(tmp_path):
    from dinokit.runs.run_folder import missing_folders, remove_empty_folders

    (tmp_path / "outputs").mkdir()
    run = tmp_path / "outputs" / "a" / "b"
    created = missing_folders(run)
    assert created == [run, run.parent]
    run.mkdir(parents=True)
    remove_empty_folders(created)
    assert not (tmp_path / "outputs" / "a").exists() and (tmp_path / "outputs").is_dir()
    run.mkdir(parents=True)
    (run / "last.pth").write_bytes(b"x")  # a run that wrote something keeps its folder
    remove_empty_folders(created)
    assert (run / "last.pth").exists()


@pytest.mark.slow
def test_a_frozen_backbone_from_a_weights_file_is_not_stored_in_the_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    """The head and where the backbone comes from (the file by path, size and SHA-256), not 88 MB of
    frozen weights; the checkpoint rebuilds, reproduces its metrics, resumes, and refuses a changed file."""
    from dinov2.models import vision_transformer  # Meta's model code: the file in Meta's layout

    from dinokit.backbones.weights_file import WeightsChangedError

    torch.manual_seed(0)
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(
        vision_transformer.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0).state_dict(), weights
    )
    common = ("--data-dir", tiny_dataset, "--imgsz", "56", "42", "--batch", "4", "--out-dir", tmp_path / "run")
    flags = (*common, "--source", "timm", "--weights", weights, "--workers", "0")
    result = run_script("train.py", "--epochs", "1", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "run" / "best_model_iou.pth"
    checkpoint = load_checkpoint(path)
    assert not any(key.startswith("backbone.") for key in checkpoint["model"])
    assert checkpoint["model_info"]["backbone_weights"]["weights"]["path"] == str(weights)
    assert path.stat().st_size < 1_000_000 < weights.stat().st_size  # ViT-S: 88 MB

    model = build_model_from_checkpoint(checkpoint)
    color_map = ColorMap(config.COLORS, config.IGNORE_COLORS)
    valid_set = SegmentationDataset(find_pairs(tiny_dataset, "valid"), color_map, eval_transform((56, 42)))
    result = validate(
        model,
        make_loader(valid_set, 4, shuffle=False, workers=0),
        LoopSettings(torch.device("cpu"), partial(SegmentationScoring, 21, 255)),
    )
    assert result.metrics["miou"] == pytest.approx(checkpoint["metrics"]["valid_miou"], abs=1e-6)

    resumed = run_script("train.py", "--epochs", "2", "--resume", tmp_path / "run" / "last.pth", *flags)
    assert resumed.returncode == 0 and "Resumed from" in resumed.stdout, resumed.stderr[-3000:]

    moved = tmp_path / "elsewhere" / weights.name  # another machine: the file in its weights folder
    moved.parent.mkdir()
    weights.rename(moved)
    with pytest.raises(WeightsChangedError, match="is gone; put it back"):
        build_model_from_checkpoint(load_checkpoint(path))
    monkeypatch.setenv("DINOKIT_WEIGHTS_DIR", str(moved.parent))
    assert build_model_from_checkpoint(load_checkpoint(path)) is not None
    moved.rename(weights)

    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # the file replaced: the head is not valid on it
    with pytest.raises(WeightsChangedError, match="the frozen backbone of the checkpoint was trained with has changed"):
        build_model_from_checkpoint(load_checkpoint(path))


@pytest.mark.slow
def test_a_batch_of_one_with_a_one_token_grid_trains(dataset, tmp_path):
    for batch in ("5", "1"):  # 6 images: batches of 5 and 1, and batches of 1
        result = train_cli(dataset, tmp_path / f"run{batch}", "--imgsz", "14", "14", "--batch", batch)
        assert result.returncode == 0, result.stderr[-2000:]


def test_nan_loss_names_the_step(tiny_dataset):
    from datasets import make_loader
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
