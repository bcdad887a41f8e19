"""Node-local disk cache of decoded splits: every image and label map of an annotation file, resized
once, stored as uint8 .npy arrays and memory-mapped by every trial on the node.

The key covers what the arrays depend on: the annotation file's content (sha1), the dataset root,
the resize, the class map and the images left out. A changed dataset therefore never reads a stale
entry. Builders take a per-key file lock (concurrent trials wait for the first one instead of
decoding the same images again) and write into a temporary folder renamed into place when complete,
so a crashed builder never leaves a half-written entry behind.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from .coco import CocoSegmentation
from .dataset import Split

CACHE_FORMAT = 1  # bump when the stored layout or decoding changes


def cache_dir() -> Path:
    """$SEGSEARCH_CACHE/splits, else ~/.cache/segsearch/splits: local to each node."""
    base = os.environ.get("SEGSEARCH_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "segsearch") / "splits"


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def split_key(root: str | Path, ann_file: str, resize: int, class_map=None, skip=()) -> str:
    """The cache key of (annotation content, root, resize, class map, skipped images)."""
    ann_path = Path(root) / ann_file
    parts = {
        "format": CACHE_FORMAT, "root": str(Path(root).resolve()), "ann": ann_file,
        "ann_sha1": file_digest(ann_path) if ann_path.is_file() else "",
        "resize": int(resize), "class_map": class_map.key() if class_map else "", "skip": sorted(skip),
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def load_split(root: str | Path, ann_file: str, resize: int, *, class_map=None, skip=frozenset(),
               with_masks: bool = True) -> Split:
    """All images and label maps of ann_file resized to resize x resize, built on first use and then
    memory-mapped from the node-local cache (read-only arrays)."""
    key = split_key(root, ann_file, resize, class_map, skip)
    if key not in _opened:
        _opened[key] = _open(cache_dir() / key, root, ann_file, int(resize), class_map, frozenset(skip))
    split = _opened[key]
    if with_masks:
        return split
    return Split(split.images, split.masks[:0], split.file_names, split.class_names)


_opened: dict[str, Split] = {}  # per process: memory maps already open


def _open(entry: Path, root, ann_file: str, resize: int, class_map, skip: frozenset) -> Split:
    if not entry.is_dir():
        with _build_lock(entry):
            if not entry.is_dir():  # another builder may have finished while we waited
                _build(entry, CocoSegmentation(root, ann_file, class_map=class_map, skip=skip), resize)
    return _read(entry)


@contextmanager
def _build_lock(entry: Path):
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(entry: Path, coco: CocoSegmentation, resize: int) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f"{entry.name}.building-", dir=entry.parent))
    try:
        _decode_into(staging, coco, resize)
        meta = {"file_names": [coco.file_name(i) for i in coco.image_ids], "class_names": list(coco.class_names),
                "source": str(coco.ann_path), "resize": resize}
        (staging / "meta.json").write_text(json.dumps(meta))
        os.rename(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _decode_into(folder: Path, coco: CocoSegmentation, resize: int) -> None:
    count, size = len(coco.image_ids), (resize, resize)
    images = np.lib.format.open_memmap(folder / "images.npy", "w+", np.uint8, (count, resize, resize, 3))
    masks = np.lib.format.open_memmap(folder / "masks.npy", "w+", np.uint8, (count, resize, resize))

    def decode(i: int) -> None:
        image_id = coco.image_ids[i]
        images[i] = cv2.resize(coco.read_image(image_id), size, interpolation=cv2.INTER_AREA)
        masks[i] = cv2.resize(coco.label_map(image_id), size, interpolation=cv2.INTER_NEAREST)

    # cv2 decoding releases the GIL, so threads use every core of the node for this one-off build.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(count)))
    images.flush()
    masks.flush()


def _read(entry: Path) -> Split:
    meta = json.loads((entry / "meta.json").read_text())
    return Split(np.load(entry / "images.npy", mmap_mode="r"), np.load(entry / "masks.npy", mmap_mode="r"),
                 tuple(meta["file_names"]), tuple(meta["class_names"]))
