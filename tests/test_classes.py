"""Class maps (rename, merge, drop), the UNKNOWN policy, and the labels they give a COCO file."""
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_pipeline.classes import ClassMap, class_map_for, resolve
from labels import IGNORE
from data_pipeline.coco import CocoSegmentation
from errors import UserError

TRASHCAN = Path("/work/shared/datasets/trashcan-mini")
METAL_PAPER = [{"id": 3, "name": "Paper"}, {"id": 1, "name": "Metal"}]


def _square(ann_id, cat, x0, y0, x1, y1):
    return {"id": ann_id, "image_id": 7, "category_id": cat, "iscrowd": 0, "area": (x1 - x0) * (y1 - y0),
            "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


# A large Paper square (id 3) with a small Metal square (id 1) on top; (35, 55) is background.
PAPER_UNDER_METAL = [_square(1, 1, 20, 10, 30, 20), _square(2, 3, 0, 0, 50, 30)]
ON_METAL, ON_PAPER, OUTSIDE = (15, 25), (5, 5), (35, 55)


def _coco(tmp_path, annotations=(), categories=METAL_PAPER, class_map=None, name="ann.json"):
    """A one-image COCO file (image 7, 60x40 JPEG) read with `class_map`."""
    (tmp_path / "img").mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / "img" / "a.jpg"), np.full((40, 60, 3), 120, np.uint8))
    coco = {"images": [{"id": 7, "file_name": "img/a.jpg", "width": 60, "height": 40}],
            "annotations": list(annotations), "categories": categories}
    (tmp_path / name).write_text(json.dumps(coco))
    return CocoSegmentation(tmp_path, name, class_map=class_map)


def _class_map(tmp_path, text, unknown=None, name="classes.yaml"):
    (tmp_path / name).write_text(text)
    return ClassMap.load(tmp_path / name, unknown=unknown)


def _at(labels, *points):
    return [int(labels[point]) for point in points]


def test_without_a_class_map_classes_are_background_then_categories_in_id_order(tmp_path):
    plain = _coco(tmp_path, PAPER_UNDER_METAL)
    identity = _coco(tmp_path, PAPER_UNDER_METAL, class_map=ClassMap())
    assert plain.class_names == identity.class_names == ["Background", "Metal", "Paper"]
    assert plain.num_classes == 3 and plain.category_ids == [1, 3]
    assert _at(plain.label_map(7), ON_METAL, ON_PAPER, OUTSIDE) == [1, 2, 0]
    assert np.array_equal(plain.label_map(7), identity.label_map(7))


def test_rename_keeps_the_label_position(tmp_path):
    coco = _coco(tmp_path, PAPER_UNDER_METAL, class_map=_class_map(tmp_path, "map: {Paper: Cardboard}"))
    assert coco.class_names == ["Background", "Metal", "Cardboard"]
    assert _at(coco.label_map(7), ON_METAL, ON_PAPER) == [1, 2]


def test_merged_sources_paint_the_same_label(tmp_path):
    class_map = _class_map(tmp_path, "map:\n  Metal: Recyclable\n  Paper: Recyclable\n")
    coco = _coco(tmp_path, PAPER_UNDER_METAL, class_map=class_map)
    assert coco.class_names == ["Background", "Recyclable"]
    assert _at(coco.label_map(7), ON_METAL, ON_PAPER, OUTSIDE) == [1, 1, 0]


@pytest.mark.parametrize("target, painted", [("Background", 0), ("background", 0), ("null", IGNORE)])
def test_a_small_dropped_object_on_a_large_one_is_dropped_where_it_lies(tmp_path, target, painted):
    coco = _coco(tmp_path, PAPER_UNDER_METAL, class_map=_class_map(tmp_path, f"map: {{Metal: {target}}}"))
    assert coco.class_names == ["Background", "Paper"]
    assert _at(coco.label_map(7), ON_METAL, ON_PAPER, OUTSIDE) == [painted, 1, 0]


