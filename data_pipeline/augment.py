"""Augmentation policies (albumentations), each a name the search space can choose."""
from __future__ import annotations

from typing import Callable

import albumentations as A
from albumentations.pytorch import ToTensorV2

POLICIES: dict[str, Callable[[], list]] = {
    "none": lambda: [],
    "flip": lambda: [A.HorizontalFlip(p=0.5)],
}


def build_transform(policy: str, mean, std, train: bool) -> A.Compose:
    """policy's augmentations (train only), then normalisation and conversion to a CHW tensor."""
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation {policy!r}; choose one of {sorted(POLICIES)}")
    augment = POLICIES[policy]() if train else []
    return A.Compose([*augment, A.Normalize(mean=mean, std=std), ToTensorV2()])
