"""COCO reading, rasterisation order, RLE, path safety, resized splits and the submission format."""
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_pipeline.coco import CocoSegmentation
from data_pipeline.cache import load_split
from data_pipeline.dataset import SegmentationDataset
from data_pipeline.submission import read_submission, write_submission
from errors import UserError


def _dataset(tmp_path, annotations, file_name="img/a.jpg", categories=None):
    (tmp_path / "img").mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / "img" / "a.jpg"), np.full((40, 60, 3), 120, np.uint8))
    coco = {"images": [{"id": 7, "file_name": file_name, "width": 60, "height": 40}],
            "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "Paper"}, {"id": 1, "name": "Metal"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return CocoSegmentation(tmp_path, "ann.json")


def _square(ann_id, cat, x0, y0, x1, y1):
    return {"id": ann_id, "image_id": 7, "category_id": cat, "iscrowd": 0, "area": (x1 - x0) * (y1 - y0),
            "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


def test_classes_are_background_then_categories_in_id_order(tmp_path):
    coco = _dataset(tmp_path, [])
    assert coco.class_names == ["Background", "Metal", "Paper"]


def test_small_objects_stay_visible_over_large_ones_whatever_the_file_order(tmp_path):
    small = _square(1, 1, 20, 10, 30, 20)  # Metal -> label 1
    large = _square(2, 3, 0, 0, 50, 30)  # Paper -> label 2, listed after the small one
    labels = _dataset(tmp_path, [small, large]).label_map(7)
    assert labels.shape == (40, 60)
    assert labels[15, 25] == 1 and labels[5, 5] == 2 and labels[35, 55] == 0


def test_rle_annotations_are_rasterised(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 40:55] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    ann = {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": int(mask.sum()),
           "bbox": [40, 5, 15, 10], "segmentation": {"size": [40, 60], "counts": rle["counts"].decode()}}
    labels = _dataset(tmp_path, [ann]).label_map(7)
    assert np.array_equal(labels == 2, mask.astype(bool))


def test_image_paths_cannot_escape_the_dataset_root(tmp_path):
    coco = _dataset(tmp_path, [], file_name="../../etc/passwd")
    with pytest.raises(UserError, match="leaves the dataset root .* through"):
        coco.read_image(7)


def test_bad_inputs_are_user_errors_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="data root .* does not exist"):
        CocoSegmentation(tmp_path / "missing", "ann.json")
    with pytest.raises(UserError, match="annotation file .*nope.json does not exist"):
        CocoSegmentation(tmp_path, "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json is not valid JSON"):
        CocoSegmentation(tmp_path, "broken.json")
    coco = _dataset(tmp_path, [], file_name="img/missing.jpg")
    with pytest.raises(UserError, match="cannot read image .*missing.jpg"):
        coco.read_image(7)


def test_sample_split_loads_resized_with_matching_masks(sample_root):
    split = load_split(sample_root, "train.json", 64)
    coco = CocoSegmentation(sample_root, "train.json")
    assert split.images.shape == (len(coco.image_ids), 64, 64, 3) and split.images.dtype == np.uint8
    assert split.masks.shape == (len(coco.image_ids), 64, 64)
    assert split.masks.max() < coco.num_classes and len(np.unique(split.masks)) > 3
    assert split.file_names == tuple(coco.file_name(i) for i in coco.image_ids)
    assert load_split(sample_root, "train.json", 64) is split  # decoded once per process


def test_dataset_applies_flip_policy_to_image_and_mask_together(sample_root):
    split = load_split(sample_root, "val.json", 64)
    ds = SegmentationDataset(split, "flip", train=True)
    flipped = plain = 0
    for _ in range(20):
        image, mask = ds[0]
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        if np.array_equal(mask.numpy(), split.masks[0][:, ::-1]) and not np.array_equal(mask.numpy(), split.masks[0]):
            flipped += 1
        elif np.array_equal(mask.numpy(), split.masks[0]):
            plain += 1
    assert flipped and plain and flipped + plain == 20


def test_submission_round_trip_is_row_major_and_atomic(tmp_path):
    rng = np.random.default_rng(0)
    maps = [("batch_01/0000.jpg", rng.integers(0, 11, (256, 256), dtype=np.uint8)),
            ("batch_01/0001.jpg", rng.integers(0, 11, (256, 256), dtype=np.uint8))]
    path = tmp_path / "sub" / "submission.csv"
    assert write_submission(path, maps) == 2
    rows = read_submission(path)
    assert [name for name, _ in rows] == ["batch_01/0000.jpg", "batch_01/0001.jpg"]
    assert all(np.array_equal(flat, labels.ravel()) for (_, flat), (_, labels) in zip(rows, maps))
    assert [p.name for p in path.parent.iterdir()] == ["submission.csv"]


def test_failed_submission_write_leaves_no_partial_file(tmp_path):
    def rows():
        yield "a.jpg", np.zeros((2, 2), np.uint8)
        raise RuntimeError("model crashed")

    path = tmp_path / "submission.csv"
    with pytest.raises(RuntimeError):
        write_submission(path, rows())
    assert list(tmp_path.iterdir()) == []


def test_label_formatting_matches_python_str_for_every_label_value():
    from data_pipeline.submission import format_labels

    labels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert format_labels(labels).decode() == " ".join(str(x) for x in labels.ravel())
    assert format_labels(labels.astype(np.int64)) == format_labels(labels)
    with pytest.raises(ValueError, match="0..255"):
        format_labels(np.array([3, 256]))
