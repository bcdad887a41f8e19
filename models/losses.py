"""Loss registry. Every loss ignores pixels labelled IGNORE_INDEX (255)."""
from __future__ import annotations

from typing import Callable

import segmentation_models_pytorch as smp
import torch.nn as nn

from .metrics import IGNORE_INDEX


def _cross_entropy(config: dict) -> nn.Module:
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)


def _focal(config: dict) -> nn.Module:
    return smp.losses.FocalLoss(mode="multiclass", gamma=float(config.get("focal_gamma", 2.0)), ignore_index=IGNORE_INDEX)


def _dice(config: dict) -> nn.Module:
    return smp.losses.DiceLoss(mode="multiclass", ignore_index=IGNORE_INDEX)


LOSSES: dict[str, Callable[[dict], nn.Module]] = {
    "ce": _cross_entropy,
    "focal": _focal,
    "dice": _dice,
}


def build_loss(config: dict) -> nn.Module:
    """Builds the loss named by config['loss'] (its parameters, e.g. focal_gamma, come from config too)."""
    name = config.get("loss", "ce")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](config)
