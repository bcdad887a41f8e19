"""What ASHA saves: the same search run twice through launch.py, once with ASHA early stopping and once
with FIFO (every trial trains max_epochs), on a real dataset (default: trashcan-mini, 64 px).

Both runs get the same proposals: with at most 10 trials Optuna's TPE is still in its random start-up
phase, drawn from the space's seed, so the configs do not depend on results; the bench checks it.

    .venv/bin/python bench/asha.py [--data ../shared/datasets/trashcan-mini] [--space search_spaces/cpu_real.yaml]

Last line: JSON with the trial-epochs each run used, their ratio (goal <= 0.40), each run's best val
mIoU and the gap (goal: ASHA within 0.02 of FIFO), wall times (launch.py end to end; with --reuse,
first trial start to last result), and whether the proposals matched.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from trashcan import ROOT, TRASHCAN, check_data  # bench/ is on the path of a bench script
TPE_STARTUP_TRIALS = 10  # optuna.samplers.TPESampler's n_startup_trials default


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=TRASHCAN)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "cpu_real.yaml")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--storage", type=Path, default=None,
                        help="keep both experiments here (as runs/fifo and runs/asha) instead of a temp folder")
    parser.add_argument("--reuse", action="store_true",
                        help="summarise the experiments already under --storage instead of running them")
    args = parser.parse_args()
    check_data(args.data)
    if args.reuse and not args.storage:
        sys.exit("error: --reuse needs --storage")
    if args.trials > TPE_STARTUP_TRIALS:
        sys.exit(f"error: --trials must be <= {TPE_STARTUP_TRIALS} so that both runs get the same proposals")
    return args


def run(space: dict, scheduler: str, data: Path, work: Path) -> tuple[float, list]:
    """Runs launch.py with the space's scheduler set; returns (wall seconds, trials in creation order)."""
    space = {**space, "experiment": {**space["experiment"], "scheduler": scheduler}}
    path = work / f"{scheduler}-space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))  # `when` needs its parameter above it
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--space", str(path), "--data", str(data),
                             "--storage", str(work / "runs"), "--name", scheduler, "--no-wandb"],
                            capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"launch.py ({scheduler}) failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return wall, trials_of(work / "runs" / scheduler)


def trials_of(experiment: Path) -> list:
    """The experiment's trials in creation order (trial ids are random, not ordered)."""
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(str(experiment)).trials


def search_seconds(trials: list) -> float:
    """From the first trial's start to the last result (a kept experiment's wall time, less Ray's start)."""
    results = [t.last_result for t in trials]
    return max(r["timestamp"] for r in results) - min(r["timestamp"] - r["time_total_s"] for r in results)


def searched(config: dict, names: set) -> dict:
    return {k: round(v, 8) if isinstance(v, float) else v for k, v in config.items() if k in names}


def summary(trials: list) -> dict:
    return {"epochs": sum(int(t.last_result.get("training_iteration", 0)) for t in trials),
            "best": max(t.last_result.get("best_val_miou", 0.0) for t in trials)}


def main() -> None:
    args = parse_args()
    space = yaml.safe_load(args.space.read_text())
    space["experiment"].update(num_samples=args.trials, max_epochs=args.epochs)
    names = set(space["space"])
    with tempfile.TemporaryDirectory() as temp:
        work = args.storage or Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            fifo, asha = trials_of(work / "runs" / "fifo"), trials_of(work / "runs" / "asha")
            fifo_wall, asha_wall = search_seconds(fifo), search_seconds(asha)
        else:
            fifo_wall, fifo = run(space, "fifo", args.data, work)
            asha_wall, asha = run(space, "asha", args.data, work)
    same = [searched(t.config, names) for t in fifo] == [searched(t.config, names) for t in asha]
    f, a = summary(fifo), summary(asha)
    print(f"{'':6}{'trial-epochs':>14}{'best val mIoU':>15}{'wall s':>9}")
    print(f"{'FIFO':6}{f['epochs']:>14}{f['best']:>15.4f}{fifo_wall:>9.0f}")
    print(f"{'ASHA':6}{a['epochs']:>14}{a['best']:>15.4f}{asha_wall:>9.0f}")
    print(json.dumps({
        "data": str(args.data), "space": str(args.space), "trials": args.trials, "max_epochs": args.epochs,
        "same_proposals": same, "fifo_epochs": f["epochs"], "asha_epochs": a["epochs"],
        "epochs_ratio": round(a["epochs"] / f["epochs"], 3), "fifo_best_val_miou": round(f["best"], 4),
        "asha_best_val_miou": round(a["best"], 4), "best_gap": round(f["best"] - a["best"], 4),
        "fifo_wall_s": round(fifo_wall), "asha_wall_s": round(asha_wall),
    }))


if __name__ == "__main__":
    main()
