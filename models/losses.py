"""Loss registry. Every loss ignores pixels labelled IGNORE_INDEX (255).

Optional per-class weights: cross-entropy weights each pixel by its true class (torch's `weight`);
focal and dice take the weighted mean of their per-class terms (smp's `class_weights`).
"""
from __future__ import annotations

from typing import Callable, Optional

import segmentation_models_pytorch as smp
import torch
import torch.nn as nn

from .metrics import IGNORE_INDEX

Weights = Optional[torch.Tensor]


def _cross_entropy(config: dict, class_weights: Weights) -> nn.Module:
    # `weight` is a buffer: it follows the module's .to(device).
    return nn.CrossEntropyLoss(weight=class_weights, ignore_index=IGNORE_INDEX)


def _focal(config: dict, class_weights: Weights) -> nn.Module:
    return smp.losses.FocalLoss(mode="multiclass", gamma=float(config.get("focal_gamma", 2.0)),
                                ignore_index=IGNORE_INDEX, class_weights=class_weights)


def _dice(config: dict, class_weights: Weights) -> nn.Module:
    return smp.losses.DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX, class_weights=class_weights)


LOSSES: dict[str, Callable[[dict, Weights], nn.Module]] = {
    "ce": _cross_entropy,
    "focal": _focal,
    "dice": _dice,
}


def build_loss(config: dict, class_weights: Weights = None) -> nn.Module:
    """Builds the loss named by config['loss'] (its parameters, e.g. focal_gamma, come from config too).

    class_weights: optional float [num_classes] weights, non-negative and not all zero.
    """
    name = config.get("loss", "ce")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](config, _checked_weights(class_weights))


def _checked_weights(class_weights: Weights) -> Weights:
    if class_weights is None:
        return None
    weights = torch.as_tensor(class_weights, dtype=torch.float32)
    if weights.ndim != 1 or not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() == 0:
        raise ValueError(f"class_weights must be 1-D, finite, non-negative and not all zero; got {weights}")
    return weights


def _positive_number(value) -> None:
    from errors import UserError

    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise UserError(f"expected a positive number, got {value!r}")


def _loss_name(value) -> None:
    from errors import UserError

    if value not in LOSSES:
        raise UserError(f"unknown value {value!r}; choose one of {sorted(LOSSES)}")


# Trial parameters of the loss, each with the check of one value and its default (search.space
# merges them into its TRIAL_PARAMS).
LOSS_PARAMS = {
    "loss": (_loss_name, "ce"),
    "focal_gamma": (_positive_number, 2.0),
}
