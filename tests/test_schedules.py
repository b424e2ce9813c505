"""Learning-rate schedules: poly / cosine with mmcv-style linear warmup, per optimizer step."""

import csv

import pytest
import torch

from dinokit.training.schedules import StepSchedule, build_scheduler, lr_factor
from tests.conftest import OFFLINE, run_script


def test_poly_with_warmup_at_steps_0_1500_and_the_end():
    # the DINOv2 paper's recipe: poly (power 1) over 40000 steps after a 1500-step linear warmup
    assert lr_factor("poly", 0, 40000, 1500) == pytest.approx(1e-6)  # warmup starts at warmup_ratio
    assert lr_factor("poly", 750, 40000, 1500) == pytest.approx((1 - 750 / 40000) * (1 - (1 - 1e-6) * 0.5))
    assert lr_factor("poly", 1500, 40000, 1500) == pytest.approx(1 - 1500 / 40000)  # warmup over
    assert lr_factor("poly", 40000, 40000, 1500) == 0.0
    assert lr_factor("cosine", 20000, 40000) == pytest.approx(0.5)


def test_a_step_schedule_moves_the_optimizer_every_step():
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    schedule = build_scheduler(optimizer, "poly", total_steps=10, warmup_steps=4)
    assert isinstance(schedule, StepSchedule)
    for step in range(6):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor("poly", step, 10, 4))
        optimizer.step()
        schedule.step()
    with pytest.raises(ValueError, match="--warmup-steps needs --scheduler poly or cosine"):
        build_scheduler(optimizer, "multistep", total_steps=10, warmup_steps=4)


@pytest.mark.slow
def test_train_py_steps_a_poly_schedule_per_optimizer_step(tiny_dataset, tmp_path):
    # 12 training images, batch 4: 3 steps per epoch, 6 in all
    result = run_script(
        "train.py",
        "--data-dir",
        tiny_dataset,
        "--out-dir",
        tmp_path,
        "--epochs",
        "2",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "4",
        "--lr",
        "1e-3",
        "--scheduler",
        "poly",
        "--warmup-steps",
        "2",
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / "metrics.csv") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    assert lrs == pytest.approx([1e-3 * lr_factor("poly", 3, 6, 2), 0.0])
