"""Class-imbalance tools: pixel frequencies, loss class weights and a rare-class image sampler.

Label maps are uint8 with 0 = background, 1..K = classes and 255 = ignored; num_classes counts
the background (K + 1). Masks may be read-only memmaps: they are read in chunks, never written.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

from labels import BACKGROUND, IGNORE

from .splits import image_classes_from_masks, iter_chunks

CLASS_WEIGHT_MODES = ("none", "inverse", "sqrt_inverse")
SAMPLERS = ("uniform", "rare")


def class_pixel_frequencies(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """float64 [num_classes]: each class's share of the non-ignored pixels (all zeros if there are none)."""
    counts = np.zeros(256, np.int64)
    for _, chunk in iter_chunks(np.asarray(masks)):
        counts += np.bincount(chunk.ravel(), minlength=256)
    counts[IGNORE] = 0
    unknown = np.flatnonzero(counts[num_classes:])
    if len(unknown):
        labels = (unknown + num_classes).tolist()
        raise ValueError(f"masks contain labels {labels} outside 0..{num_classes - 1} and 255")
    total = counts.sum()
    return counts[:num_classes] / total if total else np.zeros(num_classes)


def class_weights(frequencies: np.ndarray, mode: str) -> np.ndarray:
    """float32 loss weights per class from pixel frequencies.

    none: all ones; inverse: 1/freq; sqrt_inverse: 1/sqrt(freq). Weights are scaled so that their
    mean over pixels (weighted by frequency) is 1, keeping the loss on the unweighted scale.
    A class with no pixels gets the largest weight: it is the limit of the rarest class, and with
    focal loss (one-vs-rest per class) a zero weight would leave its logit unconstrained, so the
    model could predict an unseen class anywhere at no cost.
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"unknown class weight mode {mode!r}; choose one of {list(CLASS_WEIGHT_MODES)}")
    frequencies = np.asarray(frequencies, np.float64)
    present = frequencies > 0
    if mode == "none" or not present.any():
        return np.ones(len(frequencies), np.float32)
    power = 1.0 if mode == "inverse" else 0.5
    weights = np.zeros(len(frequencies))
    weights[present] = frequencies[present] ** -power
    weights /= (frequencies * weights).sum() / frequencies.sum()
    weights[~present] = weights.max()
    return weights.astype(np.float32)


def rare_class_sample_weights(masks_or_image_classes: np.ndarray | Sequence[Iterable[int]],
                              num_classes: int) -> np.ndarray:
    """float64 [N] sampling weight per image: 1/sqrt(image frequency) of the rarest class it contains.

    Image frequency = share of images containing the class (0 and 255 never count). Background-only
    images get the smallest weight any image with a class gets (1 if no image has a class).
    """
    presence = _class_presence(masks_or_image_classes, num_classes)
    weights = (presence * _rarity(presence)).max(1, initial=0.0)
    has_class = presence.any(1)
    weights[~has_class] = weights[has_class].min() if has_class.any() else 1.0
    return weights


def class_rarity(masks_or_image_classes: np.ndarray | Sequence[Iterable[int]], num_classes: int) -> np.ndarray:
    """float64 [num_classes]: 1/sqrt(share of images containing the class), 0 for background and for
    classes no image contains (what augment.Crop draws the class of a focused crop by)."""
    return _rarity(_class_presence(masks_or_image_classes, num_classes))


def _rarity(presence: np.ndarray) -> np.ndarray:
    image_frequency = presence.mean(0)
    with np.errstate(divide="ignore"):
        return np.where(image_frequency > 0, image_frequency ** -0.5, 0.0)


def build_sampler(name: str, masks: np.ndarray, num_classes: int, generator: torch.Generator | None = None,
                  mix=None) -> Sampler | None:
    """The training sampler by name; None for 'uniform' without a source mix (the caller shuffles
    instead). mix (data_pipeline.extra_data.SourceMix): each source's share of the samples, within
    which the named sampler's weights still apply."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    if name == "uniform" and mix is None:
        return None
    weights = np.ones(len(masks)) if name == "uniform" else rare_class_sample_weights(masks, num_classes)
    if mix is not None:
        weights = mix.apply(weights)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(weights),
                                 replacement=True, generator=generator)


def _class_presence(masks_or_image_classes, num_classes: int) -> np.ndarray:
    """bool [N, num_classes]: image i contains class c (column 0, background, is always False)."""
    if isinstance(masks_or_image_classes, np.ndarray) and masks_or_image_classes.ndim == 3:
        image_classes = image_classes_from_masks(masks_or_image_classes)
    else:
        image_classes = masks_or_image_classes
    presence = np.zeros((len(image_classes), num_classes), bool)
    for i, classes in enumerate(image_classes):
        classes = sorted({int(c) for c in classes} - {BACKGROUND, IGNORE})
        unknown = [c for c in classes if not 0 < c < num_classes]
        if unknown:
            raise ValueError(f"image {i} has classes {unknown} outside 1..{num_classes - 1}")
        presence[i, classes] = True
    return presence
