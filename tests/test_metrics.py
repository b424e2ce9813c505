import math

import pytest
import torch

from metrics import ConfusionMatrix


def test_hand_computed_case_with_ignore_and_absent_class():
    # 3 classes; the ignored pixel is predicted as class 2, which must not count anywhere.
    target = torch.tensor([[0, 1], [1, 255]])
    pred = torch.tensor([[0, 1], [0, 2]])
    cm = ConfusionMatrix(num_classes=3, ignore_index=255)
    cm.update(target, pred)
    assert cm.mat.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    scores = cm.compute()
    assert scores.pixel_accuracy == pytest.approx(2 / 3)
    # class 0: TP 1, union = 2 predicted + 1 true - 1 = 2; class 1: TP 1, union = 1 + 2 - 1 = 2
    assert scores.iou[:2] == pytest.approx([0.5, 0.5])
    assert math.isnan(scores.iou[2])  # in neither ground truth nor prediction: excluded from the mean
    assert scores.miou == pytest.approx(0.5)


def test_false_positive_class_counts_in_miou():
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 0, 1])  # class 1 never true, but predicted once: IoU 0
    cm = ConfusionMatrix(num_classes=2)
    cm.update(target, pred)
    scores = cm.compute()
    assert scores.iou == pytest.approx([0.75, 0.0])
    assert scores.miou == pytest.approx(0.375)
    assert scores.pixel_accuracy == pytest.approx(0.75)


def test_accumulates_over_whole_split_not_per_batch_mean():
    # Batch 1 has only class 0 (perfect), batch 2 has class 1 half right.
    t1, p1 = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    t2, p2 = torch.ones(4, dtype=torch.long), torch.tensor([1, 1, 0, 0])
    cm = ConfusionMatrix(num_classes=2)
    cm.update(t1, p1)
    cm.update(t2, p2)
    # Over the split: class 0 TP 4, union 4 + 2 = 6; class 1 TP 2, union 4 -> mIoU (4/6 + 2/4) / 2
    assert cm.compute().miou == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert cm.compute().pixel_accuracy == pytest.approx(6 / 8)
    # The per-batch average would have been (1.0 + mean(0/2, 2/4)) / 2 = 0.625: different, and wrong.
    assert cm.compute().miou != pytest.approx(0.625)


def test_all_pixels_ignored_gives_nan_not_a_crash():
    cm = ConfusionMatrix(num_classes=2, ignore_index=255)
    cm.update(torch.full((3, 3), 255), torch.zeros(3, 3, dtype=torch.long))
    scores = cm.compute()
    assert math.isnan(scores.pixel_accuracy) and math.isnan(scores.miou)


def test_out_of_range_target_is_an_error():
    cm = ConfusionMatrix(num_classes=2, ignore_index=255)
    with pytest.raises(ValueError, match="class indices >= 2"):
        cm.update(torch.tensor([5]), torch.tensor([0]))
