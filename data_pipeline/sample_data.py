"""A small synthetic "recycling trash" segmentation dataset in the competition's COCO layout.

Why it exists: the service must be runnable end to end (search, training, submission) without the
real competition data. The images should look roughly like photos of trash on a floor, table or
conveyor belt, and a tiny CNN should be able to learn them on a CPU within minutes, without a
trivial shortcut such as "everything not background-coloured is an object".

How an image is made (all randomness from one ``np.random.Generator`` per image):

1. Background: a smooth colour gradient plus multi-octave value noise in one of a few surface
   styles (floor, wood, belt, concrete), then clutter that is *not* an object: streaks, stains
   and crumbs, some of them colourful.
2. Objects: 2-6 per image. Each class has its own drawing function in ``SHAPE_DRAWERS``; it
   returns a polygon and a texture on a small, unrotated local canvas (shape family, colour
   distribution with jitter, texture). Placement rotates and translates the sprite into the image,
   rejecting spots that would hide too much of a larger object.
3. Labels and pixels agree by construction: an object's mask is rasterised *from its stored
   annotation* with pycocotools (exactly what ``COCO.annToMask`` returns), ``area`` is that mask's
   pixel count, and objects are drawn largest area first with that mask as their alpha. So painting
   the annotation masks largest-first (the consumer's rule) reproduces what is visible in the image.
   Areas within an image are kept distinct so the order has no ties.
4. Camera: drop shadows, uneven lighting, vignetting, colour cast, sensor noise, slight blur and
   JPEG compression.

Every tenth annotation (by id) stores its mask as compressed RLE instead of a polygon, so consumers
meet both COCO segmentation encodings (the choice is by id so that any dataset with ten or more
annotations has both).
"""
from __future__ import annotations

import colorsys
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES: list[str] = [
    "General trash", "Paper", "Paper pack", "Metal", "Glass",
    "Plastic", "Styrofoam", "Plastic bag", "Battery", "Clothing",
]
SAMPLE_VERSION = "v1"

IMAGES_PER_BATCH = 50
JPEG_QUALITY = 90
MIN_OBJECTS, MAX_OBJECTS = 2, 6
RLE_EVERY = 10  # annotation ids 9, 19, 29, ... are stored as RLE
MAX_HIDDEN_FRACTION = 0.4  # at most this much of a larger object may lie under a smaller one
MIN_INSIDE_FRACTION = 0.6  # at least this much of an object must lie inside the image

# Relative class frequency (Battery and Clothing rarer, as in the real data).
CLASS_WEIGHTS: dict[str, float] = {
    "General trash": 1.3, "Paper": 1.3, "Paper pack": 0.9, "Metal": 0.8, "Glass": 0.7,
    "Plastic": 1.4, "Styrofoam": 0.8, "Plastic bag": 1.2, "Battery": 0.35, "Clothing": 0.45,
}
# Longest object extent as a fraction of min(image height, width).
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "General trash": (0.18, 0.42), "Paper": (0.28, 0.5), "Paper pack": (0.25, 0.42),
    "Metal": (0.22, 0.38), "Glass": (0.32, 0.55), "Plastic": (0.2, 0.4),
    "Styrofoam": (0.2, 0.42), "Plastic bag": (0.3, 0.55), "Battery": (0.1, 0.17),
    "Clothing": (0.5, 0.8),
}


# ---------------------------------------------------------------------------------------------
# Paths and public entry points
# ---------------------------------------------------------------------------------------------

