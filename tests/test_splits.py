import numpy as np
import pytest

from data_pipeline import splits
from data_pipeline.splits import fold_assignment, image_classes_from_masks, kfold_indices
from labels import IGNORE

def _crafted_images():
    """120 images: classes 1 (rare) .. 5 (in most images) co-occurring at random, some background only."""
    rng = np.random.default_rng(7)
    shares = {1: 0.05, 2: 0.1, 3: 0.4, 4: 0.25, 5: 0.6}
    return [frozenset(c for c, p in shares.items() if rng.random() < p) for _ in range(120)]


def _label_counts(images, assignment, folds):
    """{label: images per fold}, label 0 standing for background-only images."""
    labels = sorted({c for image in images for c in image}) + [0]
    return {label: np.bincount(assignment[[(label in image) if label else not image for image in images]],
                               minlength=folds)
            for label in labels}


def test_same_seed_gives_the_same_folds_and_another_seed_other_folds():
    images = _crafted_images()
    first = fold_assignment(images, 5, seed=3)
    assert np.array_equal(first, fold_assignment(images, 5, seed=3))
    assert not np.array_equal(first, fold_assignment(images, 5, seed=4))


@pytest.mark.parametrize("folds", [2, 3, 5, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_label_and_background_only_images_are_spread_within_one_of_the_ideal(folds, seed):
    images = _crafted_images()
    assignment = fold_assignment(images, folds, seed)
    for label, counts in _label_counts(images, assignment, folds).items():
        ideal = counts.sum() / folds
        assert np.abs(counts - ideal).max() < 1, (label, counts)
    sizes = np.bincount(assignment, minlength=folds)
    assert sizes.max() - sizes.min() <= 1


def test_rarest_class_lands_once_in_each_fold():
    images = [frozenset({1, 2})] * 2 + [frozenset({1})] * 3 + [frozenset({2})] * 10 + [frozenset()] * 5
    for seed in range(5):
        counts = _label_counts(images, fold_assignment(images, 5, seed), 5)
        assert counts[1].tolist() == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("folds", [2, 5])
def test_kfold_indices_are_sorted_disjoint_and_cover_every_image(folds):
    images = _crafted_images()
    all_val = []
    for fold in range(folds):
        train, val = kfold_indices(images, folds, fold, seed=0)
        assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
        assert not set(train) & set(val)
        assert sorted({*train, *val}) == list(range(len(images)))
        all_val.extend(val)
    assert sorted(all_val) == list(range(len(images)))  # every image is validated exactly once


@pytest.mark.parametrize("folds, fold, message", [
    (1, 0, "folds must be at least 2"),
    (9, 0, r"folds \(9\) cannot exceed the number of images \(8\)"),
    (4, 4, r"fold must be in 0..3, got 4"),
    (4, -1, r"fold must be in 0..3, got -1"),
])
def test_bad_folds_or_fold_are_rejected(folds, fold, message):
    images = [frozenset({1})] * 8
    with pytest.raises(ValueError, match=message):
        kfold_indices(images, folds, fold, seed=0)


def test_image_classes_from_masks_skip_background_and_ignore(tmp_path, monkeypatch):
    masks = np.zeros((3, 4, 5), np.uint8)
    masks[0, 1, 2] = 3
    masks[0, 3, :] = IGNORE
    masks[1, 0, 0] = 1
    masks[1, 2, 2] = 4
    masks[2, :, :] = IGNORE
    expected = [frozenset({3}), frozenset({1, 4}), frozenset()]
    assert image_classes_from_masks(masks) == expected

    path = tmp_path / "masks.u8"
    masks.tofile(path)
    read_only = np.memmap(path, np.uint8, mode="r", shape=masks.shape)
    monkeypatch.setattr(splits, "_CHUNK_PIXELS", 25)  # one image per chunk
    assert image_classes_from_masks(read_only) == expected
