"""Finding bad data before any training: broken annotation files, and images that cannot be used.

Two kinds of problems:

- file-level (`fatal`): the annotation file is broken (not JSON, no `categories`, wrong types) or an
  annotation refers to an unknown image or category id. Nothing in the file can be trusted.
- image-level (`bad_images`): a missing, unreadable or truncated image, one whose path leaves the
  dataset root, whose real size disagrees with the json, or that carries a degenerate polygon or a
  malformed RLE. The rest of the file is usable without these images (`--skip-bad`).

Every message is one line naming the annotation file and the image file / annotation id at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from errors import UserError

from .coco import AnnotationFileError, CocoSegmentation, PathOutsideRoot, is_json_int

# EXIF orientations that turn the stored image by 90 degrees (width and height swap once applied).
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
MAX_LISTED = 20  # image problems listed in a warning; the rest are counted


@dataclass
class ValidationReport:
    ann_file: str
    num_images: int = 0
    num_annotations: int = 0
    class_names: list[str] = field(default_factory=list)  # after the class map; empty if the file is unusable
    fatal: list[str] = field(default_factory=list)
    bad_images: dict[str, str] = field(default_factory=dict)  # file_name -> "image id N: reason[; reason]"

    @property
    def ok(self) -> bool:
        return not self.fatal and not self.bad_images

    def image_problems(self) -> list[str]:
        return [f"{self.ann_file}: {name}: {reason}" for name, reason in self.bad_images.items()]

    def problems(self) -> list[str]:
        """Every problem, one line each, file-level first."""
        return self.fatal + self.image_problems()


def validate_dataset(root: str | Path, ann_file: str | Path, class_map=None,
                     require_annotations: bool = True) -> ValidationReport:
    """Checks one annotation file of a dataset root and every image it lists.

    Only raises for bugs: every problem with the data ends up in the report. class_map is a
    data_pipeline.classes.ClassMap (its errors, e.g. `unmapped: error`, are fatal problems).
    """
    report = ValidationReport(str(ann_file))
    try:
        coco = CocoSegmentation(root, ann_file, class_map=class_map)
        report.class_names = list(coco.class_names)  # resolved lazily: a class map or repeated names may refuse the file
    except AnnotationFileError as exc:
        report.fatal = list(exc.problems)
        return report
    except UserError as exc:
        report.fatal = [str(exc)]
        return report
    annotations = coco.coco.dataset.get("annotations", [])
    report.num_images, report.num_annotations = len(coco.image_ids), len(annotations)
    if require_annotations and "annotations" not in coco.coco.dataset:
        report.fatal.append(f"{ann_file} has no 'annotations' list")
    if not coco.image_ids:
        report.fatal.append(f"{ann_file} lists no images")
    report.fatal += reference_problems(coco, str(ann_file))
    for image_id in coco.image_ids:
        reason = image_problem(coco, image_id)
        if reason:
            _add(report.bad_images, coco, image_id, reason)
    for ann in annotations:
        info = coco.coco.imgs.get(ann["image_id"])
        if info is None:
            continue  # already a file-level problem
        reason = segmentation_problem(ann.get("segmentation"), info["width"], info["height"])
        if reason:
            _add(report.bad_images, coco, ann["image_id"], f"annotation {ann['id']}: {reason}")
    return report


def _add(bad_images: dict[str, str], coco: CocoSegmentation, image_id: int, reason: str) -> None:
    name = coco.file_name(image_id)
    if name in bad_images:
        bad_images[name] += f"; {reason}"
    else:
        bad_images[name] = f"image id {image_id}: {reason}"


def reference_problems(coco: CocoSegmentation, source: str) -> list[str]:
    """Annotations on image or category ids the file does not define."""
    problems = []
    for ann in coco.coco.dataset.get("annotations", []):
        if ann["image_id"] not in coco.coco.imgs:
            problems.append(f"{source}: annotation {ann['id']} refers to unknown image id {ann['image_id']}")
        if ann["category_id"] not in coco.coco.cats:
            problems.append(f"{source}: annotation {ann['id']} refers to unknown category id {ann['category_id']}")
    return problems


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def image_problem(coco: CocoSegmentation, image_id: int) -> str | None:
    """Why the image cannot be used, or None."""
    try:
        path = coco.image_path(image_id)
    except PathOutsideRoot as exc:
        return exc.reason
    if not path.is_file():
        return "missing (no such file under the dataset root)"
    try:
        width, height = decoded_size(path)
    except ValueError as exc:
        return f"unreadable: {exc}"
    info = coco.coco.imgs[image_id]
    if (width, height) != (info["width"], info["height"]):
        return (f"image is {width}x{height} (after EXIF orientation) but the annotation file says "
                f"{info['width']}x{info['height']}")
    return None


def decoded_size(path: Path) -> tuple[int, int]:
    """(width, height) as CocoSegmentation.read_image will see it (EXIF orientation applied).

    Raises ValueError when the file does not decode completely. JPEGs are decoded by PIL, which
    (unlike cv2.imread) refuses truncated files; other formats by cv2 itself.
    """
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                return _jpeg_size(image)
    except UnidentifiedImageError:
        pass  # not a format PIL knows: cv2 has the last word
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(str(exc)) from None
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not an image (OpenCV cannot decode it)")
    return image.shape[1], image.shape[0]


def _jpeg_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    # Decoding at 1/8 scale still reads every byte (so truncation is caught), in about half the time.
    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
    try:
        image.load()
    except OSError as exc:
        raise ValueError(f"truncated or corrupt JPEG ({exc})") from None
    return (height, width) if orientation in TRANSPOSING_ORIENTATIONS else (width, height)


# ---------------------------------------------------------------------------------------------
# Segmentations
# ---------------------------------------------------------------------------------------------

def segmentation_problem(segmentation, width: int, height: int) -> str | None:
    """Why a COCO segmentation (polygons or RLE) cannot be rasterised correctly, or None."""
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty segmentation"
        for index, polygon in enumerate(segmentation):
            reason = polygon_problem(polygon)
            if reason:
                return f"polygon {index} {reason}"
        # A zero-area sliver beside real parts is harmless (mask-to-polygon converters emit them);
        # an object whose every part has zero area covers nothing.
        if all(polygon_area(polygon) < 1e-6 for polygon in segmentation):
            return "polygon 0 has zero area" if len(segmentation) == 1 else "every polygon has zero area"
        return None
    if isinstance(segmentation, dict):
        reason = rle_problem(segmentation, width, height)
        return f"malformed RLE: {reason}" if reason else None
    return f"segmentation is neither a list of polygons nor an RLE object (got {type(segmentation).__name__})"


def polygon_problem(polygon) -> str | None:
    if not (isinstance(polygon, list) and _is_flat_numbers(polygon)):
        return "is not a flat list of numbers"
    if len(polygon) % 2:
        return f"has an odd number of coordinates ({len(polygon)})"
    # pycocotools reads a 4-number "polygon" as a box and fails on shorter ones.
    if len(polygon) < 6:
        return f"has {len(polygon) // 2} point(s), needs at least 3"
    if not np.isfinite(polygon).all():
        return "has non-finite coordinates"
    return None


def _is_flat_numbers(values: list) -> bool:
    """Cheaper than testing each element: numpy infers a numeric 1-D array only from a flat list of
    numbers (strings, None and nested lists give other dtypes, dimensions or a ValueError)."""
    try:
        array = np.array(values)
    except ValueError:
        return False
    return array.ndim == 1 and array.dtype.kind in "iuf"


def polygon_area(polygon: list[float]) -> float:
    return cv2.contourArea(np.asarray(polygon, dtype=np.float32).reshape(-1, 2))


def rle_problem(rle: dict, width: int, height: int) -> str | None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(is_json_int(x) for x in size)):
        return f"size must be [height, width], got {size!r}"
    if size != [height, width]:
        return f"size {size} differs from the image's [height, width] [{height}, {width}]"
    if isinstance(counts, str):
        try:
            counts = compressed_rle_counts(counts)
        except ValueError as exc:
            return f"counts string {exc}"
    elif not (isinstance(counts, list) and all(is_json_int(x) for x in counts)):
        return "counts must be a string or a list of integers"
    if any(run < 0 for run in counts):
        return "negative run length"
    # pycocotools writes runs without bounds checks: a wrong total would overrun the mask.
    if sum(counts) != height * width:
        return f"runs cover {sum(counts)} pixels, the image has {height * width}"
    return None


def compressed_rle_counts(text: str) -> list[int]:
    """Run lengths of pycocotools' compressed RLE string.

    Each run is a little-endian sequence of characters '0' + 6 bits: 5 value bits and a
    continuation bit (0x20); bit 0x10 of the last character is the sign. From the fourth run on,
    the stored value is the difference to the run two places before.
    """
    counts: list[int] = []
    value = shift = 0
    for char in text:
        code = ord(char) - 48
        if not 0 <= code < 64:
            raise ValueError(f"has the invalid character {char!r}")
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        value = shift = 0
    if shift:
        raise ValueError("ends in the middle of a run")
    return counts


# ---------------------------------------------------------------------------------------------
# Decisions for the CLIs
# ---------------------------------------------------------------------------------------------

def summarise(problems: list[str]) -> str:
    """The first problem and how many more, on one line."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}"


def check_usable(report: ValidationReport, skip_bad: bool) -> list[str]:
    """The file_names to leave out of training; raises UserError when the data cannot be used.

    Fatal problems always raise. Image problems raise unless skip_bad, and then too when no image
    would be left.
    """
    if report.fatal:
        raise UserError(f"{report.ann_file} cannot be used: {summarise(report.fatal)}")
    if not report.bad_images:
        return []
    if not skip_bad:
        raise UserError(f"{len(report.bad_images)} image(s) of {report.ann_file} cannot be used: "
                        f"{summarise(report.image_problems())}; fix them, or pass --skip-bad to train without them")
    if len(report.bad_images) >= report.num_images:
        raise UserError(f"every image of {report.ann_file} has problems, none left to train on: "
                        f"{summarise(report.image_problems())}")
    return sorted(report.bad_images)


def format_warning(report: ValidationReport, limit: int = MAX_LISTED) -> str:
    """A multi-line warning listing the images left out (at most `limit` lines of them)."""
    lines = report.image_problems()
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join([f"warning: leaving out {len(lines)} of {report.num_images} image(s) of "
                      f"{report.ann_file} (--skip-bad):", *shown])