def test_a_large_ignored_object_stays_under_a_small_class_object(tmp_path):
    coco = _coco(tmp_path, PAPER_UNDER_METAL, class_map=_class_map(tmp_path, "map: {Paper: null}"))
    assert coco.class_names == ["Background", "Metal"]
    assert _at(coco.label_map(7), ON_METAL, ON_PAPER, OUTSIDE) == [1, IGNORE, 0]


@pytest.mark.parametrize("unmapped, painted", [("background", 0), ("ignore", IGNORE)])
def test_unmapped_categories_follow_the_unmapped_policy(tmp_path, unmapped, painted):
    class_map = _class_map(tmp_path, f"map: {{Metal: Metal}}\nunmapped: {unmapped}\n")
    coco = _coco(tmp_path, PAPER_UNDER_METAL, class_map=class_map)
    assert coco.class_names == ["Background", "Metal"]
    assert _at(coco.label_map(7), ON_METAL, ON_PAPER) == [1, painted]


@pytest.mark.parametrize("name", ["unknown", "UNKNOWN"])
@pytest.mark.parametrize("policy, names, painted", [
    ("keep", ["Background", "{name}", "Paper"], [1, 2]),
    ("background", ["Background", "Paper"], [0, 1]),
    ("ignore", ["Background", "Paper"], [IGNORE, 1]),
])
def test_unknown_policy(tmp_path, name, policy, names, painted):
    categories = [{"id": 3, "name": "Paper"}, {"id": 1, "name": name}]  # the unknown object is on top
    from_code = _coco(tmp_path, PAPER_UNDER_METAL, categories, ClassMap().with_unknown(policy))
    from_file = _coco(tmp_path, PAPER_UNDER_METAL, categories,
                      _class_map(tmp_path, f"unknown: {{policy: {policy}}}"))
    expected = [n.format(name=name) for n in names]
    for coco in (from_code, from_file):
        assert coco.class_names == expected
        assert _at(coco.label_map(7), ON_METAL, ON_PAPER) == painted


def test_the_unknown_argument_overrides_the_file_and_names_are_configurable(tmp_path):
    categories = [{"id": 3, "name": "Paper"}, {"id": 1, "name": "Unlabeled"}]
    text = "unknown: {policy: keep, names: [unlabeled, unknown]}"
    coco = _coco(tmp_path, PAPER_UNDER_METAL, categories, _class_map(tmp_path, text, unknown="ignore"))
    assert coco.class_names == ["Background", "Paper"]
    assert _at(coco.label_map(7), ON_METAL) == [IGNORE]
    assert class_map_for(None, "ignore") == ClassMap(unknown_policy="ignore")
    assert class_map_for(tmp_path / "classes.yaml", None).unknown_policy == "keep"
    assert class_map_for(None, None) is None and class_map_for(None, "keep") is None


def test_unknown_background_wins_over_a_map_entry_and_keep_follows_it(tmp_path):
    categories = [{"id": 3, "name": "Paper"}, {"id": 1, "name": "unknown"}]
    text = "map: {unknown: Paper, Paper: Paper}\nunmapped: error\n"
    kept = _coco(tmp_path, PAPER_UNDER_METAL, categories, _class_map(tmp_path, text))
    assert kept.class_names == ["Background", "Paper"]
    assert _at(kept.label_map(7), ON_METAL, ON_PAPER) == [1, 1]
    dropped = _coco(tmp_path, PAPER_UNDER_METAL, categories, _class_map(tmp_path, text, unknown="background"))
    assert _at(dropped.label_map(7), ON_METAL, ON_PAPER) == [0, 1]


