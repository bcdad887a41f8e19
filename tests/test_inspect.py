"""The inspection CLI, run as a user would: report, exit codes, sample grid."""
import json
import shutil

import cv2

from data_pipeline.inspect import GRID_COLUMNS, LEGEND_WIDTH, TILE
from data_pipeline.sample_data import CATEGORIES

from .conftest import run_cli


def test_report_of_a_valid_dataset(sample_root):
    result = run_cli("-m", "data_pipeline.inspect", sample_root)
    assert result.returncode == 0, result.stderr
    assert "24 images" in result.stdout and "No problems found." in result.stdout
    assert all(name in result.stdout for name in ["Background", *CATEGORIES])
    assert result.stderr == ""


def test_bad_images_are_listed_with_exit_code_1(sample_root, tmp_path):
    root = shutil.copytree(sample_root, tmp_path / "data")
    (root / "batch_01" / "0002.jpg").unlink()
    result = run_cli("-m", "data_pipeline.inspect", root, "--ann", "train.json")
    assert result.returncode == 1
    assert "train.json: batch_01/0002.jpg: image id 2: missing" in result.stdout
    assert "Classes over the 23 usable images" in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and "--skip-bad" in result.stderr


def test_unusable_annotation_file_exits_2_with_one_line(sample_root, tmp_path):
    root = shutil.copytree(sample_root, tmp_path / "data")
    data = json.loads((root / "val.json").read_text())
    del data["categories"]
    (root / "val.json").write_text(json.dumps(data))
    result = run_cli("-m", "data_pipeline.inspect", root, "--ann", "val.json")
    assert result.returncode == 2
    assert result.stderr.startswith("error: val.json cannot be used: ")
    assert "val.json has no 'categories' list" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_grid_is_a_png_of_the_expected_size(sample_root, tmp_path):
    out = tmp_path / "figures" / "grid.png"
    result = run_cli("-m", "data_pipeline.inspect", sample_root, "--grid", out)
    assert result.returncode == 0, result.stderr
    grid = cv2.imread(str(out))
    assert grid is not None and grid.shape == (4 * TILE, GRID_COLUMNS * TILE + LEGEND_WIDTH, 3)  # 16 of 24 images
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temp file left behind


def test_class_map_is_applied_and_its_errors_are_fatal(sample_root, tmp_path):
    merged = tmp_path / "merged.yaml"
    merged.write_text("map: {Paper pack: Paper, Battery: null}\n")
    result = run_cli("-m", "data_pipeline.inspect", sample_root, "--class-map", merged)
    assert result.returncode == 0, result.stderr
    assert "Paper pack" not in result.stdout and "(ignored)" in result.stdout
    strict = tmp_path / "strict.yaml"
    strict.write_text("map: {Paper: Paper}\nunmapped: error\n")
    result = run_cli("-m", "data_pipeline.inspect", sample_root, "--class-map", strict)
    assert result.returncode == 2 and "is not in the class map" in result.stderr


def test_the_class_palette_tells_neighbouring_labels_apart():
    import numpy as np

    from data_pipeline.inspect import palette

    colours = palette(12).astype(int)
    assert colours[0].tolist() == [0, 0, 0]
    gaps = [np.abs(colours[k] - colours[k + 1]).sum() for k in range(1, 11)]
    assert min(gaps) > 100  # a qualitative palette: no two consecutive classes in near-identical shades
    assert len({tuple(c) for c in colours[1:12]}) == 11
