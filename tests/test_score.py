import pytest

from data_pipeline.cache import load_split
from data_pipeline.submission import write_submission
from errors import UserError
from search.score import score_submission


def test_ground_truth_as_submission_scores_one_and_background_scores_less(sample_root, tmp_path):
    truth = load_split(sample_root, "test_gt.json", 256)
    write_submission(tmp_path / "perfect.csv", zip(truth.file_names, truth.masks))
    perfect = score_submission(tmp_path / "perfect.csv", sample_root, "test_gt.json")
    assert perfect["miou"] == 1.0 and perfect["images"] == len(truth) and perfect["size"] == 256
    write_submission(tmp_path / "background.csv", ((n, m * 0) for n, m in zip(truth.file_names, truth.masks)))
    background = score_submission(tmp_path / "background.csv", sample_root, "test_gt.json")
    share = (truth.masks == 0).mean()  # background IoU = its pixel share; other classes score 0
    present = len(set(truth.masks.ravel().tolist()))
    assert background["miou"] == pytest.approx(share / present, rel=1e-9)


def test_a_submission_missing_images_is_a_user_error(sample_root, tmp_path):
    truth = load_split(sample_root, "test_gt.json", 256)
    write_submission(tmp_path / "short.csv", [(truth.file_names[0], truth.masks[0])])
    with pytest.raises(UserError, match="has no row for"):
        score_submission(tmp_path / "short.csv", sample_root, "test_gt.json")
