"""Bad-data validation: every problem is found before training, named on one line; odd-but-valid
images (grey, RGBA, EXIF-rotated) are read correctly; --skip-bad leaves bad images out."""
import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipeline.coco import CocoSegmentation
from data_pipeline.validate import (check_usable, compressed_rle_counts, format_warning, segmentation_problem,
                                    validate_dataset)
from errors import UserError


@pytest.fixture
def root(sample_root, tmp_path):
    """A private copy of the sample dataset, free to damage."""
    return shutil.copytree(sample_root, tmp_path / "data")


def _edit(root, change, ann="train.json"):
    data = json.loads((root / ann).read_text())
    change(data)
    (root / ann).write_text(json.dumps(data))


def _image(data, image_id):
    return next(image for image in data["images"] if image["id"] == image_id)


def _first_ann_of(data, image_id):
    return next(ann for ann in data["annotations"] if ann["image_id"] == image_id)


def _only_problem(report):
    problems = report.problems()
    assert len(problems) == 1, problems
    assert "\n" not in problems[0]
    return problems[0]


def test_the_sample_dataset_is_valid(root):
    for ann in ("train.json", "val.json", "test.json"):
        report = validate_dataset(root, ann, require_annotations=ann != "test.json")
        assert report.ok, report.problems()
        assert check_usable(report, skip_bad=False) == []
    report = validate_dataset(root, "train.json")
    assert report.num_images == 24 and report.num_annotations > 24


# ---------------------------------------------------------------------------------------------
# Image-level problems
# ---------------------------------------------------------------------------------------------

def test_missing_image(root):
    (root / "batch_01" / "0003.jpg").unlink()
    line = _only_problem(validate_dataset(root, "train.json"))
    assert line.startswith("train.json: batch_01/0003.jpg: image id 3: missing")


def test_file_that_is_not_an_image(root):
    (root / "batch_01" / "0004.jpg").write_text("<html>not found</html>")
    line = _only_problem(validate_dataset(root, "train.json"))
    assert line.startswith("train.json: batch_01/0004.jpg: image id 4: unreadable")


def test_truncated_jpeg_is_caught_although_cv2_reads_it(root):
    path = root / "batch_01" / "0005.jpg"
    path.write_bytes(path.read_bytes()[:-400])
    assert cv2.imread(str(path)) is not None  # why the check exists: cv2 returns a partial image
    line = _only_problem(validate_dataset(root, "train.json"))
    assert "batch_01/0005.jpg: image id 5: unreadable: truncated or corrupt JPEG" in line