def test_classes_fix_the_label_order_and_keep_absent_classes(tmp_path):
    class_map = _class_map(tmp_path, "classes: [Paper, Glass, Metal]\n")
    coco = _coco(tmp_path, PAPER_UNDER_METAL, class_map=class_map)
    assert coco.class_names == ["Background", "Paper", "Glass", "Metal"]
    assert _at(coco.label_map(7), ON_METAL, ON_PAPER) == [3, 1]


def test_without_classes_targets_are_numbered_by_first_appearance_in_id_order():
    categories = [{"id": 9, "name": "Can"}, {"id": 2, "name": "Box"}, {"id": 5, "name": "Tin"}]
    resolved = resolve(categories, ClassMap(map={"Can": "Metal", "Tin": "Metal"}), "x.json")
    assert resolved.class_names == ("Background", "Box", "Metal")
    assert resolved.label_of == {2: 1, 5: 2, 9: 2}


def test_files_with_other_ids_but_the_same_names_get_the_same_classes(tmp_path):
    task = [{"id": 1, "name": "General trash"}, {"id": 2, "name": "Paper"}]
    external = [{"id": 20, "name": "Unlabeled litter"}, {"id": 3, "name": "Paper"},
                {"id": 10, "name": "Cigarette"}, {"id": 7, "name": "Cardboard"}]
    class_map = _class_map(tmp_path, "classes: [General trash, Paper]\n"
                                     "map: {Cigarette: General trash, Cardboard: Paper, Unlabeled litter: null}\n")
    task_coco = _coco(tmp_path, [_square(1, 2, 0, 0, 10, 10)], task, class_map, name="task.json")
    external_coco = _coco(tmp_path, [_square(1, 3, 0, 0, 10, 10), _square(2, 7, 20, 10, 30, 20),
                                     _square(3, 10, 40, 0, 50, 10), _square(4, 20, 40, 20, 50, 30)],
                          external, class_map, name="external.json")
    assert task_coco.class_names == external_coco.class_names == ["Background", "General trash", "Paper"]
    assert _at(external_coco.label_map(7), (5, 5), (15, 25), (5, 45), (25, 45)) == [2, 2, 1, IGNORE]
    assert _at(task_coco.label_map(7), (5, 5)) == [2]
    # Without a class map, names in the same id order give the same classes too.
    assert resolve([{"id": 5, "name": "Metal"}, {"id": 9, "name": "Paper"}], None, "a.json").class_names == \
        resolve(METAL_PAPER, None, "b.json").class_names


def test_key_is_stable_and_follows_the_content(tmp_path):
    one = _class_map(tmp_path, "map: {Metal: Trash, Paper: background}\nunknown: ignore\n", name="one.yaml")
    same = _class_map(tmp_path, "unknown: {policy: ignore, names: [UNKNOWN]}\n"
                                "map:\n  Paper: Background\n  Metal: Trash\n", name="same.yaml")
    assert one == same and one.key() == same.key() and re.fullmatch(r"[0-9a-f]{16}", one.key())
    assert ClassMap().key() == ClassMap().key()
    assert len({one.key(), ClassMap().key(), one.with_unknown("keep").key(),
                ClassMap(map={"Metal": "Trash", "Paper": None}, unknown_policy="ignore").key(),
                ClassMap(classes=("Trash",), map={"Metal": "Trash"}).key()}) == 5


def test_to_dict_travels_as_plain_data_and_round_trips(tmp_path):
    class_map = _class_map(tmp_path, "classes: [Trash, Paper]\nmap: {Metal: Trash, Cork: null, Rope: Background}\n"
                                     "unmapped: ignore\nunknown: {policy: background, names: [unk]}\n")
    data = json.loads(json.dumps(class_map.to_dict()))
    assert ClassMap.from_dict(data) == class_map and ClassMap.from_dict(data).key() == class_map.key()
    assert ClassMap.from_dict(ClassMap().to_dict()) == ClassMap()


