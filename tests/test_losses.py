import math
import re

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from errors import UserError
from models.losses import LOSS_PARAMS, LOSS_TERM_PARAMS, LOSSES, build_loss, loss_label, parse_loss
from labels import IGNORE

# Every loss parameter away from its default, so the ignore/gradient tests exercise them.
ALL_PARAMS = {"focal_gamma": 1.5, "focal_alpha": 0.25, "label_smoothing": 0.1, "tversky_alpha": 0.3,
              "tversky_beta": 0.7}
WEIGHTS = [0.5, 2.0, 1.0, 3.0]
COMPOSITE = "0.5*ce+focal+0.3*dice+jaccard+lovasz+2*tversky"


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    target[0, :2] = IGNORE
    return logits, target


def _config(loss, **params):
    return {**ALL_PARAMS, "loss": loss, **params}


def _weighted_mean(per_class, weights):
    weights = torch.ones(len(per_class)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    return (torch.stack(per_class) * weights).sum() / weights.sum()


# ---------------------------------------------------------------------------------------------
# Hand computations (from the definitions, not from the library functions under test)

def _ce_by_hand(logits, target, weights=None, smoothing=0.0):
    """Per labelled pixel: (1-e) w[y] (-log p_y) + e/C sum_c w[c] (-log p_c); divided by sum of w[y]."""
    num_classes = logits.shape[1]
    weights = [1.0] * num_classes if weights is None else weights
    total, weight_sum = 0.0, 0.0
    log_probs = logits.log_softmax(1)
    for n, i, j in torch.nonzero(target != IGNORE).tolist():
        y = int(target[n, i, j])
        smooth = sum(weights[c] * -float(log_probs[n, c, i, j]) for c in range(num_classes))
        total += (1 - smoothing) * weights[y] * -float(log_probs[n, y, i, j]) + smoothing / num_classes * smooth
        weight_sum += weights[y]
    return torch.tensor(total / weight_sum)


def _sigmoid_focal_by_hand(logits, target, gamma, weights=None, alpha=None):
    """smp's multiclass focal loss: one-vs-rest sigmoid focal per class (alpha on positives, 1-alpha on
    negatives), mean over valid pixels, then the (weighted) mean over classes."""
    valid = target != IGNORE
    per_class = []
    for c in range(logits.shape[1]):
        x, y = logits[:, c][valid], (target[valid] == c).float()
        p_true = torch.where(y > 0, torch.sigmoid(x), 1 - torch.sigmoid(x))
        alpha_t = torch.ones_like(y) if alpha is None else torch.where(y > 0, alpha, 1 - alpha)
        per_class.append((alpha_t * (1 - p_true) ** gamma * -torch.log(p_true)).mean())
    return _weighted_mean(per_class, weights)


def _soft_overlap_by_hand(logits, target, score, weights=None):
    """1 - score(p, y) per class, p the softmax of the valid pixels and y their one-hot truth (0 for a
    class absent from the target), then the (weighted) mean over classes."""
    valid = target != IGNORE
    probs = logits.softmax(1)
    per_class = []
    for c in range(logits.shape[1]):
        p, y = probs[:, c][valid], (target[valid] == c).float()
        per_class.append((1 - score(p, y)) * (y.sum() > 0))
    return _weighted_mean(per_class, weights)


def _tversky_by_hand(logits, target, alpha, beta, weights=None):
    """TP / (TP + alpha FP + beta FN); alpha = beta = 0.5 is dice, alpha = beta = 1 is jaccard."""
    def tversky(p, y):
        tp, fp, fn = (p * y).sum(), (p * (1 - y)).sum(), ((1 - p) * y).sum()
        return tp / (tp + alpha * fp + beta * fn)
    return _soft_overlap_by_hand(logits, target, tversky, weights)


def _dice_by_hand(logits, target, weights=None):
    """Soft dice 2|P∩Y| / (|P| + |Y|), written independently of the Tversky form."""
    return _soft_overlap_by_hand(logits, target, lambda p, y: 2 * (p * y).sum() / (p.sum() + y.sum()), weights)


def _jaccard_by_hand(logits, target, weights=None):
    """Soft IoU |P∩Y| / (|P| + |Y| - |P∩Y|)."""
    def iou(p, y):
        intersection = (p * y).sum()
        return intersection / (p.sum() + y.sum() - intersection)
    return _soft_overlap_by_hand(logits, target, iou, weights)


def _jaccard_loss_of_set(foreground: set, wrong: set) -> float:
    """The IoU loss when exactly the pixels in `wrong` are mispredicted for this class."""
    return 1 - len(foreground - wrong) / len(foreground | wrong)


def _lovasz_by_hand(logits, target):
    """Lovasz extension of the per-class IoU loss at the errors m_i = |[y_i = c] - p_ic|, mean over the
    classes present: sum_k m_(k) (Δ({π1..πk}) - Δ({π1..πk-1})) with pixels sorted by decreasing error."""
    valid = target != IGNORE
    probs = logits.softmax(1).permute(0, 2, 3, 1)[valid]  # [P, C]
    labels = target[valid].tolist()
    per_class = []
    for c in sorted(set(labels)):
        foreground = {i for i, y in enumerate(labels) if y == c}
        errors = [abs((y == c) - float(probs[i, c])) for i, y in enumerate(labels)]
        order = sorted(range(len(labels)), key=lambda i: -errors[i])
        total, previous = 0.0, 0.0
        for k in range(1, len(order) + 1):
            current = _jaccard_loss_of_set(foreground, set(order[:k]))
            total += errors[order[k - 1]] * (current - previous)
            previous = current
        per_class.append(total)
    return torch.tensor(sum(per_class) / len(per_class))


def _loss(name, weights=None, **params):
    return build_loss(_config(name, **params), None if weights is None else torch.tensor(weights))


# ---------------------------------------------------------------------------------------------
# Small literal examples: probabilities chosen so the softmax/sigmoid values are exact.

def _logits_from_probs(probs):
    """1 x C x 1 x P logits whose softmax over C is `probs` (a list of per-pixel probability lists)."""
    return torch.tensor(probs).log().T.reshape(1, len(probs[0]), 1, len(probs))


def test_ce_label_smoothing_on_one_pixel():
    logits = _logits_from_probs([[0.5, 0.3, 0.2]])
    target = torch.tensor([[[0]]])
    expected = 0.7 * -math.log(0.5) + 0.3 / 3 * -(math.log(0.5) + math.log(0.3) + math.log(0.2))
    assert build_loss({"loss": "ce", "label_smoothing": 0.3})(logits, target).item() == pytest.approx(expected)


def test_focal_alpha_on_one_pixel():
    logits = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)  # sigmoids 0.5 and 0.75
    target = torch.tensor([[[1]]])
    class_0 = 0.75 * 0.5 ** 2 * -math.log(0.5)  # negative: alpha_t = 1 - 0.25, p_t = 0.5
    class_1 = 0.25 * 0.25 ** 2 * -math.log(0.75)  # positive: alpha_t = 0.25, p_t = 0.75
    loss = build_loss({"loss": "focal", "focal_gamma": 2.0, "focal_alpha": 0.25})(logits, target)
    assert loss.item() == pytest.approx((class_0 + class_1) / 2)