def test_truncated_png(root):
    cv2.imwrite(str(root / "batch_01" / "0006.png"), np.full((120, 160, 3), 90, np.uint8))
    data = (root / "batch_01" / "0006.png").read_bytes()
    (root / "batch_01" / "0006.png").write_bytes(data[: len(data) // 2])
    _edit(root, lambda d: _image(d, 6).update(file_name="batch_01/0006.png"))
    line = _only_problem(validate_dataset(root, "train.json"))
    assert line.startswith("train.json: batch_01/0006.png: image id 6: unreadable")


@pytest.mark.parametrize("how, reason", [("dotdot", "path leaves the dataset root"), ("absolute", "path is absolute")])
def test_image_paths_escaping_the_root(root, tmp_path, how, reason):
    outside = tmp_path / "outside.jpg"
    shutil.copy(root / "batch_01" / "0007.jpg", outside)
    name = {"dotdot": "batch_01/../../outside.jpg", "absolute": str(outside)}[how]
    _edit(root, lambda d: _image(d, 7).update(file_name=name))
    line = _only_problem(validate_dataset(root, "train.json"))
    assert line.startswith(f"train.json: {name}: image id 7: {reason}")


def test_a_symbolic_link_inside_the_root_is_followed_wherever_it_points(root, tmp_path):
    # How Kaggle and Colab mount data: the images folder (or a file) is a link to read-only storage.
    elsewhere = tmp_path / "mounted"
    shutil.copytree(root / "batch_01", elsewhere)
    shutil.rmtree(root / "batch_01")
    (root / "batch_01").symlink_to(elsewhere, target_is_directory=True)
    report = validate_dataset(root, "train.json")
    assert report.ok, report.problems()


def test_real_size_differs_from_the_json(root):
    _edit(root, lambda d: _image(d, 8).update(width=161))
    line = _only_problem(validate_dataset(root, "train.json"))
    assert line == ("train.json: batch_01/0008.jpg: image id 8: image is 160x120 (after EXIF orientation) "
                    "but the annotation file says 161x120")


@pytest.mark.parametrize("polygon, reason", [
    ([10, 10, 50, 10], "polygon 0 has 2 point(s), needs at least 3"),
    ([10, 10, 50, 10, 50], "polygon 0 has an odd number of coordinates (5)"),
    ([10, 10, 50, 10, 90, 10, 30, 10], "polygon 0 has zero area"),
    ([10, 10, 50, "x", 50, 50], "polygon 0 is not a flat list of numbers"),
])
def test_degenerate_polygons(root, polygon, reason):
    def damage(data):
        ann = _first_ann_of(data, 9)
        ann["segmentation"] = [polygon]
        damage.ann_id = ann["id"]
    _edit(root, damage)
    line = _only_problem(validate_dataset(root, "train.json"))
    assert line == f"train.json: batch_01/0009.jpg: image id 9: annotation {damage.ann_id}: {reason}"


def test_a_zero_area_sliver_beside_a_real_polygon_is_fine(root):
    _edit(root, lambda d: _first_ann_of(d, 9)["segmentation"].append([5, 5, 6, 6, 5, 5]))
    assert validate_dataset(root, "train.json").ok


def _rle(height, width):
    mask = np.zeros((height, width), np.uint8)
    mask[10:30, 20:60] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [height, width], "counts": rle["counts"].decode()}


@pytest.mark.parametrize("segmentation, reason", [
    ({**_rle(120, 160), "size": [100, 160]}, "size [100, 160] differs from the image's [height, width] [120, 160]"),
    ({"size": [120, 160], "counts": [100, 200]}, "runs cover 300 pixels, the image has 19200"),
    ({"size": [120, 160], "counts": "ab c"}, "counts string has the invalid character ' '"),
    ({"size": [120, 160]}, "counts must be a string or a list of integers"),
    ({**_rle(120, 160), "counts": _rle(120, 160)["counts"] + "U"}, "counts string ends in the middle of a run"),
])
def test_malformed_rle(root, segmentation, reason):
    def damage(data):
        ann = _first_ann_of(data, 10)
        ann["segmentation"] = segmentation
        damage.ann_id = ann["id"]
    _edit(root, damage)
    line = _only_problem(validate_dataset(root, "train.json"))
    assert line == f"train.json: batch_01/0010.jpg: image id 10: annotation {damage.ann_id}: malformed RLE: {reason}"


def test_compressed_rle_parser_matches_pycocotools():
    rng = np.random.default_rng(0)
    for height, width in [(1, 1), (7, 5), (120, 160), (300, 400)]:
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        counts = compressed_rle_counts(mask_utils.encode(np.asfortranarray(mask))["counts"].decode())
        assert sum(counts) == height * width
        runs = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)  # runs alternate 0, 1, 0, ...
        assert np.array_equal(runs.reshape(width, height).T, mask)  # column-major
        assert segmentation_problem({"size": [height, width], "counts": counts}, width, height) is None


# ---------------------------------------------------------------------------------------------
# File-level problems
# ---------------------------------------------------------------------------------------------

def test_annotation_on_unknown_category_or_image(root):
    def damage(data):
        data["annotations"][0]["category_id"] = 99
        data["annotations"][1]["image_id"] = 1234
    _edit(root, damage)
    data = json.loads((root / "train.json").read_text())
    report = validate_dataset(root, "train.json")
    assert report.fatal == [
        f"train.json: annotation {data['annotations'][0]['id']} refers to unknown category id 99",
        f"train.json: annotation {data['annotations'][1]['id']} refers to unknown image id 1234",
    ]


@pytest.mark.parametrize("text, message", [
    ("TRUNCATE", "is not valid JSON (truncated or malformed)"),
    ('{"images": [], "annotations": []}', "has no 'categories' list"),
    ('{"categories": [], "annotations": []}', "has no 'images' list"),
    ('{"images": {}, "categories": [], "annotations": []}', "'images' is an object, not a list"),
    ('[1, 2]', "the top level is a list, not an object"),
])
def test_broken_annotation_files(root, text, message):
    if text == "TRUNCATE":
        text = (root / "train.json").read_text()[:5000]
    (root / "train.json").write_text(text)
    line = _only_problem(validate_dataset(root, "train.json"))
    assert "train.json" in line and message in line


def test_wrong_types_and_missing_fields_name_the_entry(root):
    def damage(data):
        data["images"][2]["width"] = "160"
        del data["annotations"][3]["image_id"]
        data["categories"].append(dict(data["categories"][0]))
    _edit(root, damage)
    data = json.loads((root / "train.json").read_text())
    fatal = validate_dataset(root, "train.json").fatal
    assert len(fatal) == 3 and all("train.json" in line for line in fatal)
    assert "image 2: width '160' is not an integer" in fatal[0]
    assert "category id 1 appears more than once" in fatal[1]
    assert f"annotation {data['annotations'][3]['id']} has no 'image_id'" in fatal[2]


def test_missing_annotations_list_is_fatal_unless_not_required(root):
    _edit(root, lambda d: d.pop("annotations"))
    assert validate_dataset(root, "train.json").fatal == ["train.json has no 'annotations' list"]
    assert validate_dataset(root, "train.json", require_annotations=False).ok


def test_missing_root_or_file_is_fatal(root, tmp_path):
    assert "does not exist" in _only_problem(validate_dataset(tmp_path / "nowhere", "train.json"))
    assert "nope.json does not exist" in _only_problem(validate_dataset(root, "nope.json"))


