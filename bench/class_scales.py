"""What class scales (models.class_scales) buy on a labelled test set: every equal-weight subset of an
experiment's top members of one backbone, and the selection ensemble_select.py would keep, each scored
on val and test without and with its class scales fitted on val.

    .venv/bin/python bench/class_scales.py EXPERIMENT [--data ../shared/datasets/trashcan-mini]
        [--topk 5] [--gt test_gt.json]

Members predict at 256 px (bf16 where it is fast, as ensemble_select.py does); val probabilities
come from the experiment's val cache when ensemble_select.py has run. No class filter. Last line:
JSON with each subset's figures and the kept choice's.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from trashcan import TRASHCAN, check_data  # bench/ is on the path of a bench script

SIZE = 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--data", type=Path, default=TRASHCAN)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--gt", default="test_gt.json", help="labelled test annotations under --data")
    args = parser.parse_args(argv)
    check_data(args.data)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from data_pipeline.trial_data import DataSpec
    from models.checkpoint import load_checkpoint
    from models.class_scales import choose_with_scales, fit_class_scales, fit_pixels, weight_candidates
    from models.ensemble import ensemble_confusion, ensemble_selection
    from models.metrics import iou_per_class, mean_iou
    from search.ensemble_job import (Member, cached_val_probabilities, choose_members, split_probabilities,
                                     val_cache_path)
    from search.experiment import read_trials

    torch.set_num_threads(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    experiment = args.experiment.resolve()
    _, chosen = choose_members(read_trials(experiment), args.topk, None)
    data = DataSpec.from_config(chosen[0].config, args.data)
    members = [Member(t, *load_checkpoint(t.checkpoint, device)) for t in chosen]
    num_classes, names = members[0].meta["num_classes"], members[0].meta["class_names"]
    val_truth = torch.from_numpy(np.array(data.val_split(SIZE).masks))
    test = data.load(args.gt, SIZE)
    test_truth = torch.from_numpy(np.array(test.masks)).long()
    cache_dir = experiment / "ensemble" / "val_cache"
    val = [cached_val_probabilities(m, data, SIZE, device, "none", val_cache_path(m, data, SIZE, "none", cache_dir,
                                                                                  device))[0] for m in members]
    tests = [split_probabilities(m, data.load(args.gt, m.input_size, with_masks=False), SIZE, device)
             for m in members]

    def scored(weights: list, scales=None) -> dict:
        val_conf = ensemble_confusion(list(zip(weights, val)), val_truth, num_classes, scales=scales)
        test_conf = ensemble_confusion(list(zip(weights, tests)), test_truth, num_classes, scales=scales)
        per_class = {n: round(float(v), 3) for n, v in zip(names, iou_per_class(test_conf)) if not np.isnan(v)}
        return {"val": round(mean_iou(val_conf), 4), "test": round(mean_iou(test_conf), 4), "test_per_class": per_class}

    ids = [m.trial.trial_id for m in members]
    rows = []
    for count in range(1, len(members) + 1):
        for subset in itertools.combinations(range(len(members)), count):
            weights = [1.0 / count if m in subset else 0.0 for m in range(len(members))]
            fit = fit_class_scales(*fit_pixels(list(zip(weights, val)), val_truth), num_classes)
            row = {"members": [ids[m] for m in subset], "plain": scored(weights),
                   "scaled": scored(weights, fit.scales), "scales": fit.to_dict(names)}
            rows.append(row)
            print(f"{'+'.join(row['members'])}: val {row['plain']['val']:.4f} -> {row['scaled']['val']:.4f}, "
                  f"test {row['plain']['test']:.4f} -> {row['scaled']['test']:.4f}; scales {row['scales']}", flush=True)
    selection = ensemble_selection(val, val_truth, num_classes)
    candidates = weight_candidates(selection.weights, selection.member_miou)
    choice = choose_with_scales(candidates, val, val_truth, num_classes)
    kept = {"selection": scored(selection.weights), "kept": choice.name, "weights": dict(zip(ids, choice.weights)),
            "with_scales": scored(choice.weights, choice.fit.scales), "scales": choice.fit.to_dict(names)}
    print(f"selection: val {kept['selection']['val']:.4f}, test {kept['selection']['test']:.4f}; with scales "
          f"({choice.name}): val {kept['with_scales']['val']:.4f}, test {kept['with_scales']['test']:.4f}")
    print(json.dumps({"experiment": str(experiment), "subsets": rows, "ensemble": kept}))


if __name__ == "__main__":
    main()