def default_sample_root() -> Path:
    """$SEGSEARCH_CACHE/sample-<version>, or ~/.cache/segsearch/sample-<version>."""
    cache = os.environ.get("SEGSEARCH_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "segsearch"
    return base / f"sample-{SAMPLE_VERSION}"


def ensure_sample_dataset(root: str | Path | None = None, **kwargs) -> Path:
    """The sample dataset at root (default: default_sample_root()), generated if not there yet.

    An existing dataset is reused as is, even if kwargs would have produced a different one.
    """
    root = Path(root).expanduser() if root is not None else default_sample_root()
    if not (root / "train_all.json").is_file():
        generate_sample_dataset(root, **kwargs)
    return root


def generate_sample_dataset(root: str | Path, *, n_train: int = 160, n_val: int = 40, n_test: int = 40,
                            width: int = 320, height: int = 240, seed: int = 0) -> Path:
    """Write the dataset to root atomically and return root.

    It is built in a sibling temporary folder and renamed into place. If a complete dataset
    already sits at root (for instance written concurrently by another process), that one is kept
    and ours is discarded.
    """
    root = Path(root).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed run that had our pid
    try:
        _write_dataset(tmp, n_train=n_train, n_val=n_val, n_test=n_test,
                       width=width, height=height, seed=seed)
        _move_into_place(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: Path, root: Path) -> None:
    try:
        os.replace(tmp, root)  # also replaces an empty folder at root
    except OSError:
        if not (root / "train_all.json").is_file():
            raise FileExistsError(f"{root} exists and is not a sample dataset; not overwriting it")


# ---------------------------------------------------------------------------------------------
# Dataset assembly: split plans, image rendering, COCO files
# ---------------------------------------------------------------------------------------------

@dataclass
class _PlacedObject:
    category_id: int
    polygon: list[float]  # flat [x1, y1, x2, y2, ...] in image coordinates
    mask: np.ndarray  # bool [H, W], exactly what the stored annotation decodes to
    area: int
    sprite: _Sprite
    matrix: np.ndarray  # 2x3 affine map from sprite canvas to image


def _write_dataset(out: Path, *, n_train: int, n_val: int, n_test: int,
                   width: int, height: int, seed: int) -> None:
    split_sizes = {"train": n_train, "val": n_val, "test": n_test}
    master = np.random.default_rng(seed)
    plan_rng = master.spawn(1)[0]
    image_rngs = master.spawn(sum(split_sizes.values()))
    plans = [classes for n in split_sizes.values() for classes in _plan_split(plan_rng, n)]

    images, annotations = [], []
    for index, (classes, rng) in enumerate(zip(plans, image_rngs)):
        file_name = f"batch_{index // IMAGES_PER_BATCH + 1:02d}/{index % IMAGES_PER_BATCH:04d}.jpg"
        pixels, objects = _render_image(rng, classes, height, width)
        _save_jpeg(out / file_name, pixels)
        images.append({"id": index, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            annotations.append(_annotation(len(annotations), index, obj))

    bounds = np.cumsum([0, *split_sizes.values()])
    split_ids = {name: set(range(bounds[i], bounds[i + 1])) for i, name in enumerate(split_sizes)}
    split_ids["train_all"] = split_ids["train"] | split_ids["val"]
    for name in ("train_all", "train", "val"):
        _write_coco(out / f"{name}.json", images, annotations, split_ids[name])
    _write_coco(out / "test.json", images, [], split_ids["test"])
    _write_coco(out / "test_gt.json", images, annotations, split_ids["test"])


def _plan_split(rng: np.random.Generator, n_images: int) -> list[list[int]]:
    """Class indices for each image of a split; every class appears at least once if room allows."""
    weights = np.array([CLASS_WEIGHTS[name] for name in CATEGORIES])
    counts = rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1, size=n_images)
    plan = [list(rng.choice(len(CATEGORIES), size=n, p=weights / weights.sum())) for n in counts]
    for missing in sorted(set(range(len(CATEGORIES))) - {c for classes in plan for c in classes}):
        with_room = [classes for classes in plan if len(classes) < MAX_OBJECTS]
        if with_room:
            with_room[rng.integers(len(with_room))].append(missing)
            continue
        # No room: replace an object whose class occurs more than once in the split.
        totals = np.bincount([c for classes in plan for c in classes], minlength=len(CATEGORIES))
        for classes in plan:
            spare = [i for i, c in enumerate(classes) if totals[c] > 1]
            if spare:
                classes[spare[0]] = missing
                break
    return [[int(c) for c in classes] for classes in plan]


def _annotation(ann_id: int, image_id: int, obj: _PlacedObject) -> dict:
    rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
    if ann_id % RLE_EVERY == RLE_EVERY - 1:
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = [obj.polygon]
    return {
        "id": ann_id, "image_id": image_id, "category_id": obj.category_id,
        "segmentation": segmentation, "area": float(obj.area),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
    }


def _write_coco(path: Path, images: list[dict], annotations: list[dict], image_ids: set[int]) -> None:
    coco = {
        "info": {"description": f"segsearch synthetic recycling-trash sample {SAMPLE_VERSION}"},
        "licenses": [],
        "images": [image for image in images if image["id"] in image_ids],
        "annotations": [ann for ann in annotations if ann["image_id"] in image_ids],
        "categories": [{"id": i + 1, "name": name, "supercategory": name}
                       for i, name in enumerate(CATEGORIES)],
    }
    path.write_text(json.dumps(coco, separators=(",", ":")))


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.write_bytes(encoded.tobytes())


def _render_image(rng: np.random.Generator, classes: list[int], height: int,
                  width: int) -> tuple[np.ndarray, list[_PlacedObject]]:
    """uint8 RGB image and its objects (in placement order, which is not drawing order)."""
    image = _render_background(rng, height, width)
    objects = _place_objects(rng, classes, height, width)
    light_angle = rng.uniform(0, 2 * np.pi)
    shadow_offset = rng.uniform(1.5, 4.5) * np.array([np.cos(light_angle), np.sin(light_angle)])
    for obj in sorted(objects, key=lambda o: o.area, reverse=True):
        image = _composite(rng, image, obj, shadow_offset)
    return _apply_camera(rng, image), objects


# ---------------------------------------------------------------------------------------------
# Noise and colour helpers
# ---------------------------------------------------------------------------------------------

def _value_noise(rng: np.random.Generator, h: int, w: int, cells: float, octaves: int = 3,
                 persistence: float = 0.5) -> np.ndarray:
    """Smooth multi-octave noise, zero mean and unit std; `cells` lattice cells on the long side."""
    out = np.zeros((h, w), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        n = cells * 2 ** octave
        grid_h = min(h, max(2, round(n * h / max(h, w))) + 1)
        grid_w = min(w, max(2, round(n * w / max(h, w))) + 1)
        grid = rng.standard_normal((grid_h, grid_w)).astype(np.float32)
        out += amplitude * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        amplitude *= persistence
    return (out - out.mean()) / (out.std() + 1e-6)


def _hsv(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float],
         val: tuple[float, float]) -> np.ndarray:
    """RGB float colour from HSV ranges; hue in degrees, ranges may run past 360 to wrap."""
    h = (rng.uniform(*hue) % 360) / 360
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val)), np.float32)


def _choose_color(rng: np.random.Generator, palette: list[tuple[float, tuple, tuple, tuple]]) -> np.ndarray:
    """Pick one (weight, hue, sat, val) entry of a palette by weight, then sample a colour in it."""
    weights = np.array([entry[0] for entry in palette])
    _, hue, sat, val = palette[rng.choice(len(palette), p=weights / weights.sum())]
    return _hsv(rng, hue, sat, val)


def _fill(s: int, color: np.ndarray) -> np.ndarray:
    return np.tile(color.astype(np.float32), (s, s, 1))


