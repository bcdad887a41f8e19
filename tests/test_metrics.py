import numpy as np
import torch

from labels import IGNORE
from models.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy


def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels():
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
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


def test_image_mious_average_each_image_over_its_own_classes():
    from models.metrics import image_mious

    target = torch.tensor([[[0, 0], [1, 1]],                        # image 0
                           [[2, 2], [2, IGNORE]],             # image 1
                           [[IGNORE, IGNORE], [IGNORE, IGNORE]]])  # all ignored
    pred = torch.tensor([[[0, 1], [1, 1]],
                         [[2, 2], [0, 0]],
                         [[1, 1], [1, 1]]])
    scores = image_mious(target, pred, 3)
    # image 0: class 0 IoU 1/2, class 1 IoU 2/3, class 2 absent -> (1/2 + 2/3) / 2
    # image 1: class 2 IoU 2/3, class 0 predicted once but absent from truth -> IoU 0 -> (2/3 + 0) / 2
    assert torch.allclose(scores[:2], torch.tensor([(1 / 2 + 2 / 3) / 2, (2 / 3) / 2], dtype=torch.float64))
    assert torch.isnan(scores[2])


def test_image_mean_differs_from_the_dataset_mean():
    from models.metrics import image_mious

    target = torch.tensor([[[1, 1, 1, 1]], [[0, 0, 0, 1]]])
    pred = torch.tensor([[[1, 1, 1, 1]], [[0, 0, 0, 0]]])
    per_image = image_mious(target, pred, 2)
    assert torch.allclose(per_image, torch.tensor([1.0, (3 / 4 + 0) / 2], dtype=torch.float64))
    dataset = mean_iou(confusion_matrix(target, pred, 2))  # class 0: 3/4, class 1: 4/5
    assert abs(dataset - (3 / 4 + 4 / 5) / 2) < 1e-12 and abs(per_image.mean().item() - dataset) > 0.05  # 0.6875 vs 0.775


def test_all_wrong_and_all_ignored_cases():
    from models.metrics import image_mious

    target = torch.tensor([[0, 0], [1, 1]])
    wrong = 1 - target
    assert mean_iou(confusion_matrix(target, wrong, 2)) == 0.0
    assert torch.equal(image_mious(target[None], wrong[None], 2), torch.tensor([0.0], dtype=torch.float64))
    ignored = torch.full((2, 2), IGNORE)
    assert mean_iou(confusion_matrix(ignored, target, 2)) == 0.0  # nothing to score