# Two pixels, labels [0, 1], softmax [0.8, 0.2] and [0.4, 0.6]:
# class 0: TP 0.8, FP 0.4, FN 0.2; class 1: TP 0.6, FP 0.2, FN 0.4.
TWO_PIXELS = (_logits_from_probs([[0.8, 0.2], [0.4, 0.6]]), torch.tensor([[[0, 1]]]))


@pytest.mark.parametrize("name, params, expected", [
    ("dice", {}, 1 - (1.6 / 2.2 + 1.2 / 1.8) / 2),
    ("jaccard", {}, 1 - (0.8 / 1.4 + 0.6 / 1.2) / 2),
    ("tversky", {"tversky_alpha": 0.3, "tversky_beta": 0.7},
     1 - (0.8 / (0.8 + 0.3 * 0.4 + 0.7 * 0.2) + 0.6 / (0.6 + 0.3 * 0.2 + 0.7 * 0.4)) / 2),
])
def test_region_losses_on_two_pixels(name, params, expected):
    logits, target = TWO_PIXELS
    assert build_loss({"loss": name, **params})(logits, target).item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Random batches against the hand computations

def test_ce_matches_torch_reference():
    logits, target = _batch()
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    assert torch.allclose(build_loss({"loss": "ce"})(logits, target), expected)