def _scale(image: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """image * factor with a per-pixel [H, W] factor."""
    return image * cv2.merge([np.asarray(factor, np.float32)] * 3)


def _mix(base: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend `color` (a colour or an image) over `base` with a per-pixel alpha map."""
    # Explicit 3-channel arrays: numpy broadcasting over a trailing axis of 3 is several times slower.
    alpha3 = cv2.merge([np.asarray(alpha, np.float32)] * 3)
    if np.ndim(color) == 1:
        color = np.tile(np.asarray(color, np.float32), (*base.shape[:2], 1))
    return base + (color - base) * alpha3


def _strokes(s: int, draw: Callable[[np.ndarray], None], blur: float = 0.0) -> np.ndarray:
    """Float [0, 1] alpha map of whatever `draw` paints (value 255, anti-aliased) on an s x s canvas.

    OpenCV only anti-aliases on 8-bit images, so decorations are drawn as masks and blended.
    """
    canvas = np.zeros((s, s), np.uint8)
    draw(canvas)
    alpha = canvas.astype(np.float32) / 255
    return cv2.GaussianBlur(alpha, (0, 0), blur) if blur > 0 else alpha


def _pt(x: float, y: float) -> tuple[int, int]:
    """Point for OpenCV drawing with 4 fractional bits (shift=4)."""
    return int(round(x * 16)), int(round(y * 16))


def _line(canvas: np.ndarray, p: tuple[float, float], q: tuple[float, float], thickness: float) -> None:
    cv2.line(canvas, _pt(*p), _pt(*q), 255, max(1, int(round(thickness))), cv2.LINE_AA, 4)


def _shade_cylinder(t: np.ndarray, highlight_at: float, highlight_width: float) -> tuple[np.ndarray, np.ndarray]:
    """(shading, specular) profiles across a cylinder; t runs 0..1 from one side to the other."""
    t = np.clip(t, 0, 1)
    shading = 0.45 + 0.6 * np.clip(np.sin(np.pi * t), 0, 1) ** 0.7
    specular = np.exp(-(((t - highlight_at) / highlight_width) ** 2))
    return shading.astype(np.float32), specular.astype(np.float32)


def _add_highlight(tex: np.ndarray, strength: np.ndarray) -> np.ndarray:
    return tex + _scale(1 - tex, strength)


# ---------------------------------------------------------------------------------------------
# Shape helpers (local sprite canvas coordinates)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Sprite:
    polygon: np.ndarray  # (N, 2) float outline on the local canvas
    texture: np.ndarray  # (S, S, 3) float RGB in [0, 1]; only meaningful inside the outline
    opacity: np.ndarray | float = 1.0  # (S, S) map or a constant


def _canvas(size: float) -> tuple[int, float, np.ndarray, np.ndarray]:
    """Side, centre and (x, y) pixel-coordinate grids of a square canvas holding an object of extent size."""
    s = int(np.ceil(size * 1.15)) + 8
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    return s, s / 2, xx, yy


def _radial_polygon(rng: np.random.Generator, n_points: int, harmonics: int, roughness: float,
                    aspect: float = 1.0) -> np.ndarray:
    """Unit-extent star-shaped outline r(theta) = 1 + sum of random low harmonics."""
    theta = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, harmonics + 2):
        r += roughness * rng.standard_normal() / k ** 0.7 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.35, None)
    points = np.stack([r * np.cos(theta) * aspect, r * np.sin(theta)], axis=1)
    return points / np.abs(points).max()


def _jagged_polygon(rng: np.random.Generator, n_vertices: int, min_radius: float) -> np.ndarray:
    """Unit-extent polygon with straight edges and randomly varying radius."""
    angles = (np.arange(n_vertices) + rng.uniform(-0.35, 0.35, n_vertices)) * 2 * np.pi / n_vertices
    radii = rng.uniform(min_radius, 1.0, n_vertices)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return points / np.abs(points).max()


def _chaikin(points: np.ndarray, iterations: int) -> np.ndarray:
    """Corner-cutting smoothing of a closed polygon."""
    for _ in range(iterations):
        following = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * following, 0.25 * points + 0.75 * following],
                          axis=1).reshape(-1, 2)
    return points


def _rect(cx: float, cy: float, w: float, h: float) -> np.ndarray:
    return np.array([[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2],
                     [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]], np.float64)


def _local_mask(s: int, polygon: np.ndarray) -> np.ndarray:
    mask = np.zeros((s, s), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return mask


# ---------------------------------------------------------------------------------------------
# One drawing function per class: (rng, size in pixels) -> _Sprite
# ---------------------------------------------------------------------------------------------

def _draw_general_trash(rng: np.random.Generator, size: float) -> _Sprite:
    """Crumpled junk: jagged polygon, patches of 2-3 unrelated colours, crease lines."""
    s, c, _, _ = _canvas(size)
    polygon = c + size / 2 * _jagged_polygon(rng, int(rng.integers(6, 11)), 0.45)
    colors = [_hsv(rng, (0, 360), (0.15, 0.75), (0.25, 0.85)) for _ in range(int(rng.integers(2, 4)))]
    regions = _value_noise(rng, s, s, 2.5, octaves=2)
    edges = np.quantile(regions, np.linspace(0, 1, len(colors) + 1)[1:-1])
    tex = np.array(colors, np.float32)[np.digitize(regions, edges)]
    tex = cv2.GaussianBlur(tex, (0, 0), 0.8)
    creases = np.abs(_value_noise(rng, s, s, 5, octaves=2)) < 0.1
    shading = 1 + 0.12 * _value_noise(rng, s, s, 4) - 0.25 * creases
    return _Sprite(polygon, _scale(tex, shading))


def _draw_paper(rng: np.random.Generator, size: float) -> _Sprite:
    """A sheet: thin rectangle, white/cream or pastel, printed text lines, maybe a dog-ear and crease."""
    s, c, xx, yy = _canvas(size)
    w, h = size, size * rng.uniform(0.5, 0.78)
    corners = _rect(c, c, w, h) + rng.normal(0, 0.015 * size, (4, 2))
    if rng.random() < 0.35:  # dog-ear: cut one corner
        k = int(rng.integers(4))
        cut = 0.12 * h
        before, after = corners[k - 1], corners[(k + 1) % 4]
        a = corners[k] + cut * (before - corners[k]) / np.linalg.norm(before - corners[k])
        b = corners[k] + cut * (after - corners[k]) / np.linalg.norm(after - corners[k])
        corners = np.concatenate([corners[:k], [a, b], corners[k + 1:]])
    base = _choose_color(rng, [(3, (30, 60), (0.0, 0.12), (0.8, 0.97)),
                               (1, (0, 360), (0.12, 0.35), (0.75, 0.95))])
    tex = _scale(_fill(s, base), 1 + 0.03 * _value_noise(rng, s, s, s / 3, octaves=1))

    ink = _hsv(rng, (200, 260), (0.0, 0.5), (0.05, 0.35))
    spacing = max(3.0, h * rng.uniform(0.05, 0.09))
    margin = 0.12 * w

    def text_lines(canvas: np.ndarray) -> None:
        y = c - h / 2 + margin
        while y < c + h / 2 - margin:
            x = c - w / 2 + margin
            while x < c + w / 2 - margin:
                length = rng.uniform(0.03, 0.12) * w
                _line(canvas, (x, y), (min(x + length, c + w / 2 - margin), y), 1)
                x += length + rng.uniform(0.015, 0.03) * w
            y += spacing

    tex = _mix(tex, ink, rng.uniform(0.4, 0.7) * _strokes(s, text_lines))
    angle = rng.uniform(0, np.pi)
    side = (xx - c) * np.cos(angle) + (yy - c) * np.sin(angle) > rng.uniform(-0.2, 0.2) * w
    tex = _scale(tex, np.where(side, rng.uniform(0.88, 0.96), 1.0))
    return _Sprite(corners, tex)


def _draw_paper_pack(rng: np.random.Generator, size: float) -> _Sprite:
    """A carton: boxy quadrilateral in perspective, fold line near the top, printed colour band."""
    s, c, xx, yy = _canvas(size)
    h, w = size, size * rng.uniform(0.5, 0.72)
    top_w = w * rng.uniform(0.82, 1.1)
    corners = np.array([[c - top_w / 2, c - h / 2], [c + top_w / 2, c - h / 2],
                        [c + w / 2, c + h / 2], [c - w / 2, c + h / 2]]) + rng.normal(0, 0.01 * size, (4, 2))
    base = _choose_color(rng, [(1, (25, 40), (0.35, 0.6), (0.5, 0.75)),    # cardboard
                               (1, (0, 360), (0.0, 0.1), (0.8, 0.95))])    # white carton
    tex = _scale(_fill(s, base), 1 + 0.05 * _value_noise(rng, s, s, 6, octaves=2))

    band_top, band_bottom = c - h * rng.uniform(0.0, 0.1), c + h * rng.uniform(0.2, 0.35)
    band = ((yy > band_top) & (yy < band_bottom)).astype(np.float32)
    tex = _mix(tex, _hsv(rng, (0, 360), (0.55, 0.95), (0.45, 0.9)), 0.9 * cv2.GaussianBlur(band, (0, 0), 0.7))
    logo_r = 0.25 * (band_bottom - band_top)
    logo_x = c + rng.uniform(-0.2, 0.2) * w
    logo = _strokes(s, lambda m: cv2.circle(m, _pt(logo_x, (band_top + band_bottom) / 2),
                                            int(logo_r * 16), 255, -1, cv2.LINE_AA, 4))
    tex = _mix(tex, _hsv(rng, (0, 360), (0.0, 0.9), (0.7, 1.0)), logo)

    fold_y = c - h / 2 + h * rng.uniform(0.14, 0.28)
    tex = _scale(tex, np.where(yy < fold_y, rng.uniform(0.7, 0.85), 1.0))
    fold = _strokes(s, lambda m: _line(m, (0, fold_y), (s, fold_y), max(1.0, size / 60)), blur=0.6)
    edge_x = c + rng.uniform(-0.25, 0.25) * w  # vertical box edge: the side face is darker
    tex = _scale(tex, np.where(xx > edge_x, rng.uniform(0.8, 0.92), 1.0))
    return _Sprite(corners, _scale(tex, 1 - 0.4 * fold))


def _draw_metal(rng: np.random.Generator, size: float) -> _Sprite:
    """A can: side view (cylinder with elliptic ends) or top view (ellipse with rim), specular highlight."""
    if rng.random() < 0.3:
        return _draw_can_top(rng, size)
    s, c, xx, yy = _canvas(size)
    diameter = size * rng.uniform(0.38, 0.52)
    cap = diameter * rng.uniform(0.12, 0.22)  # half-width of the elliptic end caps
    x0, x1 = c - size / 2 + cap, c + size / 2 - cap
    phi = np.linspace(-np.pi / 2, np.pi / 2, 12)
    right = np.stack([x1 + cap * np.cos(phi), c + diameter / 2 * np.sin(phi)], axis=1)
    left = np.stack([x0 - cap * np.cos(phi), c - diameter / 2 * np.sin(phi)], axis=1)
    polygon = np.concatenate([right, left]) + rng.normal(0, 0.006 * size, (24, 2))

    silver = _hsv(rng, (180, 240), (0.0, 0.08), (0.6, 0.85))
    body = silver if rng.random() < 0.45 else _hsv(rng, (0, 360), (0.5, 0.9), (0.35, 0.85))
    tex = _fill(s, body)
    label_edge = cap * 1.6
    ends = (xx < x0 + label_edge - cap) | (xx > x1 - label_edge + cap)
    tex[ends] = silver
    stripe = np.abs(xx - (c + rng.uniform(-0.15, 0.15) * size)) < size * rng.uniform(0.03, 0.08)
    tex = _mix(tex, _hsv(rng, (0, 360), (0.0, 0.6), (0.8, 1.0)), stripe & ~ends)

    shading, specular = _shade_cylinder((yy - (c - diameter / 2)) / diameter, rng.uniform(0.22, 0.38), 0.07)
    brushed = cv2.resize(rng.standard_normal((s, 1)).astype(np.float32), (s, s))
    tex = _scale(tex, shading * (1 + 0.04 * brushed))
    return _Sprite(polygon, _add_highlight(tex, 0.85 * specular))


def _draw_can_top(rng: np.random.Generator, size: float) -> _Sprite:
    """A can seen from above: silver ellipse with a rim ring, pull tab and glint."""
    s, c, xx, yy = _canvas(size)
    rx, ry = size * 0.36, size * 0.36 * rng.uniform(0.8, 1.0)
    phi = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    polygon = np.stack([c + rx * np.cos(phi), c + ry * np.sin(phi)], axis=1)
    r = np.sqrt(((xx - c) / rx) ** 2 + ((yy - c) / ry) ** 2)
    tex = _fill(s, _hsv(rng, (180, 240), (0.0, 0.08), (0.55, 0.85)))
    rim = np.exp(-(((r - 0.88) / 0.05) ** 2))
    tab = (np.abs(xx - c) < rx * 0.12) & (yy > c - ry * 0.55) & (yy < c)
    shading = 0.75 + 0.25 * (1 - r) - 0.25 * tab + 0.25 * rim
    tex = _scale(tex, shading)
    glint = np.exp(-(((xx - c + 0.4 * rx) ** 2 + (yy - c + 0.4 * ry) ** 2) / (0.08 * rx * rx)))
    return _Sprite(polygon, _add_highlight(tex, 0.7 * glint))


def _draw_glass(rng: np.random.Generator, size: float) -> _Sprite:
    """A bottle: body, shoulder and neck; tinted and semi-transparent, darker rims, a glint streak."""
    s, c, xx, yy = _canvas(size)
    half_body = size * rng.uniform(0.13, 0.19)
    half_neck = half_body * rng.uniform(0.33, 0.45)
    x_bottom, x_mouth = c - size / 2, c + size / 2
    x_body = x_bottom + size * rng.uniform(0.5, 0.6)
    x_shoulder = x_body + size * rng.uniform(0.1, 0.16)
    u = np.linspace(0, 1, 7)
    profile = np.array(
        [(x_bottom, 0.85 * half_body), (x_bottom + 0.03 * size, half_body), (x_body, half_body)]
        + [(x_body + t * (x_shoulder - x_body), half_neck + (half_body - half_neck) * (0.5 + 0.5 * np.cos(np.pi * t)))
           for t in u[1:]]
        + [(x_mouth - 0.04 * size, half_neck), (x_mouth - 0.04 * size, 1.2 * half_neck), (x_mouth, 1.2 * half_neck)])
    polygon = np.concatenate([np.stack([profile[:, 0], c - profile[:, 1]], axis=1),
                              np.stack([profile[::-1, 0], c + profile[::-1, 1]], axis=1)])

    tint = _choose_color(rng, [(3, (90, 150), (0.45, 0.85), (0.35, 0.7)),    # green
                               (2, (22, 38), (0.6, 0.9), (0.3, 0.55)),      # brown
                               (2, (170, 220), (0.05, 0.25), (0.7, 0.95))])  # clear
    depth = cv2.distanceTransform(_local_mask(s, polygon), cv2.DIST_L2, 3)
    rim = np.exp(-depth / max(1.0, 0.12 * half_body))
    tex = _scale(_fill(s, tint), 0.8 - 0.35 * rim)
    opacity = np.clip(rng.uniform(0.5, 0.68) + 0.35 * rim, 0, 1)

    glint_y = c - half_body * rng.uniform(0.35, 0.6)
    glint = _strokes(s, lambda m: _line(m, (x_bottom + 0.06 * size, glint_y), (x_body, glint_y),
                                        0.15 * half_body), blur=0.8)
    tex = _add_highlight(tex, 0.9 * glint)
    opacity = np.maximum(opacity, 0.9 * glint)
    if rng.random() < 0.45:  # paper label on the body
        label = ((xx > x_bottom + 0.12 * size) & (xx < x_body - 0.05 * size)).astype(np.float32)
        tex = _mix(tex, _hsv(rng, (0, 360), (0.0, 0.7), (0.6, 0.95)), label)
        opacity = np.maximum(opacity, label)
    return _Sprite(polygon, tex, opacity.astype(np.float32))


def _draw_plastic(rng: np.random.Generator, size: float) -> _Sprite:
    """A container or lid: smooth convex rounded outline, glossy, saturated or clear."""
    s, c, xx, yy = _canvas(size)
    corners = _jagged_polygon(rng, int(rng.integers(5, 9)), 0.5).astype(np.float32)
    outline = _chaikin(cv2.convexHull(corners)[:, 0, :].astype(np.float64), 3)
    outline[:, 0] *= rng.uniform(1.0, 1.8)
    polygon = c + size / 2 * outline / np.abs(outline).max()
    clear = rng.random() < 0.35
    color = (_hsv(rng, (180, 230), (0.03, 0.2), (0.8, 0.97)) if clear
             else _hsv(rng, (0, 360), (0.45, 0.9), (0.5, 0.95)))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - c) * np.cos(angle) + (yy - c) * np.sin(angle)) / size
    tex = _scale(_fill(s, color), 1 + 0.35 * ramp)
    hx, hy = c + rng.uniform(-0.2, 0.2) * size, c + rng.uniform(-0.2, 0.2) * size
    glint = np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.12 * size) ** 2))
    tex = _add_highlight(tex, 0.55 * glint)
    if rng.random() < 0.4:  # moulded ribs
        period = size * rng.uniform(0.08, 0.14)
        ribs = np.abs(np.sin(np.pi * (xx - c) / period)) ** 8
        tex = _add_highlight(tex, 0.3 * ribs)
    opacity = rng.uniform(0.6, 0.8) if clear else rng.uniform(0.92, 1.0)
    return _Sprite(polygon, tex, opacity)


def _draw_styrofoam(rng: np.random.Generator, size: float) -> _Sprite:
    """Foam: bright white blob or chipped block with bead speckle."""
    s, c, xx, yy = _canvas(size)
    if rng.random() < 0.5:
        outline = _radial_polygon(rng, 40, 4, 0.15, aspect=rng.uniform(1.0, 1.5))
    else:
        outline = _chaikin(_rect(0, 0, rng.uniform(1.2, 1.8), 1.0), 1)
        outline = _resample_closed(outline, 36)
        outline += rng.normal(0, 0.025, outline.shape)
    polygon = c + size / 2 * outline / np.abs(outline).max()
    tex = _fill(s, _hsv(rng, (0, 360), (0.0, 0.05), (0.86, 0.98)))
    beads = np.abs(_value_noise(rng, s, s, max(2.0, size / 6), octaves=1)) < 0.15
    specks = cv2.GaussianBlur((rng.random((s, s)) < 0.05).astype(np.float32), (0, 0), 0.6)
    shading = 1 + 0.05 * _value_noise(rng, s, s, 3, octaves=2) - 0.07 * beads - 0.35 * specks
    return _Sprite(polygon, _scale(tex, shading))


def _resample_closed(points: np.ndarray, n: int) -> np.ndarray:
    """n points evenly spaced along a closed polyline."""
    closed = np.concatenate([points, points[:1]])
    cumulative = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    targets = np.linspace(0, cumulative[-1], n, endpoint=False)
    return np.stack([np.interp(targets, cumulative, closed[:, i]) for i in range(2)], axis=1)


def _draw_plastic_bag(rng: np.random.Generator, size: float) -> _Sprite:
    """A bag: wrinkly irregular blob with ridge-like folds and glossy creases."""
    s, c, _, _ = _canvas(size)
    polygon = c + size / 2 * _radial_polygon(rng, 72, 10, 0.22, aspect=rng.uniform(0.8, 1.3))
    color = _choose_color(rng, [(3, (0, 360), (0.0, 0.08), (0.8, 0.95)),   # white
                                (1.5, (0, 360), (0.0, 0.2), (0.08, 0.2)),  # black
                                (5, (0, 360), (0.4, 0.85), (0.5, 0.9))])   # coloured
    folds = _value_noise(rng, s, s, 3, octaves=2, persistence=0.4)
    ridges = 1 - np.abs(np.sin(folds * rng.uniform(1.2, 1.9)))  # ridge lines where the film folds
    shading = 0.72 + 0.3 * ridges + 0.08 * _value_noise(rng, s, s, 1.5, octaves=1)
    tex = _scale(_fill(s, color), shading)
    tex = _add_highlight(tex, 0.35 * cv2.GaussianBlur(np.clip((ridges - 0.85) / 0.15, 0, 1), (0, 0), 1.0))
    dark = color.max() < 0.25
    return _Sprite(polygon, tex, 0.97 if dark else rng.uniform(0.75, 0.92))


def _draw_battery(rng: np.random.Generator, size: float) -> _Sprite:
    """A cell: small rounded rectangle with a coloured band at the + end and a terminal nub."""
    s, c, xx, yy = _canvas(size)
    width = size * rng.uniform(0.3, 0.42)
    nub_len, nub_h = size * 0.05, width * 0.38
    x0, x1 = c - size / 2, c + size / 2 - nub_len
    y0, y1 = c - width / 2, c + width / 2
    r = width * 0.2
    phi = np.linspace(np.pi / 2, np.pi, 5)  # rounded corners at the - end
    polygon = np.concatenate([
        [[x1, y0], [x1, c - nub_h / 2], [x1 + nub_len, c - nub_h / 2],
         [x1 + nub_len, c + nub_h / 2], [x1, c + nub_h / 2], [x1, y1]],
        np.stack([x0 + r + r * np.cos(phi), y1 - r + r * np.sin(phi)], axis=1),
        np.stack([x0 + r + r * np.cos(phi + np.pi / 2), y0 + r + r * np.sin(phi + np.pi / 2)], axis=1),
    ])
    body = _choose_color(rng, [(2, (0, 360), (0.0, 0.15), (0.06, 0.2)),
                               (2, (0, 360), (0.6, 0.9), (0.4, 0.8)),
                               (1, (180, 240), (0.0, 0.06), (0.6, 0.8))])
    band = _choose_color(rng, [(2, (25, 45), (0.5, 0.8), (0.6, 0.9)), (1, (0, 360), (0.0, 0.15), (0.06, 0.2))])
    tex = _fill(s, body)
    band_start = x1 - size * rng.uniform(0.2, 0.35)
    tex[xx > band_start] = band
    tex[xx > x1] = _hsv(rng, (180, 240), (0.0, 0.06), (0.65, 0.85))
    shading, specular = _shade_cylinder((yy - y0) / width, rng.uniform(0.25, 0.4), 0.1)
    return _Sprite(polygon, _add_highlight(_scale(tex, shading), 0.7 * specular))


def _draw_clothing(rng: np.random.Generator, size: float) -> _Sprite:
    """Cloth: large irregular outline, stripes / check / plain weave, soft folds."""
    s, c, xx, yy = _canvas(size)
    polygon = c + size / 2 * _radial_polygon(rng, 56, 6, 0.25, aspect=rng.uniform(1.0, 1.5))
    first = _hsv(rng, (0, 360), (0.2, 0.85), (0.25, 0.85))
    second = _hsv(rng, (0, 360), (0.0, 0.85), (0.2, 0.95))
    angle = rng.uniform(0, np.pi)
    u = (xx - c) * np.cos(angle) + (yy - c) * np.sin(angle)
    v = -(xx - c) * np.sin(angle) + (yy - c) * np.cos(angle)
    period = size * rng.uniform(0.05, 0.12)
    pattern = rng.choice(["stripes", "check", "plain"], p=[0.45, 0.35, 0.2])
    if pattern == "stripes":
        amount = np.clip(2 * np.sin(2 * np.pi * u / period) + 0.5, 0, 1)
    elif pattern == "check":
        amount = 0.5 * ((np.sin(2 * np.pi * u / period) > 0) + (np.sin(2 * np.pi * v / period) > 0))
    else:
        amount = np.zeros_like(u)
    tex = _mix(_fill(s, first), second, cv2.GaussianBlur(amount.astype(np.float32), (0, 0), 0.6))
    weave = 0.5 * (np.sin(2.2 * u) + np.sin(2.2 * v))  # fine thread pattern, ~3 px
    folds = _value_noise(rng, s, s, 3, octaves=2)
    creases = np.clip(1 - np.abs(_value_noise(rng, s, s, 4, octaves=2)) / 0.12, 0, 1)
    shading = 1 + 0.05 * weave + 0.15 * folds - 0.3 * creases
    return _Sprite(polygon, _scale(tex, shading))


SHAPE_DRAWERS: dict[str, Callable[[np.random.Generator, float], _Sprite]] = {
    "General trash": _draw_general_trash,
    "Paper": _draw_paper,
    "Paper pack": _draw_paper_pack,
    "Metal": _draw_metal,
    "Glass": _draw_glass,
    "Plastic": _draw_plastic,
    "Styrofoam": _draw_styrofoam,
    "Plastic bag": _draw_plastic_bag,
    "Battery": _draw_battery,
    "Clothing": _draw_clothing,
}


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------

def _place_objects(rng: np.random.Generator, classes: list[int], height: int, width: int) -> list[_PlacedObject]:
    placed: list[_PlacedObject] = []
    for class_index in classes:
        name = CATEGORIES[class_index]
        size = rng.uniform(*SIZE_RANGES[name]) * min(height, width)
        sprite = SHAPE_DRAWERS[name](rng, size)
        obj = _find_spot(rng, sprite, class_index + 1, placed, height, width)
        if obj is not None:
            placed.append(obj)
    return placed


def _find_spot(rng: np.random.Generator, sprite: _Sprite, category_id: int, placed: list[_PlacedObject],
               height: int, width: int, tries: int = 25) -> _PlacedObject | None:
    """Try random poses; return the first acceptable one, else the least bad valid one."""
    best, best_badness = None, np.inf
    taken_areas = {obj.area for obj in placed}
    full_area = _shoelace_area(sprite.polygon)
    for _ in range(tries):
        obj = _pose(rng, sprite, category_id, height, width)
        if obj.area < max(1.0, 0.25 * full_area) or obj.area in taken_areas:  # distinct: no paint-order ties
            continue
        hidden = max((_hidden_fraction(obj, other) for other in placed), default=0.0)
        outside = 1 - obj.area / full_area
        badness = max(hidden / MAX_HIDDEN_FRACTION, outside / (1 - MIN_INSIDE_FRACTION))
        if badness <= 1:
            return obj
        if badness < best_badness:
            best, best_badness = obj, badness
    return best


def _pose(rng: np.random.Generator, sprite: _Sprite, category_id: int, height: int, width: int) -> _PlacedObject:
    s = sprite.texture.shape[0]
    centre = np.array([rng.uniform(0.08, 0.92) * width, rng.uniform(0.08, 0.92) * height])
    matrix = cv2.getRotationMatrix2D((s / 2, s / 2), rng.uniform(0, 360), 1.0)
    matrix[:, 2] += centre - s / 2
    points = sprite.polygon @ matrix[:, :2].T + matrix[:, 2]
    points = np.clip(points, 0, [width, height])
    polygon = [round(float(v), 2) for v in points.ravel()]
    mask = _polygon_mask(polygon, height, width)
    return _PlacedObject(category_id, polygon, mask, int(mask.sum()), sprite, matrix)


def _polygon_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """The mask COCO.annToMask produces for this polygon."""
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return mask_utils.decode(rle).astype(bool)


def _shoelace_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _hidden_fraction(a: _PlacedObject, b: _PlacedObject) -> float:
    """Fraction of the larger of two objects that the smaller one covers."""
    overlap = np.count_nonzero(a.mask & b.mask)
    return overlap / max(a.area, b.area) if overlap else 0.0


# ---------------------------------------------------------------------------------------------
# Background, compositing, camera
# ---------------------------------------------------------------------------------------------

def _render_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float RGB surface with gradient, noise texture and non-object clutter."""
    style = rng.choice(["floor", "wood", "belt", "concrete"])
    first = _hsv(rng, (0, 360), (0.05, 0.4), (0.3, 0.75))
    second = first * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx * np.cos(angle) + yy * np.sin(angle)) / max(h, w) + 1) / 2
    image = _mix(np.tile(first, (h, w, 1)), second, np.clip(ramp, 0, 1))
    texture = 0.1 * _value_noise(rng, h, w, 4, octaves=4) + 0.03 * _value_noise(rng, h, w, max(h, w) / 3, 1)
    if style == "wood":
        grain = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(0.15, 0.4)
                       + 4 * _value_noise(rng, h, w, 2, octaves=2))
        texture += 0.08 * grain
    elif style == "belt":
        period = rng.uniform(6, 14)
        texture += 0.1 * (np.sin(2 * np.pi * (yy if rng.random() < 0.5 else xx) / period) > 0.6)
        image *= 0.6
    elif style == "concrete":
        texture += 0.12 * (rng.random((h, w)) < 0.04) * rng.choice([-1, 1]) + 0.06 * _value_noise(rng, h, w, 12, 2)
    image = _scale(image, 1 + texture)
    return _add_clutter(rng, np.clip(image, 0, 1).astype(np.float32))


