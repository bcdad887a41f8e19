"""DataSpec: the data a trial trains and validates on, rebuilt identically from its config."""
import json
import shutil

import numpy as np
import pytest

from data_pipeline.classes import ClassMap
from data_pipeline.coco import CocoSegmentation
from data_pipeline.trial_data import DataSpec, image_classes


@pytest.fixture
def root(sample_root, tmp_path):
    """The sample dataset plus a train_all.json holding train and val together."""
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    train, val = (json.loads((root / f).read_text()) for f in ("train.json", "val.json"))
    merged = {**train, "images": train["images"] + val["images"], "annotations": train["annotations"] + val["annotations"]}
    (root / "train_all.json").write_text(json.dumps(merged))
    return root


def test_the_config_round_trip_keeps_every_setting(root):
    spec = DataSpec(str(root), split="kfold", folds=4, fold=2, split_seed=3,
                    class_map=ClassMap(unknown_policy="ignore").to_dict(), skip=("a.jpg",))
    config = spec.to_config()
    assert config["data_root"] == str(root) and config["skip_images"] == ["a.jpg"]
    assert DataSpec.from_config(json.loads(json.dumps(config))) == spec  # survives Tune's JSON round trip
    assert DataSpec.from_config(config, root="/elsewhere").root == "/elsewhere"


def test_given_split_reads_the_train_and_val_files(root):
    train, val = DataSpec(str(root)).train_val(64)
    assert train.file_names == tuple(CocoSegmentation(root, "train.json").file_name(i)
                                     for i in CocoSegmentation(root, "train.json").image_ids)
    assert len(val) == len(CocoSegmentation(root, "val.json").image_ids)


def test_k_fold_splits_train_all_into_disjoint_folds_that_cover_it(root):
    everything = set(DataSpec(str(root)).load("train_all.json", 64).file_names)
    vals = []
    for fold in range(4):
        train, val = DataSpec(str(root), split="kfold", folds=4, fold=fold).train_val(64)
        assert not set(train.file_names) & set(val.file_names)
        assert set(train.file_names) | set(val.file_names) == everything
        assert DataSpec(str(root), split="kfold", folds=4, fold=fold).val_split(64).file_names == val.file_names
        vals.append(set(val.file_names))
    assert set().union(*vals) == everything and sum(map(len, vals)) == len(everything)


def test_folds_are_the_same_at_every_resize_and_follow_the_seed(root):
    spec = DataSpec(str(root), split="kfold", folds=3, fold=1)
    assert spec.val_split(32).file_names == spec.val_split(96).file_names
    other = DataSpec(str(root), split="kfold", folds=3, fold=1, split_seed=1)
    assert other.val_split(32).file_names != spec.val_split(32).file_names


def test_folds_are_stratified_on_the_classes_of_each_image(root):
    coco = CocoSegmentation(root, "train_all.json")
    classes = image_classes(coco)
    folds = 4
    counts = []
    for fold in range(folds):
        _, val_idx = DataSpec(str(root), split="kfold", folds=folds, fold=fold).fold_indices()
        counts.append([sum(c in classes[i] for i in val_idx) for c in range(1, coco.num_classes)])
    counts = np.array(counts)
    ideal = counts.sum(0) / folds
    assert np.all(np.abs(counts - ideal) <= 1.0), counts


def test_skipped_images_are_left_out_of_training_and_validation(root):
    names = DataSpec(str(root)).load("val.json", 64).file_names
    train, val = DataSpec(str(root), skip=(names[0],)).train_val(64)
    assert val.file_names == names[1:]


def test_the_class_map_reaches_the_label_maps(root):
    categories = json.loads((root / "train.json").read_text())["categories"]
    first = min(categories, key=lambda c: c["id"])["name"]
    dropped = ClassMap(map={first: None}).to_dict()
    plain, _ = DataSpec(str(root)).train_val(64)
    mapped, _ = DataSpec(str(root), class_map=dropped).train_val(64)
    assert first not in mapped.class_names and len(mapped.class_names) == len(plain.class_names) - 1
    assert np.array_equal(plain.masks == 1, mapped.masks == 255)  # label 1 is now ignored