@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_ce_with_label_smoothing_matches_hand_computation(smoothing, weights):
    logits, target = _batch()
    loss = _loss("ce", weights, label_smoothing=smoothing)(logits, target)
    assert torch.allclose(loss, _ce_by_hand(logits, target, weights, smoothing), atol=1e-5)


def test_weighted_ce_matches_hand_computation():
    logits, target = _batch()
    loss = build_loss({"loss": "ce"}, torch.tensor(WEIGHTS))(logits, target)
    assert torch.allclose(loss, _ce_by_hand(logits, target, WEIGHTS), atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_hand_computation(gamma):
    logits, target = _batch()
    loss = build_loss({"loss": "focal", "focal_gamma": gamma})(logits, target)
    assert torch.allclose(loss, _sigmoid_focal_by_hand(logits, target, gamma), atol=1e-5)


@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.9])
def test_focal_with_alpha_matches_hand_computation(alpha, weights):
    logits, target = _batch()
    loss = _loss("focal", weights, focal_gamma=2.0, focal_alpha=alpha)(logits, target)
    assert torch.allclose(loss, _sigmoid_focal_by_hand(logits, target, 2.0, weights, alpha), atol=1e-5)


def test_focal_alpha_one_half_halves_the_loss():
    logits, target = _batch()
    plain = build_loss({"loss": "focal"})(logits, target)
    assert torch.allclose(build_loss({"loss": "focal", "focal_alpha": 0.5})(logits, target), plain / 2, atol=1e-6)


