"""External datasets (data.extra): mapped into the task's classes, training split only, validated like
the main data, sampled at their share."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data_pipeline.coco import CocoSegmentation
from data_pipeline.imbalance import build_sampler
from data_pipeline.trial_data import DataSpec
from errors import UserError
from labels import IGNORE
from search.preflight import check_data, training_sources
from search.space import load_space

SIZE = 96
# An external taxonomy unlike the task's: mapped, merged, folded into background, ignored, unmapped.
EXTERNAL_CATEGORIES = ["Bottle", "Can", "Foil", "Rock", "Unlabeled litter", "Cigarette"]
CLASS_MAP = """map:
  Bottle: Plastic          # renamed
  Can: Metal               # Can and Foil merge into Metal
  Foil: Metal
  Rock: Background         # folded into background
  Unlabeled litter: null   # ignored
unmapped: ignore           # Cigarette is not in the map
"""
TASK_OF = {"Bottle": "Plastic", "Can": "Metal", "Foil": "Metal", "Rock": "Background"}  # the rest: ignored


def make_external(root: Path, images: int = 4) -> Path:
    """A COCO dataset with one disjoint rectangle per external category in every image."""
    root.mkdir(parents=True)
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(EXTERNAL_CATEGORIES)]}
    rng = np.random.default_rng(0)
    for image_id in range(images):
        name = f"ext_{image_id}.jpg"
        cv2.imwrite(str(root / name), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
        coco["images"].append({"id": image_id, "file_name": name, "width": SIZE, "height": SIZE})
        for k in range(len(EXTERNAL_CATEGORIES)):
            x0, y0 = 4 + 15 * k, 8 + 10 * image_id
            polygon = [x0, y0, x0 + 12, y0, x0 + 12, y0 + 30, x0, y0 + 30]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": k + 1,
                                        "segmentation": [polygon], "area": 360.0, "bbox": [x0, y0, 12, 30],
                                        "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture
def space(tmp_path, sample_root):
    """A space whose data section adds the external dataset (relative paths, as a user writes them)."""
    make_external(tmp_path / "external")
    (tmp_path / "taco_to_task.yaml").write_text(CLASS_MAP)

    def write(share: str = "") -> Path:
        path = tmp_path / "space.yaml"
        path.write_text(f"""data:
  extra:
    - {{root: external, annotations: annotations.json, class_map: taco_to_task.yaml{share}}}
