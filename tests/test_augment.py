"""Augmentation policies: image and mask stay aligned, sample mixing, the evaluation path, seeding."""
import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_pipeline.augment import POLICIES, copy_paste
from data_pipeline.dataset import SegmentationDataset, Split

pytestmark = pytest.mark.filterwarnings("error")  # e.g. torch's warning on wrapping read-only arrays

DARK, BRIGHT = 10, 245
SIZE = 96


def _split(images, masks) -> Split:
    """A split over read-only arrays, as memory-mapped caches are: any write into them raises."""
    images, masks = np.array(images, np.uint8), np.array(masks, np.uint8)
    images.flags.writeable = masks.flags.writeable = False
    return Split(images, masks, tuple(f"{i}.jpg" for i in range(len(images))), ("Background", "A", "B"))


def _bright_discs(count=4, seed=0) -> Split:
    """Dark images, each with a bright disc labelled 1 and a dark strip labelled 255 (ignore)."""
    rng = np.random.default_rng(seed)
    images = np.full((count, SIZE, SIZE, 3), DARK, np.uint8)
    masks = np.zeros((count, SIZE, SIZE), np.uint8)
    for image, mask in zip(images, masks):
        centre, radius = tuple(int(c) for c in rng.integers(25, SIZE - 25, 2)), int(rng.integers(10, 22))
        cv2.circle(image, centre, radius, (BRIGHT,) * 3, -1)
        cv2.circle(mask, centre, radius, 1, -1)
        mask[:, :6] = 255
    return _split(images, masks)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return image.numpy()