# ---------------------------------------------------------------------------------------------
# Unusual but valid images
# ---------------------------------------------------------------------------------------------

def _single_image_dataset(tmp_path, file_name, width, height):
    polygon = [1, 1, width - 2, 1, width - 2, height - 2]
    coco = {"images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 10.0,
                             "segmentation": [polygon]}],
            "categories": [{"id": 1, "name": "Paper"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return validate_dataset(tmp_path, "ann.json"), CocoSegmentation(tmp_path, "ann.json")


def test_grayscale_image_is_read_as_rgb(tmp_path):
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((30, 40), 77, np.uint8))
    report, coco = _single_image_dataset(tmp_path, "grey.png", 40, 30)
    assert report.ok, report.problems()
    image = coco.read_image(1)
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8 and (image == 77).all()


def test_rgba_image_is_read_as_rgb(tmp_path):
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)  # RGB
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    report, coco = _single_image_dataset(tmp_path, "rgba.png", 40, 30)
    assert report.ok, report.problems()
    image = coco.read_image(1)
    assert image.shape == (30, 40, 3) and tuple(image[0, 0]) == (200, 100, 50)


def _exif_rotated_jpeg(path):
    """Stored 60 wide x 40 high with a red top-left corner; EXIF orientation 6 (rotate 90 clockwise)."""
    stored = np.full((40, 60, 3), (0, 0, 255), np.uint8)  # blue
    stored[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif)


def test_exif_rotated_image_is_read_in_display_orientation(tmp_path):
    _exif_rotated_jpeg(tmp_path / "rotated.jpg")
    report, coco = _single_image_dataset(tmp_path, "rotated.jpg", 40, 60)  # json describes the rotated image
    assert report.ok, report.problems()
    image = coco.read_image(1)
    assert image.shape == (60, 40, 3)
    # Turning clockwise moves the stored top-left corner to the top-right.
    assert image[3, 36, 0] > 200 and image[3, 36, 2] < 60
    assert image[3, 3, 0] < 60 and image[3, 3, 2] > 200


def test_exif_rotated_image_with_unrotated_json_size_is_a_mismatch(tmp_path):
    _exif_rotated_jpeg(tmp_path / "rotated.jpg")
    report, _ = _single_image_dataset(tmp_path, "rotated.jpg", 60, 40)
    assert "image is 40x60 (after EXIF orientation) but the annotation file says 60x40" in _only_problem(report)


# ---------------------------------------------------------------------------------------------
# Decisions: refuse, or skip the bad images
# ---------------------------------------------------------------------------------------------

def test_fatal_problems_always_refuse(root):
    def damage(data):
        for ann in data["annotations"][:3]:
            ann["category_id"] = 99
    _edit(root, damage)
    report = validate_dataset(root, "train.json")
    for skip_bad in (False, True):
        with pytest.raises(UserError, match=r"train.json cannot be used: .*unknown category id 99 \(and 2 more\)"):
            check_usable(report, skip_bad=skip_bad)


def test_bad_images_refuse_without_skip_bad_and_are_left_out_with_it(root):
    (root / "batch_01" / "0003.jpg").unlink()
    (root / "batch_01" / "0011.jpg").write_bytes(b"junk")
    report = validate_dataset(root, "train.json")
    with pytest.raises(UserError, match=r"2 image\(s\) of train.json cannot be used: .*0003.jpg.* \(and 1 more\); "
                                        r".*--skip-bad") as error:
        check_usable(report, skip_bad=False)
    assert "\n" not in str(error.value)

    skipped = check_usable(report, skip_bad=True)
    assert skipped == ["batch_01/0003.jpg", "batch_01/0011.jpg"]
    warning = format_warning(report)
    assert warning.splitlines()[0] == "warning: leaving out 2 of 24 image(s) of train.json (--skip-bad):"
    assert "batch_01/0003.jpg: image id 3: missing" in warning and "batch_01/0011.jpg: image id 11" in warning

    coco = CocoSegmentation(root, "train.json", skip=frozenset(skipped))
    assert len(coco.image_ids) == 22 and {3, 11}.isdisjoint(coco.image_ids)
    assert all(coco.read_image(i).shape == (120, 160, 3) for i in coco.image_ids)


def test_skip_bad_refuses_when_no_image_is_left(tmp_path):
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "gone.jpg", "width": 4, "height": 4}], "annotations": [],
        "categories": [{"id": 1, "name": "Paper"}]}))
    with pytest.raises(UserError, match="every image of ann.json has problems"):
        check_usable(validate_dataset(tmp_path, "ann.json"), skip_bad=True)


def test_long_warnings_are_capped(root):
    for i in range(5):
        (root / "batch_01" / f"00{i:02d}.jpg").unlink()
    lines = format_warning(validate_dataset(root, "train.json"), limit=2).splitlines()
    assert len(lines) == 4 and lines[-1] == "  ... and 3 more"
