import numpy as np
import torch

from models.metrics import IGNORE_INDEX, confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels():
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    conf = confusion_matrix(target, pred, 3)
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert torch.equal(conf, expected)


def test_mean_iou_matches_hand_computation():
    conf = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    # class 0: tp 1, union 1+2+2-1 = 3 (row 2 + col 2 - tp); class 1: 2 / 3; class 2: 0 / 1
    iou = iou_per_class(conf)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 0.0])
    assert abs(mean_iou(conf) - (1 / 3 + 2 / 3 + 0) / 3) < 1e-12
    assert abs(pixel_accuracy(conf) - 3 / 5) < 1e-12


def test_classes_absent_from_truth_and_prediction_are_left_out():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    conf = confusion_matrix(target, pred, 5)  # classes 2-4 never appear
    iou = iou_per_class(conf)
    assert np.isnan(iou[2:]).all()
    assert abs(mean_iou(conf) - (2 / 3 + 1 / 2) / 2) < 1e-12


def test_mean_iou_of_perfect_prediction_is_one():
    labels = torch.randint(0, 4, (2, 8, 8))
    assert mean_iou(confusion_matrix(labels, labels, 4)) == 1.0
