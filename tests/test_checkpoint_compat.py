"""Checkpoints written by earlier code keep working: each fixture in tests/fixtures was written by
the code of its time (the script beside it says how) and is never regenerated. `FORMATS` says which
format each file is; every older format is migrated in one place (dinokit/runs/checkpoint_format.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import build_model_from_checkpoint, describe_model, load_checkpoint
from dinokit.data.labels import VOC
from dinokit.runs.checkpoint_format import CHECKPOINT_FORMAT, ModelDescription
from dinokit.tasks import get_task
from dinokit.tasks.segmentation import segmentation_model
from inference import Predictor
from tests.conftest import OFFLINE, run_script
from tests.fixtures.make_checkpoint_v1 import write_dataset
from tests.fixtures.make_checkpoint_v1_depth import write_depth_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD = FIXTURES / "checkpoint_v1.pth"
OLD_DEPTH = FIXTURES / "checkpoint_v1_depth.pth"
# file -> (its "format" entry as written, its task): format 1 named no task for segmentation models
FORMATS = {OLD: (1, "segmentation"), OLD_DEPTH: (1, "depth")}


@pytest.mark.parametrize("path", list(FORMATS), ids=lambda path: path.name)
def test_each_fixture_is_the_format_it_says_and_reads_as_todays(path):
    written, task = FORMATS[path]
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == written
    migrated = load_checkpoint(path)
    assert migrated["format"] == CHECKPOINT_FORMAT and migrated["model_info"]["task"] == task
    assert migrated["args"]["recipe"] == "article"  # written as "seed"
    described = ModelDescription.from_info(migrated["model_info"])
    assert described.to_info() == migrated["model_info"]  # the typed description round-trips
    assert (described.backbone.name, described.backbone.patch_size) == ("dinov2_vits14", 14)


def test_an_old_checkpoint_rebuilds_the_model_that_wrote_it():
    expected = torch.load(FIXTURES / "checkpoint_v1_expected.pt", weights_only=True)
    model = build_model_from_checkpoint(load_checkpoint(OLD))
    with torch.no_grad():
        logits = model(expected["input"])
    assert torch.allclose(logits, expected["logits"], atol=1e-5)


@pytest.mark.slow
def test_an_old_checkpoint_predicts_and_resumes(tmp_path):
    predictor = Predictor.from_checkpoint(OLD, device="cpu")
    assert predictor.classes == ["background", "road", "car"]
    assert predictor.predict(np.zeros((30, 50, 3), np.uint8)).shape == (30, 50)
    data = write_dataset(tmp_path / "data")
    result = run_script(
        "train.py",
        "--data-dir",
        data,
        "--out-dir",
        tmp_path / "run",
        "--resume",
        OLD,
        "--epochs",
        "2",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "2",
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resumed from" in result.stdout and "at epoch 2" in result.stdout


def test_an_old_depth_checkpoint_rebuilds_the_model_that_wrote_it():
    expected = torch.load(FIXTURES / "checkpoint_v1_depth_expected.pt", weights_only=True)
    model = build_model_from_checkpoint(load_checkpoint(OLD_DEPTH))
    with torch.no_grad():
        depth = model(expected["input"])
    assert torch.allclose(depth, expected["depth"], atol=1e-5)
    predictor = Predictor.from_checkpoint(OLD_DEPTH, device="cpu")
    assert predictor.task.name == "depth" and predictor.predict(np.zeros((30, 50, 3), np.uint8)).dtype == np.float32


@pytest.mark.slow
def test_an_old_depth_checkpoint_resumes(tmp_path):
    data = write_depth_dataset(tmp_path / "data")
    flags = ("--task", "depth", "--data-dir", data, "--out-dir", tmp_path / "run", "--resume", OLD_DEPTH)
    result = run_script("train.py", *flags, "--epochs", "2", *OFFLINE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resumed from" in result.stdout and "at epoch 2" in result.stdout


def test_a_checkpoint_whose_weights_do_not_fit_its_description_is_refused():
    model = segmentation_model(21, source="timm", pretrained=False)
    edited = {"model": model.state_dict(), "model_info": describe_model(get_task("segmentation"), model, VOC, (56, 42))}
    edited["model_info"]["arch"]["num_classes"] = 5  # the weights are for 21 classes
    with pytest.raises(ValueError, match="checkpoint weights do not fit the model its model_info describes"):
        build_model_from_checkpoint(edited)
