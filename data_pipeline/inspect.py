"""Check a dataset and summarise it: counts, per-class pixel share, problems, a grid of samples.

    python -m data_pipeline.inspect /data/trash
    python -m data_pipeline.inspect /data/trash --ann val.json --grid val-samples.png
    python -m data_pipeline.inspect /data/taco --class-map taco_to_trash.yaml
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from atomic_file import write_atomically
from errors import UserError, exit_cli

from labels import IGNORE

from .classes import ClassMap
from .coco import CocoSegmentation
from .validate import ValidationReport, check_usable, validate_dataset

EXIT_CODES = """exit codes:
  0  the dataset is usable as it is
  1  some images have problems (listed); the rest is usable: launch.py --skip-bad leaves them out
  2  the annotation file is unusable (broken JSON, no categories, unknown ids, ...) or bad arguments
"""
GRID_SAMPLES = 16
GRID_COLUMNS = 4
TILE = 256  # each sample is letterboxed into TILE x TILE
LEGEND_WIDTH = 240
LEGEND_ROW = 22
OVERLAY_ALPHA = 0.5
BACKDROP = (32, 32, 32)
IGNORE_COLOUR = (160, 160, 160)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="dataset root (image paths in the json are relative to it)")
    parser.add_argument("--ann", default="train.json", help="annotation file under ROOT (default: %(default)s)")
    parser.add_argument("--grid", type=Path, default=None,
                        help=f"also write a PNG grid of up to {GRID_SAMPLES} samples with their masks")
    parser.add_argument("--class-map", type=Path, default=None, help="class-map YAML (data_pipeline.classes)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    class_map = ClassMap.load(args.class_map) if args.class_map else None
    report = validate_dataset(args.root, args.ann, class_map)
    if report.fatal:
        print(format_problems(report))
        check_usable(report, skip_bad=True)  # raises: the file is unusable
    coco = CocoSegmentation(args.root, args.ann, class_map=class_map, skip=report.bad_images)
    print(f"{coco.ann_path}: {report.num_images} images, {report.num_annotations} annotations, "
          f"{coco.num_classes} classes (background included)\n")
    stats = class_statistics(coco)
    print(f"Classes over the {stats.num_images} usable images:\n{format_class_table(stats)}\n")
    if args.grid:
        write_grid(args.grid, coco)
        print(f"Sample grid: {args.grid}")
    if report.bad_images:
        print(format_problems(report))
        print(f"{len(report.bad_images)} image(s) of {args.ann} have problems; "
              "launch.py --skip-bad leaves them out", file=sys.stderr)
        return 1
    print("No problems found.")
    return 0


def format_problems(report: ValidationReport) -> str:
    problems = report.problems()
    return "\n".join([f"Problems ({len(problems)}):", *(f"  {line}" for line in problems)])


# ---------------------------------------------------------------------------------------------
# Class statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class ClassStats:
    class_names: list[str]
    num_images: int
    pixels: np.ndarray  # [256] pixel count per label
    images: np.ndarray  # [256] images in which the label covers at least one pixel
    annotations: np.ndarray  # [256] annotations per label


def class_statistics(coco: CocoSegmentation) -> ClassStats:
    """Counts per label, from the label maps (what training sees: overlaps resolved, class map applied)."""
    pixels, images, annotations = (np.zeros(256, np.int64) for _ in range(3))
    label_of = coco.classes.label_of
    for image_id in coco.image_ids:
        counts = np.bincount(coco.label_map(image_id).ravel(), minlength=256)
        pixels += counts
        images += counts > 0
        for ann in coco.coco.imgToAnns[image_id]:
            annotations[label_of[ann["category_id"]]] += 1
    return ClassStats(coco.class_names, len(coco.image_ids), pixels, images, annotations)


def format_class_table(stats: ClassStats) -> str:
    rows = [(str(label), name) for label, name in enumerate(stats.class_names)]
    labels = list(range(len(stats.class_names)))
    if stats.pixels[IGNORE] or stats.annotations[IGNORE]:
        rows.append((str(IGNORE), "(ignored)"))
        labels.append(IGNORE)
    total = max(int(stats.pixels.sum()), 1)
    width = max(len("class"), *(len(name) for _, name in rows))
    lines = [f"{'label':>5}  {'class':<{width}}  {'annotations':>11}  {'images':>6}  {'pixels %':>8}"]
    for (label_text, name), label in zip(rows, labels):
        annotations = "-" if label == 0 else stats.annotations[label]
        lines.append(f"{label_text:>5}  {name:<{width}}  {annotations:>11}  {stats.images[label]:>6}  "
                     f"{_percent(stats.pixels[label], total):>8}")
    return "\n".join(lines)


def class_shares(stats: ClassStats) -> str:
    """One line: images, annotations and each class's share of the pixels (classes with none left out)."""
    total = max(int(stats.pixels.sum()), 1)
    shares = [f"{name} {_percent(stats.pixels[label], total)} %" for label, name in enumerate(stats.class_names)
              if stats.pixels[label]]
    if stats.pixels[IGNORE]:
        shares.append(f"(ignored) {_percent(stats.pixels[IGNORE], total)} %")
    return f"{stats.num_images} images, {int(stats.annotations.sum())} annotations; pixels: {', '.join(shares)}"