def _add_clutter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Stains, streaks and crumbs: visible, sometimes colourful, but never labelled."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(1, 5))):
        centre = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        axes = np.array([rng.uniform(0.04, 0.2) * w, rng.uniform(0.04, 0.2) * h])
        angle = rng.uniform(0, 180)
        blur = rng.uniform(2, 8)
        color = _hsv(rng, (0, 360), (0.0, 0.7), (0.1, 0.9))
        strength = rng.uniform(0.15, 0.45)
        ellipse = lambda m, offset: cv2.ellipse(m, _pt(*(centre - offset)), tuple(int(a * 16) for a in axes),
                                                angle, 0, 360, 255, -1, cv2.LINE_AA, 4)
        _stamp(image, np.array([centre - axes.max(), centre + axes.max()]), 3 * blur, ellipse, blur, color, strength)
    for _ in range(int(rng.integers(1, 7))):
        points = np.cumsum(rng.normal(0, 0.12 * max(h, w), (4, 2)), axis=0) + [rng.uniform(0, w), rng.uniform(0, h)]
        thickness = int(rng.integers(1, 4))
        color = _hsv(rng, (0, 360), (0.0, 0.5), (0.05, 0.95))
        strength = rng.uniform(0.2, 0.55)
        polyline = lambda m, offset: cv2.polylines(m, [np.round((points - offset) * 16).astype(np.int32)], False,
                                                   255, thickness, cv2.LINE_AA, 4)
        _stamp(image, points, thickness + 3, polyline, 0.8, color, strength)
    crumbs = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(0, 25))):
        cv2.circle(crumbs, _pt(rng.uniform(0, w), rng.uniform(0, h)), int(rng.uniform(0.5, 2.5) * 16),
                   255, -1, cv2.LINE_AA, 4)
    return _mix(image, _hsv(rng, (0, 360), (0.0, 0.6), (0.1, 0.9)), 0.7 * crumbs.astype(np.float32) / 255)


