"""Reading a COCO segmentation file: classes, images (never outside the dataset root), label maps.

Class contract: label 0 is background; categories follow in id order as labels 1..K.
"""
from __future__ import annotations

import contextlib
import io
import json
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from errors import UserError

BACKGROUND = "Background"


def resolve_inside(root: Path, relative: str, what: str) -> Path:
    """root/relative, refusing paths that escape root (absolute paths, '..', links pointing out)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise UserError(f"{what} {relative!r} points outside the dataset root {root}")
    return path


class CocoSegmentation:
    """One annotation file of a dataset root: its classes, its images in file order, their label maps."""

    def __init__(self, root: str | Path, ann_file: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data root {self.root} does not exist or is not a folder")
        self.ann_path = resolve_inside(self.root, str(ann_file), "annotation file")
        if not self.ann_path.is_file():
            raise UserError(f"annotation file {self.ann_path} does not exist")
        self.coco = self._load(self.ann_path)
        self.image_ids: list[int] = [image["id"] for image in self.coco.dataset["images"]]

    @staticmethod
    def _load(path: Path) -> COCO:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco = COCO(str(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"annotation file {path} is not valid JSON: {exc}") from exc
        except (KeyError, TypeError, AssertionError) as exc:
            raise UserError(f"annotation file {path} is not a COCO file: missing or bad {exc}") from exc
        for key in ("images", "categories"):
            if key not in coco.dataset:
                raise UserError(f"annotation file {path} has no {key!r} list")
        return coco

    @cached_property
    def category_ids(self) -> list[int]:
        return sorted(self.coco.getCatIds())

    @cached_property
    def class_names(self) -> list[str]:
        """Background first, then the categories in id order."""
        return [BACKGROUND] + [self.coco.cats[cid]["name"] for cid in self.category_ids]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def file_name(self, image_id: int) -> str:
        return self.coco.imgs[image_id]["file_name"]

    def image_path(self, image_id: int) -> Path:
        return resolve_inside(self.root, self.file_name(image_id), f"image of {self.ann_path.name}")

    def check_images_exist(self) -> None:
        """Raises a UserError naming the first missing image (and how many are missing)."""
        missing = [self.file_name(i) for i in self.image_ids if not self.image_path(i).is_file()]
        if missing:
            raise UserError(f"{len(missing)} image(s) listed in {self.ann_path} are missing under {self.root}, "
                            f"e.g. {missing[0]}")

    def read_image(self, image_id: int) -> np.ndarray:
        """The image as RGB uint8 [H, W, 3]."""
        path = self.image_path(image_id)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise UserError(f"cannot read image {path} (listed in {self.ann_path})")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def label_map(self, image_id: int) -> np.ndarray:
        """uint8 [H, W] labels; objects painted largest first so that small ones stay visible."""
        info = self.coco.imgs[image_id]
        labels = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], iscrowd=None))
        for ann in sorted(anns, key=lambda a: a.get("area", 0), reverse=True):
            if ann["category_id"] not in label_of:
                raise UserError(f"{self.ann_path}: annotation {ann.get('id')} has unknown category_id "
                                f"{ann['category_id']}")
            labels[self.coco.annToMask(ann).astype(bool)] = label_of[ann["category_id"]]
        return labels
