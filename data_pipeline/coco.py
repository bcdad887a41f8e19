"""Reading a COCO segmentation file: classes, images (named inside the dataset root), label maps.

Class contract: label 0 is background; categories follow in id order as labels 1..K, unless a class
map (data_pipeline.classes) renames, merges or drops them; label 255 is ignored.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from pycocotools.coco import COCO

from data_pipeline.classes import ClassMap, ResolvedClasses, resolve
from errors import UserError


class PathOutsideRoot(UserError):
    """A file name that leaves the dataset root; `reason` says how (for one-line validation reports)."""

    def __init__(self, what: str, relative: str, reason: str):
        super().__init__(f"{what} {relative!r}: {reason}")
        self.reason = reason


def resolve_inside(root: Path, relative: str, what: str) -> Path:
    """root/relative, refusing a name that leaves root as written: an absolute path, or '..' above the
    root. Symbolic links inside the root are followed wherever they point: that is how Kaggle and
    Colab mount datasets, and the name, not the link target, is what an annotation file controls."""
    if Path(relative).is_absolute() or PurePosixPath(relative).is_absolute():
        raise PathOutsideRoot(what, relative, f"path is absolute; names must be relative to the dataset root {root}")
    depth = 0
    for part in PurePosixPath(relative.replace("\\", "/")).parts:
        depth += -1 if part == ".." else part != "."
        if depth < 0:
            raise PathOutsideRoot(what, relative, f"path leaves the dataset root {root} through '..'")
    return root / relative


class AnnotationFileError(UserError):
    """An annotation file that is not usable COCO; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


# Required fields of each entry and their JSON types (ints exactly: they index dicts and size arrays).
ENTRY_FIELDS = {
    "images": ("image", {"id": int, "file_name": str, "width": int, "height": int}),
    "categories": ("category", {"id": int, "name": str}),
    "annotations": ("annotation", {"id": int, "image_id": int, "category_id": int}),
}


def structure_problems(data, source: str) -> list[str]:
    """Why parsed JSON is not a usable COCO file: missing lists, wrong types, repeated ids.

    Annotations are optional here (test files have none); their segmentations and references to
    images and categories are checked by data_pipeline.validate.
    """
    if not isinstance(data, dict):
        return [f"{source}: the top level is {_json_type(data)}, not an object"]
    problems = [f"{source} has no {key!r} list" for key in ("images", "categories") if key not in data]
    problems += [f"{source}: {key!r} is {_json_type(data[key])}, not a list"
                 for key in ENTRY_FIELDS if key in data and not isinstance(data[key], list)]
    if problems:
        return problems
    for key, (kind, fields) in ENTRY_FIELDS.items():
        problems += _entry_problems(data.get(key, []), kind, fields, source)
    for ann in data.get("annotations", []):
        if isinstance(ann, dict) and "area" in ann and not is_json_number(ann["area"]):
            problems.append(f"{source}: annotation {ann.get('id')}: area {ann['area']!r} is not a number")
    for image in data["images"]:
        if isinstance(image, dict) and any(is_json_int(image.get(k)) and image[k] <= 0 for k in ("width", "height")):
            problems.append(f"{source}: image {image.get('id')}: width and height must be positive")
    return problems


def _entry_problems(entries: list, kind: str, fields: dict[str, type], source: str) -> list[str]:
    problems, seen = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{source}: {kind} #{index} in the list is {_json_type(entry)}, not an object")
            continue
        name = f"{kind} {entry['id']}" if is_json_int(entry.get("id")) else f"{kind} #{index} in the list"
        for key, expected in fields.items():
            if key not in entry:
                problems.append(f"{source}: {name} has no {key!r}")
            elif not (is_json_int(entry[key]) if expected is int else isinstance(entry[key], expected)):
                problems.append(f"{source}: {name}: {key} {entry[key]!r} is not {_type_name(expected)}")
        if is_json_int(entry.get("id")):
            if entry["id"] in seen:
                problems.append(f"{source}: {kind} id {entry['id']} appears more than once")
            seen.add(entry["id"])
    return problems


def is_json_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_json_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _type_name(expected: type) -> str:
    return {int: "an integer", str: "a string"}[expected]


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class CocoSegmentation:
    """One annotation file of a dataset root: its classes, its images in file order, their label maps."""

    def __init__(self, root: str | Path, ann_file: str | Path, class_map: ClassMap | None = None,
                 skip: Iterable[str] = ()):
        """skip: file_names to leave out of image_ids (images found bad by data_pipeline.validate)."""
        self.root = Path(root)
        self.class_map = class_map
        if not self.root.is_dir():
            raise UserError(f"data root {self.root} does not exist or is not a folder")
        self.ann_path = resolve_inside(self.root, str(ann_file), "annotation file")
        if not self.ann_path.is_file():
            raise UserError(f"annotation file {self.ann_path} does not exist")
        self.coco = self._load(self.ann_path)
        skip = frozenset(skip)
        self.image_ids: list[int] = [image["id"] for image in self.coco.dataset["images"]
                                     if image["file_name"] not in skip]

    @staticmethod
    def _load(path: Path) -> COCO:
        try:
            data = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"annotation file {path} is not valid JSON (truncated or malformed): {exc}") from exc
        problems = structure_problems(data, f"annotation file {path}")
        if problems:
            raise AnnotationFileError(problems)
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        return coco

    @cached_property
    def category_ids(self) -> list[int]:
        """The source category ids, sorted."""
        return sorted(self.coco.getCatIds())

    @cached_property
    def classes(self) -> ResolvedClasses:
        """Class names and each category's label under the class map."""
        return resolve(list(self.coco.cats.values()), self.class_map, str(self.ann_path))

    @property
    def class_names(self) -> list[str]:
        """Background first; without a class map, the categories in id order."""
        return list(self.classes.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def file_name(self, image_id: int) -> str:
        return self.coco.imgs[image_id]["file_name"]

    def image_path(self, image_id: int) -> Path:
        return resolve_inside(self.root, self.file_name(image_id), f"image of {self.ann_path.name}")

    def read_image(self, image_id: int) -> np.ndarray:
        """The image as RGB uint8 [H, W, 3], in the orientation the annotations refer to.

        Grey, RGBA and 16-bit files are converted (alpha dropped); EXIF orientation is applied, as
        cv2.imread does by default. A truncated JPEG decodes partially without an error here:
        data_pipeline.validate finds those before training.
        """
        path = self.image_path(image_id)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
        if image is None:
            raise UserError(f"cannot read image {path} (listed in {self.ann_path})")
        return image

    def label_map(self, image_id: int) -> np.ndarray:
        """uint8 [H, W] labels; objects painted largest first so that small ones stay visible.

        Objects of ignored categories are painted 255 and those folded into background 0, in the
        same order, so a small ignored object on a large one is ignored exactly where it lies.
        """
        info = self.coco.imgs[image_id]
        labels = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        label_of = self.classes.label_of
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id], iscrowd=None))
        for ann in sorted(anns, key=lambda a: a.get("area", 0), reverse=True):
            if ann["category_id"] not in label_of:
                raise UserError(f"{self.ann_path}: annotation {ann.get('id')} has unknown category_id "
                                f"{ann['category_id']}")
            labels[self.coco.annToMask(ann).astype(bool)] = label_of[ann["category_id"]]
        return labels
