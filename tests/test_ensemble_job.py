"""Checks ensemble_select makes before combining members."""
from pathlib import Path

import pytest

from data_pipeline.cache import load_split
from errors import UserError
from search.ensemble_job import Member, _check_compatible, choose_members
from search.experiment import TrialRecord


def _member(trial_id, class_names, val_images, backbone="resnet18", score=0.5, fold=0):
    trial = TrialRecord(trial_id, {"backbone": backbone, "fold": fold}, "finished", score, 3, 1.0, Path("/ckpt") / trial_id,
                        best=score)
    meta = {"class_names": class_names, "val_images": val_images, "input_size": [64, 64]}
    return Member(trial, model=None, meta=meta)


def test_members_must_share_classes_and_val_images(sample_root):
    names = list(load_split(sample_root, "val.json", 64, with_masks=False).file_names)
    classes = ["Background", "a", "b"]
    _check_compatible([_member("t1", classes, names), _member("t2", classes, names)], names)
    with pytest.raises(UserError, match="trial t2 predicts different classes than t1"):
        _check_compatible([_member("t1", classes, names), _member("t2", classes[:2], names)], names)
    with pytest.raises(UserError, match="trial t2 was validated on other images"):
        _check_compatible([_member("t1", classes, names), _member("t2", classes, names[::-1])], names)


def test_members_are_the_best_trials_of_one_backbone():
    trials = [_member(f"t{i}", [], [], backbone=b, score=s).trial
              for i, (b, s) in enumerate([("r18", 0.3), ("mnv2", 0.6), ("r18", 0.5), ("mnv2", 0.2), ("r18", 0.4)])]
    backbone, chosen = choose_members(trials, topk=2, backbone=None)
    assert backbone == "mnv2" and [t.trial_id for t in chosen] == ["t1", "t3"]
    backbone, chosen = choose_members(trials, topk=2, backbone="r18")
    assert [t.trial_id for t in chosen] == ["t2", "t4"]
    with pytest.raises(UserError, match="no finished trial uses backbone 'vgg16'; available: mnv2, r18"):
        choose_members(trials, topk=2, backbone="vgg16")


def test_members_share_the_k_fold_fold_of_the_best_trial():
    trials = [_member(f"t{i}", [], [], fold=f, score=s).trial
              for i, (f, s) in enumerate([(0, 0.3), (1, 0.6), (1, 0.5), (0, 0.7), (1, 0.2)])]
    _, chosen = choose_members(trials, topk=3, backbone=None)
    assert [t.trial_id for t in chosen] == ["t3", "t0"]  # fold 1's trials validated on images fold 0 trained on


def test_trials_rank_by_the_experiment_metric_in_its_direction():
    from search.experiment import leaderboard_rows

    def trial(trial_id, loss):
        return TrialRecord(trial_id, {"backbone": "r18"}, "finished", 0.5, 3, 1.0, Path("/ckpt") / trial_id,
                           metric="val_loss", best=loss)

    trials = [trial("a", 0.9), trial("b", 0.4), trial("c", float("nan"))]
    _, chosen = choose_members(trials, topk=3, backbone=None)
    assert [t.trial_id for t in chosen] == ["b", "a"]  # lower loss first; never-reported left out
    rows = leaderboard_rows(trials)
    assert [r["trial_id"] for r in rows] == ["b", "a", "c"] and rows[0]["best_val_loss"] == "0.4000"