def _percent(count: int, total: int) -> str:
    share = 100 * count / total
    return "<0.01" if 0 < share < 0.01 else f"{share:.2f}"


# ---------------------------------------------------------------------------------------------
# Sample grid
# ---------------------------------------------------------------------------------------------

def write_grid(path: Path, coco: CocoSegmentation, samples: int = GRID_SAMPLES) -> None:
    """A PNG of up to `samples` images (evenly spread over the file) with their masks and a legend."""
    if not coco.image_ids:
        raise UserError(f"{coco.ann_path} has no usable image to draw")
    picks = np.unique(np.linspace(0, len(coco.image_ids) - 1, min(samples, len(coco.image_ids))).round())
    image_ids = [coco.image_ids[int(i)] for i in picks]
    colours = palette(coco.num_classes)
    tiles = [sample_tile(coco, image_id, colours) for image_id in image_ids]
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid_image(tiles, legend(coco, colours)), cv2.COLOR_RGB2BGR))
    assert ok
    write_atomically(Path(path), png.tobytes())


# A qualitative palette (matplotlib's tab20, dark and light pairs apart): neighbouring labels differ in hue.
QUALITATIVE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
               (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229)]


def palette(num_classes: int) -> np.ndarray:
    """RGB uint8 [256, 3]: background black, labels 1..K in a qualitative palette (repeating after 18),
    IGNORE grey. The inspector's grid, the report's figures and predict.py's overlays share it."""
    colours = np.zeros((256, 3), np.uint8)
    for label in range(1, num_classes):
        colours[label] = QUALITATIVE[(label - 1) % len(QUALITATIVE)]
    colours[IGNORE] = IGNORE_COLOUR
    return colours


def sample_tile(coco: CocoSegmentation, image_id: int, colours: np.ndarray) -> np.ndarray:
    image, labels = coco.read_image(image_id), coco.label_map(image_id)
    scale = TILE / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    objects = labels != 0
    blended = (1 - OVERLAY_ALPHA) * image[objects] + OVERLAY_ALPHA * colours[labels[objects]]
    image[objects] = blended.astype(np.uint8)
    tile = np.full((TILE, TILE, 3), BACKDROP, np.uint8)
    tile[: image.shape[0], : image.shape[1]] = image
    caption = Path(coco.file_name(image_id)).name
    cv2.rectangle(tile, (0, TILE - 16), (TILE - 1, TILE - 1), BACKDROP, cv2.FILLED)
    cv2.putText(tile, caption, (4, TILE - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def legend(coco: CocoSegmentation, colours: np.ndarray) -> np.ndarray:
    entries = [(label, name) for label, name in enumerate(coco.class_names) if label > 0]
    if IGNORE in coco.classes.label_of.values():
        entries.append((IGNORE, "(ignored)"))
    panel = np.full((LEGEND_ROW * (len(entries) + 1), LEGEND_WIDTH, 3), BACKDROP, np.uint8)
    for row, (label, name) in enumerate(entries):
        top = LEGEND_ROW // 2 + row * LEGEND_ROW
        cv2.rectangle(panel, (8, top), (22, top + 14), colours[label].tolist(), cv2.FILLED)
        cv2.putText(panel, f"{label} {name}", (30, top + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return panel


def grid_image(tiles: list[np.ndarray], legend_panel: np.ndarray) -> np.ndarray:
    """Tiles in rows of GRID_COLUMNS, the legend to their right; RGB uint8."""
    columns = min(GRID_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    height = max(rows * TILE, legend_panel.shape[0])
    canvas = np.full((height, columns * TILE + LEGEND_WIDTH, 3), BACKDROP, np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * TILE, (index % columns) * TILE
        canvas[top: top + TILE, left: left + TILE] = tile
    canvas[: legend_panel.shape[0], columns * TILE:] = legend_panel
    return canvas


if __name__ == "__main__":
    exit_cli(main)
