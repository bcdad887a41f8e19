"""Tests of the synthetic sample dataset: COCO validity, layout, label/pixel agreement, determinism, caching."""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from data_pipeline.sample_data import (
    CATEGORIES,
    SAMPLE_VERSION,
    default_sample_root,
    ensure_sample_dataset,
    generate_sample_dataset,
)

# pycocotools' mask.decode trips a numpy 2 deprecation warning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = dict(n_train=12, n_val=4, n_test=4, width=128, height=96, seed=3)
JSON_FILES = ("train_all.json", "train.json", "val.json", "test.json", "test_gt.json")


def load_coco(path: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(path))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_sample_dataset(tmp_path_factory.mktemp("sample") / "ds", **SMALL)


@pytest.fixture(scope="module")
def cocos(root) -> dict[str, COCO]:
    return {name: load_coco(root / name) for name in JSON_FILES}


def read_rgb(root: Path, coco: COCO, image_id: int) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(root / coco.imgs[image_id]["file_name"])), cv2.COLOR_BGR2RGB)


def label_map(coco: COCO, image_id: int, largest_first: bool = True) -> np.ndarray:
    """Category ids painted the way the training pipeline does: largest area first."""
    info = coco.imgs[image_id]
    labels = np.zeros((info["height"], info["width"]), np.uint8)
    anns = sorted(coco.imgToAnns[image_id], key=lambda a: a["area"], reverse=largest_first)
    for ann in anns:
        labels[coco.annToMask(ann).astype(bool)] = ann["category_id"]
    return labels


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_all_files_are_coco_with_the_ten_categories(cocos):
    expected = [{"id": i + 1, "name": name} for i, name in enumerate(CATEGORIES)]
    assert len(CATEGORIES) == 10
    for coco in cocos.values():
        cats = [{"id": c["id"], "name": c["name"]} for c in coco.dataset["categories"]]
        assert cats == expected
        assert all(c["id"] != 0 for c in coco.dataset["categories"])  # 0 is background


def test_images_are_jpegs_of_declared_size_in_batch_folders(root, cocos):
    images = cocos["train_all.json"].dataset["images"] + cocos["test.json"].dataset["images"]
    assert len(images) == SMALL["n_train"] + SMALL["n_val"] + SMALL["n_test"]
    assert len({image["id"] for image in images}) == len(images)
    for image in images:
        assert re.fullmatch(r"batch_\d{2}/\d{4}\.jpg", image["file_name"])
        path = root / image["file_name"]
        assert path.read_bytes()[:3] == b"\xff\xd8\xff"
        pixels = cv2.imread(str(path))
        assert pixels.shape == (image["height"], image["width"], 3)
        assert (image["width"], image["height"]) == (SMALL["width"], SMALL["height"])


def test_batch_folders_hold_fifty_images(tmp_path):
    root = generate_sample_dataset(tmp_path / "ds", n_train=48, n_val=2, n_test=3, width=48, height=40)
    names = [image["file_name"] for image in json.loads((root / "train_all.json").read_text())["images"]]
    names += [image["file_name"] for image in json.loads((root / "test.json").read_text())["images"]]
    assert len(set(names)) == 53
    assert sum(name.startswith("batch_01/") for name in names) == 50
    assert sum(name.startswith("batch_02/") for name in names) == 3


def test_splits_partition_ids_and_test_has_no_annotations(cocos):
    ids = {name: set(coco.getImgIds()) for name, coco in cocos.items()}
    assert ids["train_all.json"] == ids["train.json"] | ids["val.json"]
    assert not ids["train.json"] & ids["val.json"]
    assert not ids["train_all.json"] & ids["test.json"]
    assert ids["test.json"] == ids["test_gt.json"]
    assert len(ids["train.json"]) == SMALL["n_train"] and len(ids["val.json"]) == SMALL["n_val"]
    assert cocos["test.json"].dataset["annotations"] == []
    assert cocos["test_gt.json"].dataset["annotations"]
    ann_ids = [a["id"] for name in ("train_all.json", "test_gt.json") for a in cocos[name].dataset["annotations"]]
    assert len(ann_ids) == len(set(ann_ids))


def test_every_class_appears_in_every_split(cocos):
    for name in ("train.json", "val.json", "test_gt.json"):
        present = {a["category_id"] for a in cocos[name].dataset["annotations"]}
        assert present == set(range(1, 11)), name


def test_objects_per_image(cocos):
    for name in ("train_all.json", "test_gt.json"):
        coco = cocos[name]
        counts = [len(coco.imgToAnns[i]) for i in coco.getImgIds()]
        assert min(counts) >= 2 and max(counts) <= 6


