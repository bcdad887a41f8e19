"""Deterministic multi-label stratified k-fold over the images of a split.

Images are stratified by which classes they contain (an image with classes {2, 5} counts for both)
in two steps:
1. iterative stratification (Sechidis, Tsoumakas & Vlahavas, 2011): the rarest label still to place
   is handled first, each of its images going to the fold that still needs that label most, with
   fold sizes capped so that they end within one of each other;
2. a local search swapping images between folds while that brings per-fold label counts closer to
   their shares (step 1 leaves the most common labels, placed last, the least freedom).
Background-only images carry a pseudo-label of their own, so they are spread evenly as well.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from labels import BACKGROUND, IGNORE

_NO_CLASS = -1  # pseudo-label of background-only images
_CHUNK_PIXELS = 1 << 22  # bincount copies its input as int64: ~32 MiB per chunk


def image_classes_from_masks(masks: np.ndarray) -> list[frozenset[int]]:
    """The classes present in each label map of masks (uint8 [N, H, W]), without 0 and 255.

    Reads masks chunk by chunk (a memmap is never loaded whole) and never writes to it.
    """
    presence = _label_presence(masks)
    presence[:, [BACKGROUND, IGNORE]] = False
    return [frozenset(np.flatnonzero(row).tolist()) for row in presence]


def _label_presence(masks: np.ndarray) -> np.ndarray:
    """bool [N, 256]: whether label value v occurs in image i."""
    masks = np.asarray(masks)
    presence = np.zeros((len(masks), 256), bool)
    for start, chunk in iter_chunks(masks):
        # Offsetting each image's labels by 256 * (its row) counts all images of the chunk in one bincount.
        rows = np.arange(len(chunk), dtype=np.int64)[:, None] * 256
        counts = np.bincount((chunk.reshape(len(chunk), -1) + rows).ravel(), minlength=256 * len(chunk))
        presence[start:start + len(chunk)] = counts.reshape(len(chunk), 256) > 0
    return presence


def iter_chunks(masks: np.ndarray):
    """(first index, masks[first:first + n]) over masks (uint8 [N, H, W]), about _CHUNK_PIXELS pixels a chunk."""
    if masks.ndim != 3 or masks.dtype != np.uint8:
        raise ValueError(f"masks must be uint8 [N, H, W], got {masks.dtype} {masks.shape}")
    per_image = max(1, int(np.prod(masks.shape[1:])))
    step = max(1, _CHUNK_PIXELS // per_image)
    for start in range(0, len(masks), step):
        yield start, masks[start:start + step]


def fold_assignment(image_classes: Sequence[Iterable[int]], folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each image, stratified by the classes it contains.

    Fold sizes differ by at most one. Deterministic for given inputs and seed (ties are broken by a
    numpy RNG seeded with seed, never by set or hash order); a different seed gives a different
    assignment.
    """
    labels = [_sorted_labels(classes) for classes in image_classes]
    _check_folds(folds, len(labels))
    membership = _membership_matrix(labels)
    assignment = _iterative_stratification(membership, folds, np.random.default_rng(seed))
    return _refine_by_swaps(assignment, membership, folds)


def kfold_indices(image_classes: Sequence[Iterable[int]], folds: int, fold: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of fold `fold` of a stratified `folds`-fold split; both sorted."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    assignment = fold_assignment(image_classes, folds, seed)
    return np.flatnonzero(assignment != fold), np.flatnonzero(assignment == fold)


def _iterative_stratification(membership: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    # Demand: how many more images with each label each fold needs to reach its share.
    demand = np.tile(membership.sum(0) / folds, (folds, 1))
    sizes = np.zeros(folds, np.int64)
    assignment = np.full(len(membership), -1, np.int64)
    order = rng.permutation(len(membership))
    while (assignment < 0).any():
        label = _rarest_remaining_label(membership, assignment)
        for image in order[(assignment[order] < 0) & membership[order, label]]:
            open_folds = _open_folds(sizes, len(membership))
            fold = _neediest_fold(demand, label, membership[image], sizes, open_folds, rng)
            assignment[image] = fold
            demand[fold] -= membership[image]
            sizes[fold] += 1
    return assignment


def _refine_by_swaps(assignment: np.ndarray, membership: np.ndarray, folds: int) -> np.ndarray:
    """Swaps pairs of images between folds while a swap lowers the sum over folds and labels of
    (count - share)^2; fold sizes are unchanged.

    The greedy pass places the most common labels last, when the size limits leave it little
    choice; this local search evens them out. Swapping image i (fold a) with j (fold b) changes that
    sum by 2 d.(C_a - C_b) + 2 |d|^2 with d = labels_j - labels_i and C the per-fold label counts:
    an integer, so each accepted swap lowers it by at least 1 and the search ends.
    """
    labels = membership.astype(np.int64)
    counts = np.stack([labels[assignment == f].sum(0) for f in range(folds)])
    improved = True
    while improved:
        improved = False
        for i in range(len(labels)):
            a = assignment[i]
            d = labels - labels[i]
            change = 2 * (d * (counts[a] - counts[assignment])).sum(1) + 2 * (d * d).sum(1)
            change[assignment == a] = 0
            j = int(np.argmin(change))
            if change[j] < 0:
                b = assignment[j]
                counts[a] += d[j]
                counts[b] -= d[j]
                assignment[i], assignment[j] = b, a
                improved = True
    return assignment


def _check_folds(folds: int, num_images: int) -> None:
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if folds > num_images:
        raise ValueError(f"folds ({folds}) cannot exceed the number of images ({num_images})")


def _sorted_labels(classes: Iterable[int]) -> tuple[int, ...]:
    labels = sorted({int(c) for c in classes} - {BACKGROUND, IGNORE})
    return tuple(labels) or (_NO_CLASS,)


def _membership_matrix(labels: list[tuple[int, ...]]) -> np.ndarray:
    """bool [N, L]: image i has the j-th label (labels sorted, so columns do not depend on input order)."""
    label_ids = sorted({label for image in labels for label in image})
    column = {label: j for j, label in enumerate(label_ids)}
    membership = np.zeros((len(labels), len(label_ids)), bool)
    for i, image in enumerate(labels):
        membership[i, [column[label] for label in image]] = True
    return membership


def _rarest_remaining_label(membership: np.ndarray, assignment: np.ndarray) -> int:
    remaining = membership[assignment < 0].sum(0)
    return int(np.argmin(np.where(remaining > 0, remaining, np.iinfo(np.int64).max)))


def _open_folds(sizes: np.ndarray, total: int) -> np.ndarray:
    """bool [folds]: folds that can take another image so that all end with floor or ceil(total / folds) images."""
    small, extra = divmod(total, len(sizes))
    return (sizes < small) | ((sizes == small) & ((sizes > small).sum() < extra))


def _neediest_fold(demand: np.ndarray, label: int, image_labels: np.ndarray, sizes: np.ndarray,
                   open_folds: np.ndarray, rng: np.random.Generator) -> int:
    """The open fold that needs `label` most.

    Ties go to the fold needing the image's other labels most (Sechidis' rule looks at one label
    only, which lets labels that co-occur with rarer ones drift), then to the smaller fold, then
    to chance.
    """
    candidates = np.flatnonzero(open_folds)
    for score in (demand[:, label], demand[:, image_labels].sum(1), -sizes):
        candidates = candidates[score[candidates] == score[candidates].max()]
    return int(candidates[0] if len(candidates) == 1 else rng.choice(candidates))
