"""A whole search under a time budget: launch.py --time-budget, then ensemble_select.py --topk K,
scored against the labelled test set (per class too, and the best single trial with --topk 1),
with where the time went.

    .venv/bin/python bench/time_budget.py [--data ../shared/datasets/trashcan-mini]
        [--space search_spaces/quick.yaml] [--budget 20m] [--topk 5] [--storage runs/bench-budget]

Time split (from every trial's per-epoch results): set-up (decoded data, model, optimiser, in the
first epoch of each trial), training, evaluation, the rest of the trials' reported time
(checkpoints, reporting), and the trial slots left idle (slots x search wall time minus the trials'
time: Ray start-up, trial start-up, scheduling, the end of the budget). Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from trashcan import ROOT, TRASHCAN, check_data  # bench/ is on the path of a bench script


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=TRASHCAN)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "quick.yaml")
    parser.add_argument("--budget", default="20m")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--storage", type=Path, default=ROOT / "runs" / "bench-budget")
    parser.add_argument("--name", default=None, help="experiment name (default: budget-<timestamp>)")
    args = parser.parse_args()
    check_data(args.data)
    return args


def _timed(*command) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"error: {command[0]} failed:\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}")
    return time.perf_counter() - started


def time_split(experiment: Path, slots: int, search_s: float) -> dict:
    from ray.tune import ExperimentAnalysis

    frames = ExperimentAnalysis(str(experiment.resolve())).trial_dataframes.values()
    frames = [f for f in frames if len(f)]
    setup = sum(float(f["setup_time_s"].iloc[0]) for f in frames)
    train = sum(float(f["train_time_s"].sum()) for f in frames)
    evaluation = sum(float(f["eval_time_s"].sum()) for f in frames)
    reported = sum(float(f["time_total_s"].iloc[-1]) for f in frames)
    return {"setup_s": round(setup), "train_s": round(train), "eval_s": round(evaluation),
            "other_in_trials_s": round(reported - setup - train - evaluation),
            "idle_slots_s": round(slots * search_s - reported), "trials": len(frames),
            "epochs": int(sum(len(f) for f in frames))}


def main() -> None:
    import os

    from search.experiment import ranked, read_trials
    from search.score import score_submission
    from search.space import load_space
    from search.tune_runner import concurrency

    args = parse_args()
    name = args.name or time.strftime("budget-%Y%m%d-%H%M%S")
    experiment = args.storage / name
    search_s = _timed("launch.py", "--space", args.space, "--data", args.data, "--time-budget", args.budget,
                      "--storage", args.storage, "--name", name, "--no-wandb")
    out = experiment / "ensemble" / "submission.csv"
    ensemble_s = _timed("ensemble_select.py", "--experiment", experiment, "--topk", args.topk, "--out", out)
    score = score_submission(out, args.data, "test_gt.json")
    single = experiment / "best_single" / "submission.csv"  # after the timed run: its val cache is reused
    _timed("ensemble_select.py", "--experiment", experiment, "--topk", 1, "--out", single)
    single_score = score_submission(single, args.data, "test_gt.json")
    slots = concurrency(load_space(args.space).experiment, os.cpu_count() or 1, 0)
    split = time_split(experiment, slots, search_s)
    best = ranked(read_trials(experiment.resolve()))[0]
    summary = json.loads((out.with_name("ensemble.json")).read_text())
    result = {"budget": args.budget, "space": str(args.space), "search_s": round(search_s),
              "ensemble_s": round(ensemble_s), "total_s": round(search_s + ensemble_s),
              "test_miou": round(score["miou"], 4), "best_single_test_miou": round(single_score["miou"], 4),
              "test_per_class_iou": {n: round(v, 3) for n, v in score["per_class_iou"].items() if v is not None},
              "class_scales": summary.get("class_scales"), "class_filter": summary.get("class_filter"),
              "ensemble_val_miou": round(summary["val_miou"], 4),
              "best_trial_val_miou": round(best.best_val_miou, 4), "slots": slots, **split}
    print("test IoU per class: " + ", ".join(f"{n} {v:.3f}" for n, v in result["test_per_class_iou"].items()))
    print(f"best single trial (--topk 1): test mIoU {result['best_single_test_miou']:.4f}")
    print(f"test mIoU {result['test_miou']:.4f} (ensemble val {result['ensemble_val_miou']:.4f}, best trial val "
          f"{result['best_trial_val_miou']:.4f}); {split['trials']} trials, {split['epochs']} epochs; search "
          f"{search_s / 60:.1f} min + ensemble {ensemble_s / 60:.1f} min")
    print(f"trial time: set-up {split['setup_s']} s, training {split['train_s']} s, evaluation {split['eval_s']} s, "
          f"other {split['other_in_trials_s']} s; idle slot time {split['idle_slots_s']} s ({slots} slots)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