@pytest.mark.parametrize("text, key", [
    ("map: [Metal, Paper]", "map"),
    ("map: {Metal: 3}", "map.Metal"),
    ("map: {Metal: Tarsh}\nclasses: [Trash]",
     r"map.Metal: target 'Tarsh' is not in classes \(did you mean 'Trash'"),
    ("mapp: {Metal: Trash}", r"unknown key mapp \(did you mean 'map'"),
    ("unknown: {policy: keep, name: [unk]}", r"unknown key unknown.name \(did you mean 'names'"),
    ("unmapped: drop", "unmapped: 'drop' is not one of keep, background, ignore, error"),
    ("unknown: {policy: drop}", "unknown.policy: 'drop' is not one of keep, background, ignore"),
    ("unknown: {names: []}", "unknown.names"),
    ("classes: [Background, Paper]", "classes: leave out 'Background'"),
    ("classes: [Paper, Paper]", "classes: 'Paper' is listed more than once"),
    ("[just, a, list]", "must be a mapping"),
    ("", "must be a mapping"),
    ("map: {Metal: Trash\n", "not valid YAML"),
    ("!!python/object/apply:os.system [echo hi]", "not valid YAML: could not determine a constructor"),
])
def test_bad_class_map_files_are_one_line_user_errors_naming_file_and_key(tmp_path, text, key):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'bad.yaml'))}: .*{key}") as caught:
        ClassMap.load(tmp_path / "bad.yaml")
    assert "\n" not in str(caught.value)


def test_missing_file_and_bad_unknown_argument_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"class map file .*nope.yaml does not exist"):
        ClassMap.load(tmp_path / "nope.yaml")
    (tmp_path / "ok.yaml").write_text("unmapped: keep\n")
    with pytest.raises(UserError, match="unknown policy: 'drop' is not one of keep, background, ignore"):
        ClassMap.load(tmp_path / "ok.yaml", unknown="drop")


@pytest.mark.parametrize("text, message", [
    ("map: {Metal: Trash}\nunmapped: error\n",
     r"ann.json: category 'Paper' is not in the class map \(unmapped: error\)"),
    ("classes: [Trash]\nmap: {Metal: Trash}\n",
     r"ann.json: category 'Paper' keeps its name \(unmapped: keep\) but is not in the class map's classes"),
])
def test_categories_the_map_cannot_place_are_errors_naming_the_annotation_file(tmp_path, text, message):
    coco = _coco(tmp_path, PAPER_UNDER_METAL, class_map=_class_map(tmp_path, text))
    with pytest.raises(UserError, match=message):
        coco.class_names


def test_repeated_category_names_are_an_error():
    with pytest.raises(UserError, match=r"x.json: category name 'Paper' is used by ids 1 and 3"):
        resolve([{"id": 3, "name": "Paper"}, {"id": 1, "name": "Paper"}], None, "x.json")


def test_ignore_label_is_the_metric_ignore_index():

    assert IGNORE == IGNORE


@pytest.mark.skipif(not (TRASHCAN / "val.json").is_file(), reason="trashcan-mini is not available")
def test_trashcan_unknown_ignored_is_255_where_it_was_painted():
    kept = CocoSegmentation(TRASHCAN, "val.json")
    ignored = CocoSegmentation(TRASHCAN, "val.json", class_map=ClassMap().with_unknown("ignore"))
    unknown_label = kept.class_names.index("unknown")
    assert ignored.class_names == [n for n in kept.class_names if n != "unknown"]
    image_id = next(ann["image_id"] for ann in kept.coco.dataset["annotations"]
                    if kept.coco.cats[ann["category_id"]]["name"] == "unknown")
    before, after = kept.label_map(image_id), ignored.label_map(image_id)
    was_unknown = before == unknown_label
    assert was_unknown.any() and (after[was_unknown] == IGNORE).all()
    shifted = np.where(before > unknown_label, before - 1, before)  # the labels after unknown move down one
    assert np.array_equal(after[~was_unknown], shifted[~was_unknown])