def test_segmentations_polygons_and_rle_with_matching_areas(cocos):
    kinds = set()
    for name in ("train_all.json", "test_gt.json"):
        coco = cocos[name]
        for ann in coco.dataset["annotations"]:
            info = coco.imgs[ann["image_id"]]
            seg = ann["segmentation"]
            if isinstance(seg, list):
                kinds.add("polygon")
                assert seg and all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in seg)
            else:
                kinds.add("rle")
                assert isinstance(seg["counts"], str)
                assert seg["size"] == [info["height"], info["width"]]
            assert ann["iscrowd"] == 0
            mask = coco.annToMask(ann).astype(bool)
            assert mask.shape == (info["height"], info["width"])
            assert mask.any()
            assert mask.sum() == ann["area"]
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert kinds == {"polygon", "rle"}


def test_areas_within_an_image_are_distinct(cocos):
    """Paint order is by area; ties would make it depend on annotation order."""
    coco = cocos["train_all.json"]
    for image_id in coco.getImgIds():
        areas = [a["area"] for a in coco.imgToAnns[image_id]]
        assert len(areas) == len(set(areas))


def test_classes_look_different_from_each_other(root, cocos):
    """Mean colour under each class of the painted label map differs across most class pairs."""
    sums, counts = np.zeros((11, 3)), np.zeros(11)
    for name in ("train_all.json", "test_gt.json"):
        coco = cocos[name]
        for image_id in coco.getImgIds():
            labels, pixels = label_map(coco, image_id), read_rgb(root, coco, image_id).astype(np.float64)
            for label in range(11):
                inside = labels == label
                sums[label] += pixels[inside].sum(axis=0)
                counts[label] += inside.sum()
    assert (counts > 0).all()
    means = sums / counts[:, None]
    pairs = list(itertools.combinations(range(1, 11), 2))
    distinct = sum(np.linalg.norm(means[a] - means[b]) > 15 for a, b in pairs)
    assert distinct >= 2 * len(pairs) // 3
    brightness = means.mean(axis=1)
    styrofoam, battery = CATEGORIES.index("Styrofoam") + 1, CATEGORIES.index("Battery") + 1
    assert brightness[styrofoam] > brightness[0] and brightness[styrofoam] > brightness[battery]


def test_painting_largest_first_matches_visible_edges(root, cocos):
    """Boundaries of the largest-first label map sit on image edges; the reverse order's extra ones do not.

    The reverse order shows the outlines of occluded larger objects across smaller ones that lie on
    top of them in the picture, where the image has no edge.
    """
    right, wrong = [], []
    for name in ("train_all.json", "test_gt.json"):
        coco = cocos[name]
        for image_id in coco.getImgIds():
            gray = cv2.cvtColor(read_rgb(root, coco, image_id), cv2.COLOR_RGB2GRAY).astype(np.float32)
            gradient = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
            edges_right = boundaries(label_map(coco, image_id, largest_first=True))
            edges_wrong = boundaries(label_map(coco, image_id, largest_first=False))
            right.append(gradient[edges_right & ~edges_wrong])
            wrong.append(gradient[edges_wrong & ~edges_right])
    right, wrong = np.concatenate(right), np.concatenate(wrong)
    assert len(right) > 50 and len(wrong) > 50  # there are occlusions at all
    assert right.mean() > 1.3 * wrong.mean()


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds more than one label."""
    kernel = np.ones((3, 3), np.uint8)
    return cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)


def test_same_seed_same_bytes_other_seed_differs(root, tmp_path):
    again = generate_sample_dataset(tmp_path / "again", **SMALL)
    assert all_files(again) == all_files(root)
    other = all_files(generate_sample_dataset(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1}))
    original = all_files(root)
    assert other.keys() == original.keys()
    assert other["train_all.json"] != original["train_all.json"]
    assert all(other[name] != original[name] for name in original if name.endswith(".jpg"))


def test_default_root_follows_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSEARCH_CACHE", str(tmp_path / "cache"))
    assert default_sample_root() == tmp_path / "cache" / f"sample-{SAMPLE_VERSION}"
    monkeypatch.delenv("SEGSEARCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_sample_root() == tmp_path / "home" / ".cache" / "segsearch" / f"sample-{SAMPLE_VERSION}"


def test_ensure_generates_once_and_leaves_no_temporaries(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSEARCH_CACHE", str(tmp_path))
    tiny = dict(n_train=2, n_val=1, n_test=1, width=64, height=48)
    root = ensure_sample_dataset(**tiny)
    assert root == default_sample_root()
    stamp = (root / "train_all.json").stat().st_mtime_ns
    assert ensure_sample_dataset(**tiny) == root
    assert ensure_sample_dataset(root, **tiny) == root
    assert (root / "train_all.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]


def test_generating_onto_an_existing_dataset_keeps_it(tmp_path):
    root = generate_sample_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=1, width=64, height=48)
    before = all_files(root)
    generate_sample_dataset(root, n_train=3, n_val=1, n_test=1, width=64, height=48, seed=7)
    assert all_files(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_sample_dataset(tmp_path / "ds", n_train=2, n_val=1, n_test=1, width=64, height=48)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["notes.txt"]
