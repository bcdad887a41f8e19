"""Loss registry: single losses by name and weighted sums of them. Every loss ignores pixels
labelled IGNORE (255).

Names (all multiclass, from logits [B, C, H, W] and long targets [B, H, W]):
  ce       cross-entropy (torch), optional `label_smoothing`
  focal    smp's focal loss: one-vs-rest sigmoid focal per class, `focal_gamma`, `focal_alpha`
           (its gradient kept finite for gamma < 1)
  dice     smp's soft dice, 1 - 2TP / (2TP + FP + FN) per class
  jaccard  smp's soft IoU, 1 - TP / (TP + FP + FN) per class
  lovasz   smp's Lovasz-softmax (convex surrogate of the IoU loss), over the classes present
  tversky  smp's Tversky, 1 - TP / (TP + alpha FP + beta FN) per class (`tversky_alpha`,
           `tversky_beta`; 0.5/0.5 is dice)
dice, jaccard and tversky count a class absent from the batch's labels as 0 in their class mean.

The `loss` value is one name, a weighted sum written as a string (`ce+dice`, `0.5*ce+0.5*dice`;
a term without a weight has weight 1) or a mapping {name: weight}. Weights are positive numbers;
each name appears once. `loss_label` gives the canonical short form for tables.

Class weights (float [num_classes]) apply to every term that takes them: ce weights each pixel by
its true class (torch's `weight`); focal, dice, jaccard and tversky take the weighted mean of their
per-class terms (smp's `class_weights`). smp's Lovasz loss has no class weights: the lovasz term
ignores them.

A batch with no labelled pixel (all 255) gives a loss of 0 with zero gradients, never nan. So does
ce when every labelled pixel's class weight is 0.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import did_you_mean, is_number, number
from errors import UserError
from labels import IGNORE


Weights = Optional[torch.Tensor]
LossTerms = tuple[tuple[str, float], ...]


class CrossEntropy(nn.Module):
    """torch cross-entropy (class weights, label smoothing), mean over labelled pixels weighted by
    their class weight as torch's mean is, but 0 rather than nan when that weight sums to 0."""

    def __init__(self, weight: Weights = None, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_pixel = F.cross_entropy(logits, target, weight=self.weight, ignore_index=IGNORE,
                                    reduction="none", label_smoothing=self.label_smoothing)
        valid = target != IGNORE
        if self.weight is None:
            pixel_weights = valid.to(per_pixel.dtype)
        else:
            # Label 255 would index past the weights: look up class 0 there, then mask it out.
            pixel_weights = self.weight[torch.where(valid, target, 0)] * valid
        return _ratio_or_zero(per_pixel.sum(), pixel_weights.sum())


class Lovasz(smp.losses.LovaszLoss):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # smp returns an empty [0, C] tensor when every pixel is ignored; its sum is the 0 we want.
        return super().forward(logits, target).sum()


class WeightedLoss(nn.Module):
    """The sum of weight × term over the terms of a loss spec; 0 for a batch with no labelled pixel."""

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = sum(self.weights[name] * term(logits, target) for name, term in self.terms.items())
        # smp's focal loss is nan (a mean over no pixels) when every pixel is ignored. where() gives
        # 0 and a zero gradient there, without a GPU sync.
        return torch.where((target != IGNORE).any(), total, torch.zeros_like(total))


def _ratio_or_zero(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    positive = count > 0
    # Dividing by 1 where count is 0 keeps the unused branch finite, so its gradient is not nan.
    return torch.where(positive, total / torch.where(positive, count, torch.ones_like(count)),
                       torch.zeros_like(total))


def _weights_as_buffer(loss: nn.Module) -> nn.Module:
    # smp keeps class_weights as a plain attribute and copies it to the device on every call; as a
    # buffer it moves once, with the module's .to(device).
    weights = loss.class_weights
    if weights is not None:
        del loss.class_weights
        loss.register_buffer("class_weights", weights, persistent=False)
    return loss


def _param(config: dict, name: str):
    return config.get(name, LOSS_PARAMS[name][1])


def _cross_entropy(config: dict, class_weights: Weights) -> nn.Module:
    return CrossEntropy(class_weights, float(_param(config, "label_smoothing")))


FOCAL_FLOOR = 1e-6  # the least (1 - pt) the focal term is raised to gamma from


def _focal(config: dict, class_weights: Weights) -> nn.Module:
    alpha = _param(config, "focal_alpha")
    alpha = None if alpha is None else float(alpha)
    gamma = float(_param(config, "focal_gamma"))
    loss = smp.losses.FocalLoss(mode="multiclass", gamma=gamma, alpha=alpha, ignore_index=IGNORE,
                                class_weights=class_weights)
    loss.focal_loss_fn = partial(_finite_focal_loss_with_logits, gamma=gamma, alpha=alpha)
    return _weights_as_buffer(loss)


def _finite_focal_loss_with_logits(logits: torch.Tensor, target: torch.Tensor, gamma: float,
                                   alpha: float | None) -> torch.Tensor:
    """smp's binary focal loss (reduction mean), with the modulating factor's base (1 - pt) kept at or
    above FOCAL_FLOOR. At a pixel the model is sure of, pt rounds to 1, and for gamma < 1 the gradient
    of (1 - pt) ** gamma there is infinite: smp's version turns it into nan and the weights with it
    (the low gammas that often win are the ones that break). The floor changes the loss by at most
    FOCAL_FLOOR ** gamma times a loss that is already ~0 there."""
    target = target.to(logits.dtype)
    log_pt = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = (1.0 - torch.exp(-log_pt)).clamp_min(FOCAL_FLOOR).pow(gamma) * log_pt
    if alpha is not None:
        loss = loss * (alpha * target + (1 - alpha) * (1 - target))
    return loss.mean()


def _dice(config: dict, class_weights: Weights) -> nn.Module:
    return _weights_as_buffer(smp.losses.DiceLoss(mode="multiclass", ignore_index=IGNORE,
                                                  class_weights=class_weights))


def _jaccard(config: dict, class_weights: Weights) -> nn.Module:
    return _weights_as_buffer(smp.losses.JaccardLoss(mode="multiclass", ignore_index=IGNORE,
                                                     class_weights=class_weights))


def _lovasz(config: dict, class_weights: Weights) -> nn.Module:
    return Lovasz(mode="multiclass", ignore_index=IGNORE)  # no class weights in smp's Lovasz


def _tversky(config: dict, class_weights: Weights) -> nn.Module:
    return _weights_as_buffer(smp.losses.TverskyLoss(
        mode="multiclass", alpha=float(_param(config, "tversky_alpha")), beta=float(_param(config, "tversky_beta")),
        ignore_index=IGNORE, class_weights=class_weights))


LOSSES: dict[str, Callable[[dict, Weights], nn.Module]] = {
    "ce": _cross_entropy,
    "focal": _focal,
    "dice": _dice,
    "jaccard": _jaccard,
    "lovasz": _lovasz,
    "tversky": _tversky,
}

# The trial parameters each loss reads (for conditional search parameters and tables).
LOSS_TERM_PARAMS: dict[str, tuple[str, ...]] = {
    "ce": ("label_smoothing",),
    "focal": ("focal_gamma", "focal_alpha"),
    "tversky": ("tversky_alpha", "tversky_beta"),
}


def build_loss(config: dict, class_weights: Weights = None) -> WeightedLoss:
    """Builds the loss config['loss'] names (default ce), with its parameters from config (defaults
    from LOSS_PARAMS). Raises UserError for a bad loss spec or parameter.

    class_weights: optional float [num_classes] weights, non-negative and not all zero.
    """
    params = _checked_params(config)
    weights = _checked_weights(class_weights)
    terms = parse_loss(params["loss"])
    return WeightedLoss({name: LOSSES[name](params, weights) for name, _ in terms}, dict(terms))


def _checked_params(config: dict) -> dict:
    params = {name: config.get(name, default) for name, (_, default) in LOSS_PARAMS.items()}
    for name, value in params.items():
        try:
            LOSS_PARAMS[name][0](value)
        except UserError as exc:
            raise UserError(f"{name}: {exc}") from None
    return params


def _checked_weights(class_weights: Weights) -> Weights:
    if class_weights is None:
        return None
    weights = torch.as_tensor(class_weights, dtype=torch.float32)
    if weights.ndim != 1 or not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() == 0:
        raise ValueError(f"class_weights must be 1-D, finite, non-negative and not all zero; got {weights}")
    return weights


def parse_loss(value) -> LossTerms:
    """((name, weight), ...) of a loss spec: a name, 'ce+dice', '0.5*ce+0.5*dice' or {name: weight}.

    Raises UserError naming the bad part: an unknown name (with a close match), a weight that is not
    a number > 0, an empty term, a name given twice.
    """
    if isinstance(value, str):
        terms = _parse_loss_string(value)
    elif isinstance(value, dict) and value:
        terms = tuple((_checked_name(name, value), _checked_weight(weight, value)) for name, weight in value.items())
    else:
        raise UserError(f"loss must be a name, a sum such as '0.5*ce+0.5*dice' or a mapping such as "
                        f"{{ce: 0.5, dice: 0.5}}, got {value!r}")
    names = [name for name, _ in terms]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"loss {name!r} appears twice in {value!r}; give each loss once")
    return terms


def _parse_loss_string(text: str) -> LossTerms:
    return tuple(_parse_term(part, text) for part in text.split("+"))


def _parse_term(part: str, text: str) -> tuple[str, float]:
    weight_text, star, name = part.rpartition("*")
    if not name.strip():
        raise UserError(f"empty term in loss {text!r}; terms are NAME or WEIGHT*NAME joined by +")
    weight = _weight_from_text(weight_text.strip(), text) if star else 1.0
    return _checked_name(name.strip(), text), weight


def _weight_from_text(text: str, spec: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight) or weight <= 0:
        raise UserError(f"bad weight {text!r} in loss {spec!r}: expected a number > 0 before '*'")
    return weight


def _checked_weight(weight, spec) -> float:
    if not is_number(weight) or weight <= 0:
        raise UserError(f"bad weight {weight!r} in loss {spec!r}: expected a number > 0")
    return float(weight)


def _checked_name(name, spec) -> str:
    if name in LOSSES:
        return name
    where = "" if name == spec else f" in {spec!r}"
    hint = did_you_mean(str(name).lower(), LOSSES) or f" (choose from {', '.join(LOSSES)})"
    raise UserError(f"unknown loss {name!r}{where}{hint}")


def loss_label(value) -> str:
    """Canonical short form of a loss spec for tables: terms sorted by name, weight 1 left out
    ('ce', 'ce+dice', '0.5*ce+0.5*dice'). parse_loss reads it back."""
    return "+".join(name if weight == 1 else f"{_format_weight(weight)}*{name}"
                    for name, weight in sorted(parse_loss(value)))


def _format_weight(weight: float) -> str:
    text = repr(weight).replace("e+", "e")  # '1e+16' would read back as two terms
    return text.removesuffix(".0")


def _loss_spec(value) -> None:
    parse_loss(value)


# Trial parameters of the loss, each with the check of one value and its default (search.space
# merges them into its TRIAL_PARAMS).
_positive_number = number(low=0, low_open=True, expected="a positive number")
LOSS_PARAMS = {
    "loss": (_loss_spec, "ce"),
    "label_smoothing": (number(0, 1, high_open=True, name="label_smoothing"), 0.0),
    "focal_gamma": (number(low=0, expected="a non-negative number"), 2.0),  # 0: alpha-balanced one-vs-rest BCE
    "focal_alpha": (number(0, 1, low_open=True, high_open=True, optional=True, name="focal_alpha"), None),
    "tversky_alpha": (_positive_number, 0.5),
    "tversky_beta": (_positive_number, 0.5),
}