def _interior(region: np.ndarray) -> np.ndarray:
    """region without a 2-pixel rim, where interpolated image borders may disagree with the mask."""
    return cv2.erode(region.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_image_and_mask_stay_aligned_and_labels_stay_valid(name):
    ds = SegmentationDataset(_bright_discs(), name, train=True)
    torch.manual_seed(0)
    saw_ignore = False
    for _ in range(10):
        for index in range(len(ds)):
            image, mask = ds[index]
            assert image.dtype == torch.uint8 and image.shape == (SIZE, SIZE, 3)
            assert mask.dtype == torch.uint8 and mask.shape == (SIZE, SIZE)
            mask = mask.numpy()
            assert set(np.unique(mask)) <= {0, 1, 255}
            saw_ignore |= bool((mask == 255).any())
            # Colour jitter changes both levels by the same monotone map, so split at their midpoint.
            gray = _to_uint8(image).mean(axis=2)
            bright = gray > (gray.min() + gray.max()) / 2
            assert bright[_interior(mask == 1)].all()
            assert not bright[_interior(mask != 1)].any()
    assert saw_ignore


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_areas_from_outside_the_image_are_black_and_ignored(name):
    images, masks = np.full((2, SIZE, SIZE, 3), BRIGHT), np.ones((2, SIZE, SIZE))
    ds = SegmentationDataset(_split(images, masks), name, train=True)
    torch.manual_seed(0)
    outside = 0
    for _ in range(20):
        image, mask = ds[0]
        image, mask = _to_uint8(image), mask.numpy()
        assert set(np.unique(mask)) <= {1, 255}
        assert (image[_interior(mask == 255)] == 0).all()
        assert (image[_interior(mask == 1)] > 100).all()
        outside += bool((mask == 255).any())
    assert outside > 0 if name in ("strong", "elastic") else outside == 0


def test_cutmix_pastes_a_box_of_the_partner_with_the_partners_labels():
    red, blue = np.array([200, 30, 30], np.uint8), np.array([30, 30, 200], np.uint8)
    images = [np.broadcast_to(red, (SIZE, SIZE, 3)), np.broadcast_to(blue, (SIZE, SIZE, 3))]
    ds = SegmentationDataset(_split(images, [np.full((SIZE, SIZE), 1), np.full((SIZE, SIZE), 2)]),
                             "cutmix", train=True)
    torch.manual_seed(0)
    mixed = 0
    for _ in range(20):
        image, mask = ds[0]
        image, mask = _to_uint8(image), mask.numpy()
        assert np.array_equal((image == red).all(axis=2), mask == 1)
        assert np.array_equal((image == blue).all(axis=2), mask == 2)
        pasted = mask == 2
        if pasted.any() and not pasted.all():
            mixed += 1
            ys, xs = np.nonzero(pasted)
            assert pasted[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # one box
    assert mixed >= 10  # the box covers a uniform fraction of the image, so mostly neither none nor all


def _partner_with_instances() -> tuple[np.ndarray, np.ndarray]:
    """A dark image with two green squares (label 1), a blue disc (label 2) and a grey ignore blob."""
    image = np.full((SIZE, SIZE, 3), DARK, np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for top_left, bottom_right in [((8, 8), (24, 24)), ((60, 10), (80, 30))]:
        cv2.rectangle(image, top_left, bottom_right, (0, 220, 0), -1)
        cv2.rectangle(mask, top_left, bottom_right, 1, -1)
    cv2.circle(image, (40, 65), 14, (0, 0, 220), -1)
    cv2.circle(mask, (40, 65), 14, 2, -1)
    cv2.circle(image, (80, 80), 6, (128, 128, 128), -1)
    cv2.circle(mask, (80, 80), 6, 255, -1)
    return image, mask


def test_copy_paste_pastes_partner_instances_with_their_labels_and_colours():
    partner_image, partner_mask = _partner_with_instances()
    plain = np.full((SIZE, SIZE, 3), 90, np.uint8)
    ds = SegmentationDataset(_split([plain, partner_image], [np.zeros((SIZE, SIZE)), partner_mask]),
                             "copy_paste", train=True)
    torch.manual_seed(0)
    labels_seen = set()
    for _ in range(30):
        image, mask = ds[0]  # the partner is always image 1
        image, mask = _to_uint8(image), mask.numpy()
        assert (mask > 0).any() and not (mask == 255).any()  # the ignore blob is not an instance
        assert (image[mask == 1] == (0, 220, 0)).all()
        assert (image[mask == 2] == (0, 0, 220)).all()
        assert (image[mask == 0] == 90).all()
        assert cv2.connectedComponents((mask > 0).astype(np.uint8))[0] - 1 <= 3
        labels_seen |= set(np.unique(mask).tolist())
    assert labels_seen == {0, 1, 2}


def test_copy_paste_moves_a_whole_instance_and_its_pixels_by_one_shift():
    partner_image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    partner_mask = np.zeros((SIZE, SIZE), np.uint8)
    partner_mask[30:60, 20:30] = partner_mask[50:60, 30:50] = 2  # an L shape
    image, mask = np.zeros((SIZE, SIZE, 3), np.uint8), np.zeros((SIZE, SIZE), np.uint8)
    rng = np.random.default_rng(0)
    shifts = set()
    for _ in range(10):
        out_image, out_mask = copy_paste(image, mask, partner_image, partner_mask, rng)
        ys, xs = np.nonzero(partner_mask)
        out_ys, out_xs = np.nonzero(out_mask)
        dy, dx = out_ys.min() - ys.min(), out_xs.min() - xs.min()
        assert np.array_equal(out_ys, ys + dy) and np.array_equal(out_xs, xs + dx)
        assert (out_mask[out_ys, out_xs] == 2).all()
        assert np.array_equal(out_image[out_ys, out_xs], partner_image[ys, xs])
        assert not out_image[out_mask == 0].any() and not image.any() and not mask.any()
        shifts.add((int(dy), int(dx)))
    assert len(shifts) > 1


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_evaluation_path_only_converts(name):
    split = _bright_discs(count=2)
    ds = SegmentationDataset(split, name, train=False)
    for index in range(len(split)):
        image, mask = ds[index]
        assert np.array_equal(_to_uint8(image), split.images[index])
        assert np.array_equal(mask.numpy(), split.masks[index])


def test_evaluation_path_without_masks_gives_background_masks():
    split = _bright_discs(count=2)
    ds = SegmentationDataset(Split(split.images, split.masks[:0], split.file_names, split.class_names),
                             "none", train=False)
    image, mask = ds[1]
    assert np.array_equal(_to_uint8(image), split.images[1]) and not mask.any()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_training_draws_follow_torch_manual_seed(name):
    def draws(seed):
        torch.manual_seed(seed)
        ds = SegmentationDataset(_bright_discs(), name, train=True)
        return [ds[i % len(ds)] for i in range(8)]

    first, again, other = draws(1), draws(1), draws(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    if name != "none":
        assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_dataloader_workers_draw_differently_and_reproducibly():
    disc = _bright_discs(count=1)
    same = _split(np.repeat(disc.images, 8, axis=0), np.repeat(disc.masks, 8, axis=0))
    ds = SegmentationDataset(same, "strong", train=True)

    def batches():
        loader = DataLoader(ds, batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(0))
        return [images for images, _ in loader]

    first, again = batches(), batches()
    assert not torch.equal(first[0], first[1])  # the two workers do not repeat each other's draws
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- training crops (augment.Crop): patches for training, whole images for evaluation ---

def _pixel_coordinates(count=2, size=SIZE) -> Split:
    """Images whose pixels hold their own coordinates (y in red, x in green), so a crop says where it
    came from; masks label one small square 2 (rare) in a field of 1."""
    ys, xs = np.mgrid[:size, :size]
    image = np.stack([ys, xs, np.zeros_like(ys)], axis=-1).astype(np.uint8)
    mask = np.ones((size, size), np.uint8)
    mask[80:84, 4:8] = 2
    return _split([image] * count, [mask] * count)


@pytest.mark.parametrize("policy", ["none", "flip", "cutmix"])
def test_a_crop_is_a_window_of_the_sample_with_its_labels(policy):
    from data_pipeline.augment import Crop

    split = _pixel_coordinates()
    ds = SegmentationDataset(split, policy, train=True, crop=Crop(32))
    torch.manual_seed(0)
    tops = set()
    for _ in range(20):
        image, mask = ds[0]
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        ys = image[..., 0].numpy().astype(int)
        top, left = ys.min(), int(image[..., 1].numpy().min())
        assert np.array_equal(ys, top + np.arange(32)[:, None].repeat(32, 1))  # one contiguous window
        truth = split.masks[0][top:top + 32, left:left + 32]
        if policy == "none":
            assert np.array_equal(mask.numpy(), truth)
        tops.add(top)
    assert len(tops) > 5  # crops move around
    whole = SegmentationDataset(split, policy, train=False, crop=Crop(32))
    assert whole[0][0].shape == (SIZE, SIZE, 3)  # evaluation sees the whole image


def test_focused_crops_find_the_rare_class_and_uniform_ones_rarely_do():
    from data_pipeline.augment import Crop
    from data_pipeline.imbalance import class_rarity

    split = _pixel_coordinates()
    rarity = class_rarity(split.masks, 3)
    assert rarity[0] == 0 and rarity[1] > 0 and rarity[2] > 0
    rng = np.random.default_rng(0)
    focused = Crop(32, focus=1.0, rarity=np.array([0.0, 0.0, 1.0]))
    assert all((focused(split.images[0], split.masks[0], rng)[1] == 2).any() for _ in range(50))
    uniform = Crop(32)
    hits = sum((uniform(split.images[0], split.masks[0], rng)[1] == 2).any() for _ in range(200))
    assert hits < 100
    no_rare = np.ones((SIZE, SIZE), np.uint8)
    assert focused(split.images[0], no_rare, rng)[1].shape == (32, 32)  # falls back to a uniform crop
    with pytest.raises(ValueError, match="crop 128 is larger than the 96x96 image"):
        Crop(128)(split.images[0], split.masks[0], rng)


def test_scaled_crops_zoom_out_to_windows_up_to_max_scale_times_the_crop():
    from data_pipeline.augment import Crop

    split = _pixel_coordinates()
    rng = np.random.default_rng(0)
    spans = []
    for _ in range(100):
        image, mask = Crop(32, max_scale=2.0)(split.images[0], split.masks[0], rng)
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        ys = image[..., 0].astype(int)
        spans.append(ys.max() - ys.min() + 1)  # the window's side, read back from the coordinates
        assert set(np.unique(mask)) <= {1, 2}  # nearest neighbour: no label is invented
    assert min(spans) == 32 and 56 <= max(spans) <= 64  # plain crops up to windows of 64 px
    assert all(Crop(32)(split.images[0], split.masks[0], rng)[0].shape == (32, 32, 3) for _ in range(5))
