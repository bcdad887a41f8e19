import pytest
import torch
import torch.nn.functional as F

from models.losses import LOSSES, build_loss
from models.metrics import IGNORE_INDEX


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 6, 6, generator=g)
    target = torch.randint(0, 4, (2, 6, 6), generator=g)
    target[0, :2] = IGNORE_INDEX
    return logits, target


def test_ce_matches_torch_reference():
    logits, target = _batch()
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    assert torch.allclose(build_loss({"loss": "ce"})(logits, target), expected)


def _weighted_mean(per_class, weights):
    weights = torch.ones(len(per_class)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    return (torch.stack(per_class) * weights).sum() / weights.sum()


def _sigmoid_focal_by_hand(logits, target, gamma, weights=None):
    """smp's multiclass focal loss: one-vs-rest sigmoid focal per class, mean over valid pixels, then
    the (weighted) mean over classes."""
    valid = target != IGNORE_INDEX
    per_class = []
    for c in range(logits.shape[1]):
        x, y = logits[:, c][valid], (target[valid] == c).float()
        p_true = torch.where(y > 0, torch.sigmoid(x), 1 - torch.sigmoid(x))
        per_class.append(((1 - p_true) ** gamma * -torch.log(p_true)).mean())
    return _weighted_mean(per_class, weights)


def _dice_by_hand(logits, target, weights=None):
    """smp's multiclass dice loss: 1 - soft dice of the softmax per class over valid pixels (0 for a
    class absent from the target), then the (weighted) mean over classes."""
    valid = target != IGNORE_INDEX
    probs = logits.softmax(1)
    per_class = []
    for c in range(logits.shape[1]):
        p, y = probs[:, c][valid], (target[valid] == c).float()
        dice = 2 * (p * y).sum() / (p.sum() + y.sum())
        per_class.append((1 - dice) * (y.sum() > 0))
    return _weighted_mean(per_class, weights)


def _ce_by_hand(logits, target, weights):
    """Weighted cross-entropy: sum of w[y] * -log softmax[y] over valid pixels / sum of w[y]."""
    total, weight_sum = 0.0, 0.0
    log_probs = logits.log_softmax(1)
    for n, i, j in torch.nonzero(target != IGNORE_INDEX).tolist():
        y = int(target[n, i, j])
        total += weights[y] * -float(log_probs[n, y, i, j])
        weight_sum += weights[y]
    return torch.tensor(total / weight_sum)


WEIGHTS = [0.5, 2.0, 1.0, 3.0]


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_hand_computation(gamma):
    logits, target = _batch()
    loss = build_loss({"loss": "focal", "focal_gamma": gamma})(logits, target)
    assert torch.allclose(loss, _sigmoid_focal_by_hand(logits, target, gamma), atol=1e-5)


def test_higher_focal_gamma_down_weights_easy_pixels():
    logits, target = _batch()
    losses = [build_loss({"loss": "focal", "focal_gamma": g})(logits, target) for g in (0.0, 1.0, 2.0)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("weights", [None, WEIGHTS])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_ignores_pixels_labelled_255(name, weights):
    logits, target = _batch()
    loss = build_loss({"loss": name, "focal_gamma": 1.5}, None if weights is None else torch.tensor(weights))
    changed = logits.clone()
    changed[0, :, :2] = torch.randn_like(changed[0, :, :2]) * 10  # only ignored pixels change
    assert torch.allclose(loss(logits, target), loss(changed, target), atol=1e-6)
    logits.requires_grad_(True)
    loss(logits, target).backward()
    assert logits.grad[0, :, :2].abs().max() == 0


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss({"loss": "hinge"})


def test_weighted_ce_matches_hand_computation():
    logits, target = _batch()
    loss = build_loss({"loss": "ce"}, torch.tensor(WEIGHTS))(logits, target)
    assert torch.allclose(loss, _ce_by_hand(logits, target, WEIGHTS), atol=1e-5)


def test_weighted_focal_and_dice_match_hand_computation():
    logits, target = _batch()
    focal = build_loss({"loss": "focal", "focal_gamma": 1.5}, torch.tensor(WEIGHTS))(logits, target)
    assert torch.allclose(focal, _sigmoid_focal_by_hand(logits, target, 1.5, WEIGHTS), atol=1e-5)
    dice = build_loss({"loss": "dice"}, torch.tensor(WEIGHTS))(logits, target)
    assert torch.allclose(dice, _dice_by_hand(logits, target, WEIGHTS), atol=1e-5)


def test_unweighted_dice_matches_hand_computation():
    logits, target = _batch()
    assert torch.allclose(build_loss({"loss": "dice"})(logits, target), _dice_by_hand(logits, target), atol=1e-5)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_ones_weights_equal_the_unweighted_loss(name):
    logits, target = _batch()
    config = {"loss": name, "focal_gamma": 2.0}
    assert torch.allclose(build_loss(config, torch.ones(4))(logits, target), build_loss(config)(logits, target),
                          atol=1e-6)


def test_zero_weight_removes_a_class_from_ce():
    logits, target = _batch()
    loss = build_loss({"loss": "ce"}, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    changed = logits.clone()
    class_2 = (target == 2).unsqueeze(1).expand_as(logits)
    changed[class_2] = torch.randn(int(class_2.sum())) * 10  # only pixels of class 2 change
    assert torch.allclose(loss(logits, target), loss(changed, target), atol=1e-6)
    kept = (target != 2) & (target != IGNORE_INDEX)
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


@pytest.mark.parametrize("weights", [[1.0, -1.0, 1.0, 1.0], [0.0] * 4, [[1.0] * 4], [1.0, float("nan"), 1.0, 1.0]])
def test_invalid_class_weights_are_rejected(weights):
    with pytest.raises(ValueError, match="class_weights must be"):
        build_loss({"loss": "ce"}, torch.tensor(weights))
