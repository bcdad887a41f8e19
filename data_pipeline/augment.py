"""Augmentation policies, each a name the search space can choose.

A policy is an optional sample-mixing step (cutmix, copy_paste: they need a second training sample,
so SegmentationDataset draws the partner and calls it) followed by per-sample albumentations
transforms. Images stay uint8 (models.inference.normalize converts batches on the device). Masks are resampled with nearest neighbour, and mask
areas that geometric transforms bring in from outside the image are filled with IGNORE (255), so
they add no loss; the matching image pixels are black.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import albumentations as A
import cv2
import numpy as np

from labels import IGNORE

# (image, mask, partner image, partner mask, rng) -> new (image, mask); never writes its inputs.
Mixer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

OUTSIDE = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": IGNORE}
MAX_PASTE_SHIFT = 0.25  # copy_paste moves an instance by up to this fraction of the image side


def cutmix(image, mask, partner_image, partner_mask, rng: np.random.Generator):
    """Copies a random box of the partner (pixels and labels) onto the same place of this sample."""
    height, width = mask.shape
    side = np.sqrt(rng.uniform())  # box area uniform in [0, 1) of the image, as CutMix's Beta(1, 1)
    box_h, box_w = int(height * side), int(width * side)
    top, left = rng.integers(0, height - box_h + 1), rng.integers(0, width - box_w + 1)
    box = np.s_[top:top + box_h, left:left + box_w]
    image, mask = image.copy(), mask.copy()
    image[box], mask[box] = partner_image[box], partner_mask[box]
    return image, mask


def copy_paste(image, mask, partner_image, partner_mask, rng: np.random.Generator):
    """Pastes 1-3 of the partner's object instances, each moved by a random shift that keeps it whole."""
    instances = _instances(partner_mask)
    if not instances:
        return image, mask
    image, mask = image.copy(), mask.copy()
    count = min(len(instances), int(rng.integers(1, 4)))
    for i in rng.choice(len(instances), size=count, replace=False):
        label, components, component = instances[i]
        ys, xs = np.nonzero(components == component)
        dy, dx = _shift_inside(ys, mask.shape[0], rng), _shift_inside(xs, mask.shape[1], rng)
        image[ys + dy, xs + dx] = partner_image[ys, xs]
        mask[ys + dy, xs + dx] = label
    return image, mask


def _instances(mask: np.ndarray) -> list[tuple[int, np.ndarray, int]]:
    """(label, component map, component id) of every connected component of every object class."""
    found = []
    for label in np.unique(mask):
        if label in (0, IGNORE):
            continue
        count, components = cv2.connectedComponents((mask == label).astype(np.uint8))
        found += [(int(label), components, k) for k in range(1, count)]
    return found


def _shift_inside(coords: np.ndarray, size: int, rng: np.random.Generator) -> int:
    """A random offset of at most MAX_PASTE_SHIFT * size that keeps coords within [0, size)."""
    limit = int(MAX_PASTE_SHIFT * size)
    return int(rng.integers(max(-limit, -coords.min()), min(limit, size - 1 - coords.max()) + 1))


@dataclass(frozen=True)
class Crop:
    """A training crop of size x size pixels (the model trains on patches and predicts whole images,
    as MMSegmentation and nnU-Net do: full resolution for small objects at a patch's cost).

    With probability `focus` the crop is placed around a pixel of a class the image contains, the
    class drawn with probability proportional to `rarity` (per label; 0 never draws), so that rare
    classes are seen far more often than their share of the pixels (nnU-Net oversamples foreground
    patches the same way). Otherwise, and in images without such a class, the crop is uniform.

    With max_scale > 1 the window's side is drawn uniformly between size and size x max_scale (at
    most the image's), and the window is resized to size x size: the model then sees objects both at
    the resolution it predicts at and zoomed out with more context, as MMSegmentation's random
    rescale before its crop does."""

    size: int
    focus: float = 0.0
    rarity: np.ndarray | None = None  # float [num_classes]; needed when focus > 0
    max_scale: float = 1.0

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        height, width = mask.shape
        if self.size > min(height, width):
            raise ValueError(f"crop {self.size} is larger than the {height}x{width} image")
        side = self._window_side(min(height, width), rng)
        centre = self._focus_pixel(mask, rng) if self.focus and rng.uniform() < self.focus else None
        top = _window_start(height, side, rng, None if centre is None else centre[0])
        left = _window_start(width, side, rng, None if centre is None else centre[1])
        box = np.s_[top:top + side, left:left + side]
        image, mask = image[box], mask[box]
        if side == self.size:
            return image, mask
        size = (self.size, self.size)
        return (cv2.resize(image, size, interpolation=cv2.INTER_AREA),
                cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))

    def _window_side(self, largest: int, rng: np.random.Generator) -> int:
        high = min(largest, round(self.size * self.max_scale))
        return int(rng.integers(self.size, high + 1)) if high > self.size else self.size

    def _focus_pixel(self, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
        present = np.bincount(mask.ravel(), minlength=256)[:len(self.rarity)] > 0
        weights = np.where(present, self.rarity, 0.0)
        if weights.sum() <= 0:
            return None
        label = rng.choice(len(weights), p=weights / weights.sum())
        ys, xs = np.nonzero(mask == label)
        pick = rng.integers(len(ys))
        return int(ys[pick]), int(xs[pick])


def _window_start(length: int, size: int, rng: np.random.Generator, inside: int | None) -> int:
    """A random start of a window of `size` within [0, length), covering `inside` when given."""
    low, high = 0, length - size
    if inside is not None:
        low, high = max(low, inside - size + 1), min(high, inside)
    return int(rng.integers(low, high + 1))


def _flip() -> list:
    return [A.HorizontalFlip(p=0.5)]


def _strong() -> list:
    # Colour jitter first, so that it changes the photo only, not the black fill the affine brings in.
    return [
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.5),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Affine(scale=(0.75, 1.25), translate_percent=(-0.1, 0.1), rotate=(-30, 30), p=0.5, **OUTSIDE),
    ]


def _elastic() -> list:
    # alpha/sigma in pixels, tuned at 256x256: smooth displacements of about 3 px std (up to ~10 px at
    # the image border, where albumentations' replicate-border smoothing makes them larger).
    return [A.HorizontalFlip(p=0.5), A.ElasticTransform(alpha=500, sigma=10, p=0.5, **OUTSIDE)]


@dataclass(frozen=True)
class Policy:
    transforms: Callable[[], list]  # per-sample albumentations transforms (training only)
    mix: Mixer | None = None  # applied first, with a random partner sample (training only)


POLICIES: dict[str, Policy] = {
    "none": Policy(lambda: []),
    "flip": Policy(_flip),
    "strong": Policy(_strong),
    "elastic": Policy(_elastic),
    "cutmix": Policy(_flip, mix=cutmix),
    "copy_paste": Policy(_flip, mix=copy_paste),
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]


def build_transform(name: str, train: bool) -> A.Compose | None:
    """The policy's per-sample transforms (train only); None when there are none."""
    augment = get_policy(name).transforms() if train else []
    return A.Compose(augment) if augment else None


def build_mixer(name: str, train: bool) -> Mixer | None:
    """The policy's sample-mixing step, or None (always None for evaluation)."""
    return get_policy(name).mix if train else None
