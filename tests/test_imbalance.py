import math

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from data_pipeline import splits
from data_pipeline.imbalance import (CLASS_WEIGHT_MODES, SAMPLERS, build_sampler, class_pixel_frequencies,
                                     class_weights, rare_class_sample_weights)
from data_pipeline.splits import image_classes_from_masks
from labels import IGNORE

I = IGNORE


def _hand_masks():
    """13 non-ignored pixels: 10 background, 2 of class 1, 1 of class 2 (class 3 absent)."""
    return np.array([
        [[0, 0, 1, 1],
         [0, 0, I, I]],
        [[2, 0, 0, 0],
         [0, 0, 0, I]],
    ], np.uint8)


def test_pixel_frequencies_count_only_non_ignored_pixels():
    frequencies = class_pixel_frequencies(_hand_masks(), num_classes=4)
    assert np.allclose(frequencies, [10 / 13, 2 / 13, 1 / 13, 0])


def test_pixel_frequencies_read_a_read_only_memmap_in_chunks(tmp_path, monkeypatch):
    masks = np.random.default_rng(0).integers(0, 5, (7, 6, 6), dtype=np.uint8)
    masks[2, :3] = I
    path = tmp_path / "masks.u8"
    masks.tofile(path)
    read_only = np.memmap(path, np.uint8, mode="r", shape=masks.shape)
    monkeypatch.setattr(splits, "_CHUNK_PIXELS", 72)  # two images per chunk
    frequencies = class_pixel_frequencies(read_only, num_classes=5)
    valid = masks[masks != I]
    assert np.allclose(frequencies, [np.mean(valid == c) for c in range(5)])


def test_pixel_frequencies_reject_labels_beyond_num_classes():
    with pytest.raises(ValueError, match=r"labels \[2\] outside 0..1 and 255"):
        class_pixel_frequencies(_hand_masks(), num_classes=2)


def test_class_weights_by_hand():
    frequencies = np.array([10, 2, 1, 0]) / 13
    assert CLASS_WEIGHT_MODES == ("none", "inverse", "sqrt_inverse")
    assert class_weights(frequencies, "none").tolist() == [1, 1, 1, 1]
    # inverse: 13/10, 13/2, 13/1, whose frequency-weighted mean is 3 (one per present class)
    assert np.allclose(class_weights(frequencies, "inverse"), [13 / 30, 13 / 6, 13 / 3, 13 / 3])
    # sqrt_inverse: sqrt(13/n) for n = 10, 2, 1, whose frequency-weighted mean is (sqrt(10) + sqrt(2) + 1) / sqrt(13)
    scale = 13 / (math.sqrt(10) + math.sqrt(2) + 1)
    expected = [scale / math.sqrt(10), scale / math.sqrt(2), scale, scale]
    assert np.allclose(class_weights(frequencies, "sqrt_inverse"), expected)
    assert class_weights(frequencies, "inverse").dtype == np.float32


@pytest.mark.parametrize("mode", CLASS_WEIGHT_MODES)
def test_class_weights_keep_the_pixel_weighted_mean_at_one(mode):
    frequencies = np.random.default_rng(1).dirichlet(np.ones(6))
    weights = class_weights(frequencies, mode)
    assert np.isclose((frequencies * weights).sum(), 1.0, atol=1e-6)
    assert np.all(weights > 0)


def test_unknown_class_weight_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown class weight mode 'log'"):
        class_weights(np.array([0.5, 0.5]), "log")


def _rare_masks():
    """20 images of 4x4: class 1 in 16, class 2 in 6 (5 with class 1), class 3 in 1, 2 background-only."""
    masks = np.zeros((20, 4, 4), np.uint8)
    masks[:16, 0, 0] = 1
    masks[11:17, 1, 1] = 2
    masks[17, 2, 2] = 3
    masks[17, 3, 3] = I
    return masks


def test_rare_sample_weights_follow_the_rarest_class_of_each_image():
    weights = rare_class_sample_weights(_rare_masks(), num_classes=4)
    only_1, with_2, with_3 = 1 / math.sqrt(16 / 20), 1 / math.sqrt(6 / 20), 1 / math.sqrt(1 / 20)
    expected = [only_1] * 11 + [with_2] * 6 + [with_3] + [only_1] * 2  # background-only: the minimum
    assert np.allclose(weights, expected)
    assert np.argmax(weights) == 17


def test_rare_sample_weights_accept_image_classes():
    masks = _rare_masks()
    assert np.array_equal(rare_class_sample_weights(image_classes_from_masks(masks), 4),
                          rare_class_sample_weights(masks, 4))
    with pytest.raises(ValueError, match=r"image 0 has classes \[4\] outside 1..3"):
        rare_class_sample_weights([{4}], 4)


def test_rare_sampler_draws_rare_images_more_often_than_uniform():
    assert SAMPLERS == ("uniform", "rare")
    masks = _rare_masks()
    sampler = build_sampler("rare", masks, num_classes=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampler, WeightedRandomSampler) and len(sampler) == 20
    draws = np.concatenate([list(sampler) for _ in range(500)])  # 10,000 draws
    counts = np.bincount(draws, minlength=20)
    weights = rare_class_sample_weights(masks, 4)
    # The class-3 image: 1 in 20 draws uniformly, weights[17] / sum(weights) (about 1 in 7) here.
    assert counts[17] > 2 * len(draws) / 20
    assert np.isclose(counts[17] / len(draws), weights[17] / weights.sum(), rtol=0.1)
    assert counts[17] > counts[11:17].mean() > counts[:11].mean()


def test_uniform_sampler_is_none_and_unknown_names_are_rejected():
    assert build_sampler("uniform", _rare_masks(), 4, None) is None
    with pytest.raises(ValueError, match="unknown sampler 'balanced'"):
        build_sampler("balanced", _rare_masks(), 4, None)
