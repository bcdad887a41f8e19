"""The node-local decoded-split cache: built once, memory-mapped, keyed on content, safe to build concurrently."""
import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest

from data_pipeline import cache
from data_pipeline.coco import CocoSegmentation
from errors import UserError


@pytest.fixture
def data(sample_root, tmp_path, monkeypatch):
    """A private copy of the sample dataset and an empty cache folder."""
    monkeypatch.setenv("SEGSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_opened", {})
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    return root


def _entries():
    return sorted(p.name for p in cache.cache_dir().iterdir() if p.is_dir())


def test_split_matches_the_annotations_and_is_memory_mapped_read_only(data):
    split = cache.load_split(data, "val.json", 64)
    coco = CocoSegmentation(data, "val.json")
    assert split.images.shape == (len(coco.image_ids), 64, 64, 3) and split.masks.shape == (len(coco.image_ids), 64, 64)
    assert isinstance(split.images, np.memmap) and not split.images.flags.writeable
    assert split.file_names == tuple(coco.file_name(i) for i in coco.image_ids)
    assert split.class_names == tuple(coco.class_names)
    labels = coco.label_map(coco.image_ids[0])
    present = set(np.unique(labels)) - {0}
    assert present and present <= set(np.unique(split.masks[0]))  # the resized mask keeps the objects
    assert cache.load_split(data, "val.json", 64, with_masks=False).masks.shape[0] == 0


def test_a_second_process_reads_the_entry_instead_of_decoding_again(data, monkeypatch):
    first = cache.load_split(data, "val.json", 64)
    assert len(_entries()) == 1
    monkeypatch.setattr(cache, "_opened", {})  # as a new process would
    monkeypatch.setattr(cache, "_build", lambda *a: pytest.fail("the cache was rebuilt"))
    again = cache.load_split(data, "val.json", 64)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.masks, again.masks)


def test_changed_annotations_rebuild_the_entry(data, monkeypatch):
    before = cache.load_split(data, "val.json", 64)
    ann = json.loads((data / "val.json").read_text())
    first_image = ann["images"][0]["id"]
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != first_image]
    (data / "val.json").write_text(json.dumps(ann))
    monkeypatch.setattr(cache, "_opened", {})
    after = cache.load_split(data, "val.json", 64)
    assert len(_entries()) == 2
    assert before.masks[0].any() and not after.masks[0].any()  # the removed objects are gone
    assert np.array_equal(before.masks[1:], after.masks[1:])


def test_resize_and_skipped_images_are_part_of_the_key(data):
    a = cache.load_split(data, "val.json", 64)
    b = cache.load_split(data, "val.json", 32)
    skipped = cache.load_split(data, "val.json", 64, skip=frozenset([a.file_names[0]]))
    assert b.images.shape[1] == 32 and len(_entries()) == 3
    assert skipped.file_names == a.file_names[1:]
    assert np.array_equal(skipped.images, a.images[1:])


def _build_in_child(root, barrier, queue):
    barrier.wait()  # both children start building at the same moment
    split = cache.load_split(root, "train.json", 64)
    queue.put((split.images.sum(dtype=np.int64).item(), split.masks.sum(dtype=np.int64).item()))


def test_two_concurrent_builders_leave_one_complete_entry(data, monkeypatch):
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    children = [context.Process(target=_build_in_child, args=(data, barrier, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert _entries() == [cache.split_key(data, "train.json", 64)]  # no staging folder left behind
    monkeypatch.setenv("SEGSEARCH_CACHE", str(data.parent / "fresh"))
    reference = cache.load_split(data, "train.json", 64)
    expected = (reference.images.sum(dtype=np.int64).item(), reference.masks.sum(dtype=np.int64).item())
    assert results == [expected, expected]


def test_a_failed_build_leaves_nothing_behind(data):
    coco = CocoSegmentation(data, "val.json")
    os.remove(coco.image_path(coco.image_ids[-1]))
    with pytest.raises(UserError, match="cannot read image"):
        cache.load_split(data, "val.json", 64)
    assert _entries() == []
