"""Pseudo-labels: an ensemble's confident test predictions as a COCO file that a later search trains on
(`data.extra_train` in the space).

Each test image gets one RLE annotation per predicted class over the pixels whose ensemble
probability reaches the threshold, at the image's own size. Confident background needs no
annotation; the other pixels are annotated with the category `Uncertain`, which the data pipeline
ignores (label 255: no loss) when it reads the file as extra training data. Categories carry the
model's class names (after any class map), so the file reads back in the same taxonomy.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from atomic_file import write_atomically

from .classes import BACKGROUND, ClassMap

UNCERTAIN = "Uncertain"


def pseudo_class_map(class_names: Iterable[str]) -> ClassMap:
    """How a pseudo-label file is read back: its categories are the model's classes; `Uncertain` is ignored."""
    names = [n for n in class_names if n != BACKGROUND]
    return ClassMap(map=((UNCERTAIN, None),), classes=tuple(names))  # other names are refused


def image_annotations(labels: np.ndarray, confident: np.ndarray, image: dict, uncertain_id: int,
                      first_id: int) -> list[dict]:
    """labels (uint8, any size) and confident (bool, same size) of one image -> RLE annotations at the
    image's width x height, numbered from first_id; category ids are the labels, uncertain_id the rest."""
    width, height = image["width"], image["height"]
    labels = cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST)
    confident = cv2.resize(confident.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    regions = [(int(c), confident & (labels == c)) for c in np.unique(labels[confident]) if c != 0]
    regions.append((uncertain_id, ~confident))
    annotations = []
    for category, region in regions:
        if not region.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
        x, y, w, h = mask_utils.toBbox(rle).tolist()
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append({"id": first_id + len(annotations), "image_id": image["id"], "category_id": category,
                            "segmentation": rle, "area": int(region.sum()), "bbox": [x, y, w, h], "iscrowd": 0})
    return annotations


def write_pseudo_labels(path: str | Path, images: list[dict], predictions: Iterable[tuple[np.ndarray, np.ndarray]],
                        class_names: list[str]) -> dict:
    """images: the test.json image records, in the order of predictions ((labels, confident) per image).
    Writes the COCO file atomically; returns counts for the log."""
    uncertain_id = len(class_names)  # class labels 1..K-1 are their own category ids
    annotations, confident_pixels, pixels = [], 0, 0
    for info, (labels, confident) in zip(images, predictions, strict=True):
        annotations += image_annotations(labels, confident, info, uncertain_id, len(annotations) + 1)
        confident_pixels, pixels = confident_pixels + int(confident.sum()), pixels + confident.size
    categories = [{"id": i, "name": name} for i, name in enumerate(class_names) if i > 0]
    categories.append({"id": uncertain_id, "name": UNCERTAIN})
    coco = {"images": [dict(info) for info in images], "annotations": annotations, "categories": categories,
            "info": {"description": "segsearch pseudo-labels: the Uncertain category is ignored in training"}}
    write_atomically(path, json.dumps(coco))
    return {"images": len(images), "annotations": len(annotations),
            "confident_share": confident_pixels / pixels if pixels else 0.0}
