"""Per-class factors on an ensemble's probabilities (models.class_scales): the histogram scoring
against direct argmax scoring of every candidate, the fit raising an under-predicted rare class, the
minimum gain, and the choice among member weights."""
import numpy as np
import pytest
import torch

from labels import by_label
from models.class_scales import (MIN_GAIN, SCALES, _scores, choose_with_scales, fit_class_scales, fit_pixels,
                                 weight_candidates)
from models.ensemble import combine, ensemble_confusion, quantize
from models.metrics import confusion_matrix, mean_iou


def _member(truth: torch.Tensor, classes: int, rare_strength: float, seed: int) -> torch.Tensor:
    """uint8 probabilities [N, C, H, W] of a model that finds the frequent classes (logit 2 for the
    true class) but mistakes the rare class (label 2) for background: on its pixels background gets
    logit 1 and class 2 only `rare_strength`; noise of std 0.3 on every logit."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(0.3 * rng.standard_normal((len(truth), classes, *truth.shape[1:]), dtype=np.float32))
    for cls in (0, 1):
        logits[:, cls] += 2.0 * (truth == cls)
    logits[:, 0] += 1.0 * (truth == 2)
    logits[:, 2] += rare_strength * (truth == 2)
    return quantize(logits.softmax(dim=1))


def _scene(images=8, size=32, classes=3):
    truth = torch.zeros(images, size, size, dtype=torch.long)
    truth[:, :, 16:] = 1
    truth[:, 4:10, 4:10] = 2  # the rare class: 36 of 1024 pixels an image
    truth[0, 0, :] = 255
    return truth, classes


def test_each_candidate_factor_scores_what_the_argmax_with_it_gives():
    truth, classes = _scene()
    probs = _member(truth, classes, 0.5, seed=0)
    log_probs, pixels = fit_pixels([(1.0, probs)], truth, stride=1)
    kept = pixels != 255
    chosen = [SCALES.index(1.0), SCALES.index(2.0), SCALES.index(0.7)]
    for cls in (1, 2):
        scores = _scores(log_probs[:, kept], pixels[kept], torch.tensor(np.log(SCALES), dtype=torch.float32),
                         chosen, cls, classes)
        for index, factor in enumerate(SCALES):
            scales = [1.0] + [SCALES[chosen[c]] if c != cls else factor for c in (1, 2)]
            direct = mean_iou(ensemble_confusion([(1.0, probs)], truth, classes, scales=scales))
            assert scores[index] == pytest.approx(direct, abs=2e-3), (cls, factor)  # margins at quantum ties aside


def test_the_fit_raises_an_under_predicted_rare_class_and_combine_applies_it():
    truth, classes = _scene()
    probs = _member(truth, classes, 0.8, seed=1)
    fit = fit_class_scales(*fit_pixels([(1.0, probs)], truth, stride=1), classes)
    assert fit.scales[0] == 1.0 and fit.scales[2] > 1.0
    assert fit.val_miou >= fit.val_miou_before + MIN_GAIN
    before = confusion_matrix(truth, combine([(1.0, probs)])[0], classes)
    labels, share = combine([(1.0, probs)], scales=fit.scales)
    after = confusion_matrix(truth, labels, classes)
    assert mean_iou(after) == pytest.approx(fit.val_miou, abs=2e-3)
    assert (labels == 2).sum() > combine([(1.0, probs)])[0].eq(2).sum()
    assert mean_iou(after) > mean_iou(before)
    assert share.max() <= 1.0 + 1e-6  # the share is of the scaled sum
    assert by_label(fit.to_dict(["bg", "a", "b"]), ["bg", "a", "b"], 1.0) == fit.scales


def test_a_model_that_needs_no_correction_keeps_factor_one():
    truth, classes = _scene()
    probs = _member(truth, classes, 3.0, seed=2)
    fit = fit_class_scales(*fit_pixels([(1.0, probs)], truth, stride=1), classes)
    assert fit.scales == [1.0, 1.0, 1.0]
    assert fit.val_miou == fit.val_miou_before


def test_the_choice_keeps_the_candidate_best_with_its_own_scales():
    truth, classes = _scene()
    members = [_member(truth, classes, strength, seed) for strength, seed in ((0.6, 3), (1.0, 4), (0.3, 5))]
    candidates = {"selection": [1.0, 0.0, 0.0], "best 2": [0.5, 0.5, 0.0], "best 3": [1 / 3] * 3}
    choice = choose_with_scales(candidates, members, truth, classes)
    assert set(choice.tried) == set(candidates)
    assert choice.tried[choice.name] == max(choice.tried.values())
    assert choice.weights == candidates[choice.name]
    terms = [(w, p) for w, p in zip(choice.weights, members)]
    assert torch.equal(choice.confusion, ensemble_confusion(terms, truth, classes, scales=choice.fit.scales))
    for name, weights in candidates.items():  # each candidate was scored with its own fit
        own = fit_class_scales(*fit_pixels([(w, p) for w, p in zip(weights, members)], truth), classes)
        assert choice.tried[name] == pytest.approx(own.val_miou)


def test_weight_candidates_are_the_selection_and_the_best_n_within_the_budget():
    miou = [0.2, 0.4, 0.3]
    assert weight_candidates([0.0, 1.0, 0.0], miou) == {  # best 1 is the selection: left out
        "selection": [0.0, 1.0, 0.0], "best 2": [0.0, 0.5, 0.5], "best 3": [1 / 3] * 3}
    within = weight_candidates([0.0, 0.6, 0.4], miou, costs=[30.0, 10.0, 15.0], budget=30.0)
    assert within == {"selection": [0.0, 0.6, 0.4], "best 1": [0.0, 1.0, 0.0], "best 2": [0.0, 0.5, 0.5]}
