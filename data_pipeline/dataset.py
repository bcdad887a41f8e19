"""Decoded, resized splits held in memory, and the torch Dataset over them.

A split is decoded once per (annotation file contents, resize) in each process and reused by every
trial that process runs (Ray reuses trial actors).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .coco import CocoSegmentation


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, H, W, 3]
    masks: np.ndarray  # uint8 [N, H, W]
    file_names: tuple[str, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.file_names)


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def load_split(root: str | Path, ann_file: str, resize: int, with_masks: bool = True) -> Split:
    """All images (and label maps) of ann_file, resized to resize x resize."""
    coco_path = Path(root) / ann_file
    digest = file_digest(coco_path) if coco_path.is_file() else ""
    return _load_split_cached(str(root), ann_file, int(resize), with_masks, digest)


@lru_cache(maxsize=8)
def _load_split_cached(root: str, ann_file: str, resize: int, with_masks: bool, digest: str) -> Split:
    coco = CocoSegmentation(root, ann_file)
    size = (resize, resize)
    images = np.zeros((len(coco.image_ids), resize, resize, 3), np.uint8)
    masks = np.zeros((len(coco.image_ids) if with_masks else 0, resize, resize), np.uint8)
    for i, image_id in enumerate(coco.image_ids):
        images[i] = cv2.resize(coco.read_image(image_id), size, interpolation=cv2.INTER_AREA)
        if with_masks:
            masks[i] = cv2.resize(coco.label_map(image_id), size, interpolation=cv2.INTER_NEAREST)
    return Split(images, masks, tuple(coco.file_name(i) for i in coco.image_ids), tuple(coco.class_names))


class SegmentationDataset(Dataset):
    """(image tensor [3, H, W] float, mask tensor [H, W] long) pairs of a Split through a transform."""

    def __init__(self, split: Split, transform: A.Compose):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        has_mask = len(self.split.masks) > 0
        mask = self.split.masks[index] if has_mask else np.zeros(self.split.images[index].shape[:2], np.uint8)
        out = self.transform(image=self.split.images[index], mask=mask)
        return out["image"], torch.as_tensor(out["mask"], dtype=torch.long)