def test_higher_focal_gamma_down_weights_easy_pixels():
    logits, target = _batch()
    losses = [build_loss({"loss": "focal", "focal_gamma": g})(logits, target) for g in (0.0, 1.0, 2.0)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("name, by_hand", [("dice", _dice_by_hand), ("jaccard", _jaccard_by_hand)])
def test_dice_and_jaccard_match_hand_computation(name, by_hand, weights):
    logits, target = _batch()
    loss = _loss(name, weights)(logits, target)
    assert torch.allclose(loss, by_hand(logits, target, weights), atol=1e-5)


@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("alpha, beta", [(0.5, 0.5), (0.3, 0.7), (0.7, 0.3), (1.0, 1.0), (2.0, 0.5)])
def test_tversky_matches_hand_computation(alpha, beta, weights):
    logits, target = _batch()
    loss = _loss("tversky", weights, tversky_alpha=alpha, tversky_beta=beta)(logits, target)
    assert torch.allclose(loss, _tversky_by_hand(logits, target, alpha, beta, weights), atol=1e-5)


def test_tversky_defaults_are_dice():
    logits, target = _batch()
    assert torch.allclose(build_loss({"loss": "tversky"})(logits, target), build_loss({"loss": "dice"})(logits, target))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_matches_the_lovasz_extension(seed):
    logits, target = _batch(seed)
    assert torch.allclose(build_loss({"loss": "lovasz"})(logits, target), _lovasz_by_hand(logits, target), atol=1e-5)


def test_lovasz_is_zero_for_a_perfect_prediction_and_one_for_a_fully_wrong_one():
    _, target = _batch()
    perfect = 30.0 * F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    assert build_loss({"loss": "lovasz"})(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    binary = torch.tensor([[[0, 1], [1, 0]]])
    wrong = 30.0 * F.one_hot(1 - binary, 2).permute(0, 3, 1, 2).float()
    assert build_loss({"loss": "lovasz"})(wrong, binary).item() == pytest.approx(1.0, abs=1e-6)


def test_lovasz_ignores_class_weights():
    logits, target = _batch()
    assert torch.allclose(_loss("lovasz", WEIGHTS)(logits, target), _loss("lovasz")(logits, target))


# ---------------------------------------------------------------------------------------------
# Label 255

ALL_LOSSES = [*sorted(LOSSES), COMPOSITE]


@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_loss_ignores_pixels_labelled_255(name, weights):
    logits, target = _batch()
    loss = _loss(name, weights)
    changed = logits.clone()
    changed[0, :, :2] = torch.randn_like(changed[0, :, :2]) * 10  # only ignored pixels change
    assert torch.allclose(loss(logits, target), loss(changed, target), atol=1e-6)
    logits.requires_grad_(True)
    loss(logits, target).backward()
    assert logits.grad[0, :, :2].abs().max() == 0


@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_an_all_ignored_batch_gives_zero_and_zero_gradients(name, weights):
    logits, _ = _batch()
    logits.requires_grad_(True)
    target = torch.full((2, 6, 6), IGNORE)
    loss = _loss(name, weights)(logits, target)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ce_is_zero_not_nan_when_every_labelled_pixel_has_weight_zero():
    logits, target = _batch()
    target[target != IGNORE] = 2
    logits.requires_grad_(True)
    loss = _loss("ce", [1.0, 1.0, 0.0, 1.0], label_smoothing=0.1)(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# Class weights

@pytest.mark.parametrize("name", ALL_LOSSES)
def test_all_ones_weights_equal_the_unweighted_loss(name):
    logits, target = _batch()
    assert torch.allclose(_loss(name, [1.0] * 4)(logits, target), _loss(name)(logits, target), atol=1e-6)


def test_zero_weight_removes_a_class_from_ce():
    logits, target = _batch()
    loss = build_loss({"loss": "ce"}, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    changed = logits.clone()
    class_2 = (target == 2).unsqueeze(1).expand_as(logits)
    changed[class_2] = torch.randn(int(class_2.sum())) * 10  # only pixels of class 2 change
    assert torch.allclose(loss(logits, target), loss(changed, target), atol=1e-6)
    kept = (target != 2) & (target != IGNORE)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits.permute(0, 2, 3, 1)[kept], target[kept]),
                          atol=1e-6)


def test_zero_weight_removes_a_class_from_focal_and_dice():
    logits, target = _batch()
    weights = [1.0, 1.0, 0.0, 1.0]
    focal = build_loss({"loss": "focal", "focal_gamma": 2.0}, torch.tensor(weights))
    changed = logits.clone()
    changed[:, 2] = torch.randn_like(changed[:, 2]) * 10  # focal is one-vs-rest: class 2's term only
    assert torch.allclose(focal(logits, target), focal(changed, target), atol=1e-6)
    assert torch.allclose(focal(logits, target), _sigmoid_focal_by_hand(logits, target, 2.0, weights), atol=1e-5)
    # Dice: the mean of the other three classes' terms.
    dice = build_loss({"loss": "dice"}, torch.tensor(weights))(logits, target)
    assert torch.allclose(dice, _dice_by_hand(logits, target, weights), atol=1e-5)
    assert not torch.allclose(dice, _dice_by_hand(logits, target), atol=1e-5)


def test_class_weights_are_buffers_of_every_term_that_takes_them():
    loss = _loss(COMPOSITE, WEIGHTS)
    buffers = dict(loss.named_buffers(remove_duplicate=False))  # the terms share one weights tensor
    assert sorted(buffers) == ["terms.ce.weight", "terms.dice.class_weights", "terms.focal.class_weights",
                               "terms.jaccard.class_weights", "terms.tversky.class_weights"]
    loss.to(torch.float64)  # .to() converts (and on a GPU, moves) them with the module
    buffers = dict(loss.named_buffers(remove_duplicate=False))
    assert all(b.dtype == torch.float64 and b.tolist() == WEIGHTS for b in buffers.values())
    assert loss.state_dict() == {}  # not saved: they are rebuilt from the data


@pytest.mark.parametrize("weights", [[1.0, -1.0, 1.0, 1.0], [0.0] * 4, [[1.0] * 4], [1.0, float("nan"), 1.0, 1.0]])
def test_invalid_class_weights_are_rejected(weights):
    with pytest.raises(ValueError, match="class_weights must be"):
        build_loss({"loss": "ce"}, torch.tensor(weights))


# ---------------------------------------------------------------------------------------------
# Gradients

@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradients_flow_for_every_loss(name, weights):
    logits, target = _batch()
    logits.requires_grad_(True)
    _loss(name, weights)(logits, target).backward()
    labelled = (target != IGNORE).unsqueeze(1).expand_as(logits)
    assert torch.isfinite(logits.grad).all() and logits.grad[labelled].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Composites

def _single(name, logits, target):
    return _loss(name)(logits, target)


def test_a_sum_without_weights_adds_the_terms():
    logits, target = _batch()
    expected = _single("ce", logits, target) + _single("dice", logits, target)
    assert torch.allclose(_loss("ce+dice")(logits, target), expected, atol=1e-6)


@pytest.mark.parametrize("spec", ["0.5*ce+0.5*dice", " 0.5 * ce + 0.5*dice ", "0.5*dice+0.5*ce",
                                  {"ce": 0.5, "dice": 0.5}])
def test_weighted_sums_as_strings_and_mappings(spec):
    logits, target = _batch()
    expected = 0.5 * _single("ce", logits, target) + 0.5 * _single("dice", logits, target)
    assert torch.allclose(_loss(spec)(logits, target), expected, atol=1e-6)


def test_every_term_of_a_composite_uses_its_parameters_and_the_class_weights():
    logits, target = _batch()
    weights = torch.tensor(WEIGHTS)
    terms = parse_loss(COMPOSITE)
    expected = sum(w * _loss(name, WEIGHTS)(logits, target) for name, w in terms)
    assert torch.allclose(build_loss(_config(COMPOSITE), weights)(logits, target), expected, atol=1e-5)


@pytest.mark.parametrize("spec, expected", [
    ("ce", (("ce", 1.0),)),
    ("ce+dice", (("ce", 1.0), ("dice", 1.0))),
    ("0.5*ce+0.5*dice", (("ce", 0.5), ("dice", 0.5))),
    ("2*lovasz + 1e-3*focal", (("lovasz", 2.0), ("focal", 0.001))),
    ({"ce": 1, "tversky": 0.25}, (("ce", 1.0), ("tversky", 0.25))),
])
def test_parse_loss(spec, expected):
    assert parse_loss(spec) == expected


@pytest.mark.parametrize("spec, expected", [
    ("ce", "ce"),
    ({"ce": 1.0}, "ce"),
    ("dice+ce", "ce+dice"),
    ({"dice": 0.5, "ce": 0.5}, "0.5*ce+0.5*dice"),
    ("1.0*ce+2*dice", "ce+2*dice"),
    ("1e-05*focal+1e20*ce", "1e20*ce+1e-05*focal"),
])
def test_loss_label_is_canonical_and_reads_back(spec, expected):
    assert loss_label(spec) == expected
    assert sorted(parse_loss(loss_label(spec))) == sorted(parse_loss(spec))


@pytest.mark.parametrize("spec, message", [
    ("dcie", "unknown loss 'dcie' (did you mean 'dice'?)"),
    ("ce+dcie", "unknown loss 'dcie' in 'ce+dcie' (did you mean 'dice'?)"),
    ("CE", "unknown loss 'CE' (did you mean 'ce'?)"),
    ("hinge", "unknown loss 'hinge' (choose from ce, focal, dice, jaccard, lovasz, tversky)"),
    ("ce+", "empty term in loss 'ce+'"),
    ("", "empty term in loss ''"),
    ("0.5*", "empty term in loss '0.5*'"),
    ("*ce", "bad weight '' in loss '*ce'"),
    ("x*ce", "bad weight 'x' in loss 'x*ce'"),
    ("ce*0.5", "bad weight 'ce' in loss 'ce*0.5'"),
    ("-1*ce", "bad weight '-1' in loss '-1*ce'"),
    ("0*ce+dice", "bad weight '0' in loss '0*ce+dice'"),
    ("inf*ce", "bad weight 'inf' in loss 'inf*ce'"),
    ("ce+0.5*ce", "loss 'ce' appears twice in 'ce+0.5*ce'"),
    ({"ce": 0.5, "dcie": 0.5}, "unknown loss 'dcie' in {'ce': 0.5, 'dcie': 0.5} (did you mean 'dice'?)"),
    ({"ce": 0}, "bad weight 0 in loss {'ce': 0}"),
    ({"ce": True}, "bad weight True in loss {'ce': True}"),
    ({"ce": "half"}, "bad weight 'half' in loss {'ce': 'half'}"),
    ({}, "loss must be a name"),
    (None, "loss must be a name"),
    (["ce", "dice"], "loss must be a name"),
])
def test_bad_loss_specs_give_one_line_errors(spec, message):
    for check in (parse_loss, loss_label, LOSS_PARAMS["loss"][0], lambda s: build_loss({"loss": s})):
        with pytest.raises(UserError, match=re.escape(message)) as info:
            check(spec)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Parameters

@pytest.mark.parametrize("name, good, bad", [
    ("loss", ["ce", "tversky", "ce+dice", "0.5*ce+0.5*lovasz", {"ce": 0.5, "dice": 0.5}], ["dcie", 1, None]),
    ("label_smoothing", [0, 0.0, 0.1, 0.99], [-0.1, 1, 1.0, "0.1", None, True, float("nan")]),
    ("focal_gamma", [0, 0.0, 0.5, 2, 5.0], [-1, -0.5, float("inf"), "2", None, True]),
    ("focal_alpha", [None, 0.25, 0.5, 0.99], [0, 1, 1.0, -0.5, "0.25", True, float("nan")]),
    ("tversky_alpha", [0.3, 0.5, 1, 2.0], [0, -0.3, None, "0.5", float("nan")]),
    ("tversky_beta", [0.7, 0.5, 1], [0, -0.7, None, False]),
])
def test_loss_param_checks(name, good, bad):
    check, default = LOSS_PARAMS[name]
    for value in [default, *good]:
        check(value)
    for value in bad:
        with pytest.raises(UserError, match=re.escape(repr(value))):
            check(value)


def test_build_loss_names_a_bad_parameter():
    with pytest.raises(UserError, match=r"^label_smoothing: label_smoothing must be .* got 1\.5$"):
        build_loss({"loss": "ce", "label_smoothing": 1.5})
    with pytest.raises(UserError, match=r"^tversky_beta: expected a positive number, got -1$"):
        build_loss({"loss": "tversky", "tversky_beta": -1})


def test_missing_parameters_take_their_defaults():
    logits, target = _batch()
    assert torch.allclose(build_loss({})(logits, target), F.cross_entropy(logits, target, ignore_index=IGNORE))
    assert torch.allclose(build_loss({"loss": "focal"})(logits, target), _sigmoid_focal_by_hand(logits, target, 2.0),
                          atol=1e-5)


def test_every_loss_parameter_belongs_to_a_loss():
    owned = [p for params in LOSS_TERM_PARAMS.values() for p in params]
    assert sorted(owned) == sorted(set(LOSS_PARAMS) - {"loss"})
    assert set(LOSS_TERM_PARAMS) <= set(LOSSES)


def test_a_low_gamma_focal_loss_keeps_training_on_pixels_the_model_is_sure_of():
    # One pixel, three classes: the true class at logit 40 (pt rounds to 1), another at -40.
    logits = torch.tensor([40.0, -40.0, 0.5]).reshape(1, 3, 1, 1).requires_grad_()
    for gamma in (0.5, 1.0, 2.0):
        logits.grad = None
        loss = build_loss({"loss": "focal", "focal_gamma": gamma})(logits, torch.zeros(1, 1, 1, dtype=torch.long))
        loss.backward()
        assert torch.isfinite(logits.grad).all(), (gamma, logits.grad)
        assert logits.grad.flatten()[2] > 0.1  # the unsure class still learns


def test_the_focal_loss_is_smps_where_its_gradient_is_finite():
    torch.manual_seed(0)
    logits, masks = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    masks[0, 0, :3] = 255  # ignored pixels
    for gamma, alpha in ((2.0, None), (0.5, 0.25)):
        ours = build_loss({"loss": "focal", "focal_gamma": gamma, "focal_alpha": alpha})(logits, masks)
        theirs = smp.losses.FocalLoss("multiclass", gamma=gamma, alpha=alpha, ignore_index=255)(logits, masks)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
