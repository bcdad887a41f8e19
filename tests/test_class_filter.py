"""Per-class false-positive control (models.class_filter): thresholds fitted on val, checked against
brute force over every candidate, and applied as they were scored."""
import itertools

import numpy as np
import pytest
import torch

from models.class_filter import NEVER, THRESHOLDS, ClassFilter, fit_class_filter
from models.ensemble import combine, quantize
from models.metrics import confusion_matrix, mean_iou


def _scene(seed=0, images=6, size=32, classes=3):
    """Labels with a confident true object of class 1 per image, a half-found one of class 1 at
    middling confidence, and small doubtful false positives of class 2 (absent from the truth)."""
    rng = np.random.default_rng(seed)
    truth = torch.zeros(images, size, size, dtype=torch.long)
    labels = torch.zeros_like(truth)
    share = torch.full((images, size, size), 0.95)
    for i in range(images):
        truth[i, 4:14, 4:14] = 1
        labels[i, 4:14, 4:14] = 1
        y, x = rng.integers(16, 28, 2)
        labels[i, y:y + 3, x:x + 3] = 2
        share[i, y:y + 3, x:x + 3] = 0.45
        truth[i, 20:30, 2:8] = 1
        labels[i, 20:25, 2:8] = 1
        share[i, 20:25, 2:8] = 0.62
        labels[i, 0:2, 20:22] = 1  # a tiny confident false positive of class 1
    truth[0, 0, :] = 255  # ignored pixels never count
    return labels, share, truth, classes


def test_apply_relabels_the_pixels_below_their_class_threshold_as_background():
    labels, share, _, classes = _scene()
    rule = ClassFilter.identity(classes)
    assert torch.equal(rule.apply(labels, share), labels)
    rule.thresholds[2] = 0.5
    filtered = rule.apply(labels, share)
    assert not (filtered == 2).any() and torch.equal(filtered[labels != 2], labels[labels != 2])
    rule.thresholds[1] = 0.7  # the middling pixels of class 1 go, the confident ones stay
    filtered = rule.apply(labels, share)
    assert torch.equal(filtered == 1, (labels == 1) & (share >= 0.7))
    rule.thresholds[1] = NEVER
    assert not (rule.apply(labels, share) == 1).any()
    assert ClassFilter.from_dict(rule.to_dict(["bg", "a", "b"]), ["bg", "a", "b"]) == rule


def test_the_fit_is_the_best_per_class_rule_and_its_confusion_is_what_apply_gives():
    labels, share, truth, classes = _scene()
    fit = fit_class_filter(labels, share, truth, classes)
    applied = fit.filter.apply(labels, share)
    assert torch.equal(fit.confusion, confusion_matrix(truth, applied, classes))
    assert fit.val_miou == pytest.approx(mean_iou(fit.confusion))
    assert fit.val_miou_before == pytest.approx(mean_iou(confusion_matrix(truth, labels, classes)))
    assert fit.val_miou > fit.val_miou_before
    assert not (applied == 2).any() and fit.unseen == [2]  # predicted on val, never in its truth
    assert fit.filter.thresholds[2] == NEVER  # of the thresholds that drop all of it, the highest
    # brute force over every combination of per-class thresholds
    best = -1.0
    for t1, t2 in itertools.product(THRESHOLDS, repeat=2):
        candidate = ClassFilter([0.0, t1, t2])
        best = max(best, mean_iou(confusion_matrix(truth, candidate.apply(labels, share), classes)))
    assert fit.val_miou == pytest.approx(best)


def test_a_filter_never_lowers_val_miou_on_random_predictions():
    for seed in range(5):
        rng = torch.Generator().manual_seed(seed)
        probs = torch.rand(4, 5, 24, 24, generator=rng).softmax(1)
        truth = torch.randint(0, 5, (4, 24, 24), generator=rng)
        labels, share = combine([(1.0, quantize(probs))])
        fit = fit_class_filter(labels, share, truth, 5)
        assert fit.val_miou >= fit.val_miou_before
        assert torch.equal(fit.confusion, confusion_matrix(truth, fit.filter.apply(labels, share), 5))


def test_combine_labels_by_weighted_probabilities_then_rejects_then_filters():
    a = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]]).T.reshape(1, 3, 1, 2)
    b = torch.tensor([[0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]).T.reshape(1, 3, 1, 2)
    labels, share = combine([(0.5, a), (0.5, b)])
    assert labels.tolist() == [[[1, 2]]] and share[0, 0].tolist() == pytest.approx([0.5, 0.5])
    labels, _ = combine([(1.0, a), (0.0, b)])  # a member without weight takes no part
    assert labels.tolist() == [[[0, 2]]]
    labels, _ = combine([(0.5, a), (0.5, b)], reject=(0.55, 2))
    assert labels.tolist() == [[[2, 2]]]
    rule = ClassFilter.identity(3)
    rule.thresholds[1] = 0.6
    labels, _ = combine([(0.5, a), (0.5, b)], class_filter=rule)
    assert labels.tolist() == [[[0, 2]]]
