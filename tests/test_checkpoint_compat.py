"""Checkpoints written by earlier code keep working: the format-1 fixture in tests/fixtures was
written by the code of its time (the script beside it says how) and is never regenerated."""

from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint import build_model_from_checkpoint, describe_model, load_checkpoint
from dinokit.data.labels import VOC
from dinokit.tasks import get_task
from dinokit.tasks.segmentation import segmentation_model
from inference import Predictor
from tests.conftest import OFFLINE, run_script
from tests.fixtures.make_checkpoint_v1 import write_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD = FIXTURES / "checkpoint_v1.pth"


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


def test_a_checkpoint_whose_weights_do_not_fit_its_description_is_refused():
    model = segmentation_model(21, source="timm", pretrained=False)
    edited = {"model": model.state_dict(), "model_info": describe_model(get_task("segmentation"), model, VOC, (56, 42))}
    edited["model_info"]["arch"]["num_classes"] = 5  # the weights are for 21 classes
    with pytest.raises(ValueError, match="checkpoint weights do not fit the model its model_info describes"):
        build_model_from_checkpoint(edited)
