"""Pseudo-labels: confident test predictions written as COCO, read back as extra training data."""
import json
import shutil

import cv2
import numpy as np
import pytest

from labels import IGNORE
from data_pipeline.coco import CocoSegmentation
from data_pipeline.pseudo_labels import UNCERTAIN, pseudo_class_map, write_pseudo_labels
from data_pipeline.trial_data import DataSpec


@pytest.fixture
def root(sample_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    return root


def _predictions(test: CocoSegmentation, num_classes: int, size: int = 32):
    """A label map and a confidence mask per test image: stripes of every class, the right quarter unsure."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in test.image_ids:
        labels = np.repeat(rng.integers(0, num_classes, (size, 1), dtype=np.uint8), size, axis=1)
        confident = np.ones((size, size), dtype=bool)
        confident[:, 3 * size // 4:] = False
        rows.append((labels, confident))
    return rows


def test_confident_pixels_keep_their_class_at_image_size_and_the_rest_is_ignored(root):
    test = CocoSegmentation(root, "test.json")
    class_names = CocoSegmentation(root, "train.json").class_names
    images = [test.coco.imgs[i] for i in test.image_ids]
    rows = _predictions(test, len(class_names))
    counts = write_pseudo_labels(root / "pseudo.json", images, rows, class_names)
    assert counts["images"] == len(images) and counts["confident_share"] == 0.75

    raw = json.loads((root / "pseudo.json").read_text())
    assert [c["name"] for c in raw["categories"]] == class_names[1:] + [UNCERTAIN]
    back = CocoSegmentation(root, "pseudo.json", class_map=pseudo_class_map(class_names))
    assert back.class_names == class_names  # the search's classes; Uncertain is not one of them
    for image_id, (labels, confident) in zip(back.image_ids, rows):
        info = back.coco.imgs[image_id]
        expected = cv2.resize(np.where(confident, labels, IGNORE).astype(np.uint8), (info["width"], info["height"]),
                              interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(back.label_map(image_id), expected)


def test_a_search_with_pseudo_labels_trains_on_them_and_validates_as_before(root):
    test = CocoSegmentation(root, "test.json")
    class_names = CocoSegmentation(root, "train.json").class_names
    write_pseudo_labels(root / "pseudo.json", [test.coco.imgs[i] for i in test.image_ids],
                        _predictions(test, len(class_names)), class_names)
    plain_train, plain_val = DataSpec(str(root)).train_val(64)
    spec = DataSpec(str(root), pseudo_labels=("pseudo.json",))
    train, val = spec.train_val(64)
    assert len(train) == len(plain_train) + len(test.image_ids)
    assert train.file_names[len(plain_train):] == tuple(test.file_name(i) for i in test.image_ids)
    assert (train.masks[len(plain_train):, :, -8:] == IGNORE).all()  # the unsure quarter
    assert val.file_names == plain_val.file_names
    assert spec.val_fingerprint() == DataSpec(str(root)).val_fingerprint()  # same val set, same cached probabilities
    assert DataSpec.from_config(json.loads(json.dumps(spec.to_config()))) == spec


def test_a_pseudo_label_file_with_other_classes_is_refused(root):
    test = CocoSegmentation(root, "test.json")
    class_names = CocoSegmentation(root, "train.json").class_names
    images = [test.coco.imgs[i] for i in test.image_ids]
    renamed = ["Background", "Not a class"] + class_names[2:]
    write_pseudo_labels(root / "pseudo.json", images, _predictions(test, len(class_names)), renamed)
    with pytest.raises(Exception, match="Not a class"):
        DataSpec(str(root), pseudo_labels=("pseudo.json",)).train_val(64)