def _crop_box(points: np.ndarray, margin: float, h: int, w: int) -> tuple[int, int, int, int] | None:
    """Integer (x0, y0, x1, y1) around points plus margin, clipped to the image; None if empty."""
    x0, y0 = np.floor(points.min(axis=0) - margin).astype(int)
    x1, y1 = np.ceil(points.max(axis=0) + margin).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _stamp(image: np.ndarray, points: np.ndarray, margin: float, draw: Callable[[np.ndarray, np.ndarray], None],
           blur: float, color: np.ndarray, strength: float) -> None:
    """Blend a blurred drawn shape into image in place, touching only the shape's bounding box."""
    box = _crop_box(points, margin, *image.shape[:2])
    if box is None:
        return
    x0, y0, x1, y1 = box
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    draw(canvas, np.array([x0, y0], np.float64))
    alpha = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), blur)
    image[y0:y1, x0:x1] = _mix(image[y0:y1, x0:x1], color, strength * alpha)


def _composite(rng: np.random.Generator, image: np.ndarray, obj: _PlacedObject,
               shadow_offset: np.ndarray) -> np.ndarray:
    """Drop shadow, then the object's texture through its (slightly softened) annotation mask.

    Works in place on the object's bounding box (plus room for the shadow) to stay fast.
    """
    shadow_blur = rng.uniform(1.5, 3.5)
    shadow_strength = rng.uniform(0.25, 0.45)
    outline = np.array(obj.polygon).reshape(-1, 2)
    box = _crop_box(outline, np.abs(shadow_offset).max() + 3 * shadow_blur + 2, *image.shape[:2])
    x0, y0, x1, y1 = box
    size = (x1 - x0, y1 - y0)
    crop = image[y0:y1, x0:x1]
    mask = obj.mask[y0:y1, x0:x1].astype(np.float32)

    shift = np.float32([[1, 0, shadow_offset[0]], [0, 1, shadow_offset[1]]])
    shadow = cv2.GaussianBlur(cv2.warpAffine(mask, shift, size), (0, 0), shadow_blur)
    crop *= cv2.merge([1 - shadow_strength * shadow] * 3)

    matrix = obj.matrix - [[0, 0, x0], [0, 0, y0]]  # sprite canvas -> crop coordinates
    texture = cv2.warpAffine(obj.sprite.texture, matrix, size, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    texture = _scale(texture, _light_ramp(outline - [x0, y0], shadow_offset, size))
    alpha = cv2.GaussianBlur(mask, (0, 0), 0.6)
    if isinstance(obj.sprite.opacity, np.ndarray):
        alpha *= cv2.warpAffine(obj.sprite.opacity, matrix, size, borderMode=cv2.BORDER_REPLICATE)
    else:
        alpha *= obj.sprite.opacity
    image[y0:y1, x0:x1] = _mix(crop, np.clip(texture, 0, 1), alpha)
    return image


def _light_ramp(outline: np.ndarray, shadow_offset: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Brightness factor across an object: lighter on the side facing the light (away from its shadow)."""
    toward_light = -shadow_offset / np.linalg.norm(shadow_offset)
    extent = max(float(np.ptp(outline, axis=0).max()), 1.0)
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    centre = outline.mean(axis=0)
    along = ((xx - centre[0]) * toward_light[0] + (yy - centre[1]) * toward_light[1]) / extent
    return 1 + 0.25 * np.clip(along, -0.6, 0.6)


def _apply_camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Uneven light, vignette, colour cast, slight blur and sensor noise; returns uint8."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    light = (rng.uniform(0.85, 1.12) * (1 + 0.12 * _value_noise(rng, h, w, 1.5, octaves=2))
             * (1 - rng.uniform(0.05, 0.25) * radius2 / 2))
    cast = 1 + rng.normal(0, 0.04, 3).astype(np.float32)
    image = _scale(image, light) * cast
    if rng.random() < 0.4:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 0.8))
    image += rng.uniform(0.008, 0.025) * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_sample_root()
    generate_sample_dataset(target)
