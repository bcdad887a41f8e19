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


def _sigmoid_focal_by_hand(logits, target, gamma):
    """smp's multiclass focal loss: one-vs-rest sigmoid focal per class, mean over valid pixels, then over classes."""
    valid = target != IGNORE_INDEX
    per_class = []
    for c in range(logits.shape[1]):
        x, y = logits[:, c][valid], (target[valid] == c).float()
        p_true = torch.where(y > 0, torch.sigmoid(x), 1 - torch.sigmoid(x))
        per_class.append(((1 - p_true) ** gamma * -torch.log(p_true)).mean())
    return torch.stack(per_class).mean()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_matches_hand_computation(gamma):
    logits, target = _batch()
    loss = build_loss({"loss": "focal", "focal_gamma": gamma})(logits, target)
    assert torch.allclose(loss, _sigmoid_focal_by_hand(logits, target, gamma), atol=1e-5)


def test_higher_focal_gamma_down_weights_easy_pixels():
    logits, target = _batch()
    losses = [build_loss({"loss": "focal", "focal_gamma": g})(logits, target) for g in (0.0, 1.0, 2.0)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_ignores_pixels_labelled_255(name):
    logits, target = _batch()
    loss = build_loss({"loss": name, "focal_gamma": 1.5})
    changed = logits.clone()
    changed[0, :, :2] = torch.randn_like(changed[0, :, :2]) * 10  # only ignored pixels change
    assert torch.allclose(loss(logits, target), loss(changed, target), atol=1e-6)
    logits.requires_grad_(True)
    loss(logits, target).backward()
    assert logits.grad[0, :, :2].abs().max() == 0


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss({"loss": "hinge"})