space: {{decoder: Unet, backbone: resnet18, resize: {SIZE}}}
""")
        return path
    return write


def spec_of(space_file: Path, root: Path) -> DataSpec:
    from dataclasses import replace

    return replace(load_space(space_file).data, root=str(root))


def test_external_images_join_training_with_the_task_s_labels_pixel_by_pixel(space, sample_root):
    data = spec_of(space(), sample_root)
    own, _ = DataSpec(str(sample_root)).train_val(SIZE)
    train, val = data.train_val(SIZE)
    assert len(train) == len(own) + 4 and train.file_names[len(own):] == tuple(f"ext_{i}.jpg" for i in range(4))
    assert train.class_names == own.class_names

    # the known image's labels, computed independently: its own categories, renamed by hand
    plain = CocoSegmentation(data.sources()[0].root, "annotations.json")
    names = list(own.class_names)
    by_label = {label: (names.index(TASK_OF[name]) if name in TASK_OF else IGNORE)
                for label, name in enumerate(plain.class_names) if label}
    expected = plain.label_map(2)
    expected = np.vectorize(lambda v: by_label.get(v, v))(expected).astype(np.uint8)
    got = train.masks[len(own) + 2]
    assert np.array_equal(got, expected)
    assert {names.index("Plastic"), names.index("Metal"), IGNORE, 0} == set(np.unique(got))
    assert np.array_equal(train.images[len(own) + 2], cv2.cvtColor(cv2.imread(str(Path(plain.root) / "ext_2.jpg")),
                                                                   cv2.COLOR_BGR2RGB))


def test_val_is_unchanged_by_external_data(space, sample_root):
    data = spec_of(space(), sample_root)
    plain = DataSpec(str(sample_root))
    _, val = data.train_val(SIZE)
    _, plain_val = plain.train_val(SIZE)
    assert val.file_names == plain_val.file_names and np.array_equal(val.masks, plain_val.masks)
    assert data.val_fingerprint() == plain.val_fingerprint()


def test_the_config_round_trip_keeps_the_external_sources(space, sample_root):
    data = spec_of(space(", share: 0.25"), sample_root)
    config = json.loads(json.dumps(data.to_config()))  # as Tune stores it
    assert DataSpec.from_config(config) == data
    [source] = DataSpec.from_config(config).sources()
    assert source.share == 0.25 and Path(source.root).is_absolute() and source.classes().unmapped == "ignore"


def test_the_share_sets_each_epoch_s_mix(space, sample_root):
    def external_fraction(data: DataSpec, sampler: str) -> float:
        train, _, mix = data.training_data(SIZE)
        own = len(train) - 4
        drawn = build_sampler(sampler, train.masks, len(train.class_names), torch.Generator().manual_seed(0), mix)
        indices = np.concatenate([list(drawn) for _ in range(200)]) if drawn is not None else np.arange(len(train))
        return float(np.mean(indices >= own))

    without = external_fraction(spec_of(space(), sample_root), "uniform")
    assert without == pytest.approx(4 / (24 + 4))  # no share: every image once per epoch
    for sampler in ("uniform", "rare"):
        assert external_fraction(spec_of(space(", share: 0.5"), sample_root), sampler) == pytest.approx(0.5, abs=0.03)


def test_a_broken_external_image_is_named_and_skip_bad_leaves_it_out_of_that_source_only(space, sample_root):
    spec = load_space(space())
    source = spec.data.sources()[0]
    (Path(source.root) / "ext_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError) as error:
        check_data(spec, sample_root, skip_bad=False)
    assert f"{source.name}: ext_1.jpg" in str(error.value) and "--skip-bad" in str(error.value)
    checked = check_data(spec, sample_root, skip_bad=True)
    assert checked.extra_skip == [["ext_1.jpg"]] and checked.skip == [] and "3 external" in checked.summary
    data = spec.data.skipping_extra(checked.extra_skip)
    from dataclasses import replace

    train, _ = replace(data, root=str(sample_root)).train_val(SIZE)
    assert "ext_1.jpg" not in train.file_names and "ext_0.jpg" in train.file_names


def test_a_class_the_task_does_not_have_is_refused_naming_it(space, sample_root, tmp_path):
    (tmp_path / "taco_to_task.yaml").write_text(CLASS_MAP.replace("Bottle: Plastic", "Bottle: Bottles"))
    spec = load_space(space())
    with pytest.raises(UserError, match=r"annotations.json: class 'Bottles' \(after its class map\) is not one of"):
        check_data(spec, sample_root, skip_bad=False)


@pytest.mark.parametrize("entry, message", [
    ("{root: missing, annotations: a.json}", r"data.extra\[0\].root: .*missing does not exist"),
    ("{root: external}", r"data.extra\[0\].annotations: expected a path"),
    ("{root: external, annotations: a.json, share: 1.5}", r"data.extra\[0\].share: expected a fraction"),
    ("{root: external, annotations: a.json, weight: 2}", r"unknown key data.extra\[0\].weight; known: root"),
    ("{root: external, annotations: a.json, class_map: nope.yaml}", r"data.extra\[0\].class_map: .*nope.yaml does not"),
])
def test_bad_entries_are_one_line_errors_naming_the_key(space, tmp_path, entry, message):
    path = space()
    path.write_text(path.read_text().replace(path.read_text().splitlines()[2].strip()[2:], entry))
    with pytest.raises(UserError, match=message):
        load_space(path)


def test_shares_must_leave_room_for_the_task_s_own_images(space, tmp_path):
    path = space(", share: 0.6")
    entry = path.read_text().splitlines()[2]
    path.write_text(path.read_text().replace(entry, entry + "\n" + entry))
    with pytest.raises(UserError, match="the shares add up to 1.2"):
        load_space(path)


def test_the_dry_run_lines_show_each_source_s_pixels_in_the_task_s_classes(space, sample_root):
    spec = load_space(space(", share: 0.3"))
    lines = training_sources(spec.data, sample_root)
    assert lines[0].startswith(f"task data {sample_root / 'train.json'}: 24 images")
    assert lines[1].startswith(f"external {spec.data.sources()[0].name} (share 0.3): 4 images, 24 annotations")
    assert "Plastic" in lines[1] and "Metal" in lines[1] and "(ignored)" in lines[1] and "Bottle" not in lines[1]


def test_a_changed_external_file_is_read_again(space, sample_root):
    data = spec_of(space(), sample_root)
    source = data.sources()[0]
    before, _ = data.train_val(SIZE)
    path = Path(source.root) / source.annotations
    coco = json.loads(path.read_text())
    coco["images"] = coco["images"][:2]  # e.g. a newer release of the external data
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] < 2]
    path.write_text(json.dumps(coco))
    after, _ = data.train_val(SIZE)  # the same spec, as a resumed trial rebuilds it
    assert len(before) - len(after) == 2 and after.file_names[-1] == "ext_1.jpg"
