"""What the search service costs: N identical fixed trials through launch.py (Ray Tune, Optuna,
ASHA that never stops a trial, checkpoints, leaderboard, report) vs the same trainings in a plain
loop (search.trainable.build_trial + run_epochs, no Ray), each side in a fresh interpreter.

Both sides use the same torch threads in all: launch.py gives each trial --cpus CPUs (one trial at a
time), the loop sets the same thread count. The data cache is built before either side is timed.
The sides alternate (loop first in odd rounds, launch first in even ones) so that a drift in the
machine's pace falls on both; ratios are taken within a round and the median over rounds is reported.

    .venv/bin/python bench/search_overhead.py [--data DIR] [--trials 3] [--epochs 6] [--resize 96] [--rounds 3]

Where the time goes, per side: inside the trials (set-up, training, evaluation, the rest: checkpoint
writing and reporting), and outside them: for launch.py the driver until Ray is up (imports, space and
data checks, Ray's start; up to when launch.json is written), up to the first trial's start (Tune's
set-up, the trial actor's start and imports), between trials, and after the last one (leaderboard,
report, Ray's shutdown, interpreter exit); for the loop its imports and exit. Ray timestamps results
in whole seconds, so the launch breakdown is good to about a second.

Last line: JSON with the medians over rounds of each side's wall time, the overhead ratio (launch /
loop; goal <= 1.08), the mean trial time of each side and their ratio (goal <= 1.03), and the breakdown.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPACE = """experiment: {{num_samples: {trials}, max_epochs: {epochs}, grace_period: {epochs}, reduction_factor: 2,
             seed: 0, cpus_per_trial: {cpus}}}
space: {{decoder: Unet, backbone: resnet18, encoder_weights: null, loss: ce, augmentation: flip,
        resize: {resize}, lr: 1.0e-3, batch_size: 8}}
"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="dataset root (default: the built-in sample)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--resize", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--loop", type=Path, default=None, help=argparse.SUPPRESS)  # internal: run the loop side
    return parser.parse_args()


def trial_config(space: Path, data: Path) -> dict:
    """The one config every trial gets: the space's fixed parameters and the run's constants."""
    from search.space import SpaceSampler, load_space
    from search.tune_runner import trial_constants

    spec = load_space(space)
    config = SpaceSampler(spec.params, trial_constants(spec, data))(None)  # every parameter is fixed
    return {**config, "cpus_per_trial": spec.experiment.cpus_per_trial}


def run_loop(space: Path, data: Path, trials: int) -> None:
    """The baseline side: the same trainings one after another, checkpoints saved as the trainable does."""
    from search.trainable import build_trial, run_epochs

    done = []
    for _ in range(trials):
        epochs = []
        started = time.perf_counter()
        run_epochs(build_trial(trial_config(space, data)), lambda metrics, directory: epochs.append(metrics))
        done.append(trial_split(epochs, time.perf_counter() - started))
    print(json.dumps({"trials": done}))


def trial_split(epochs: list[dict], total_s: float) -> dict:
    """One trial's time: set-up, training, evaluation and the rest (checkpoints, reporting)."""
    setup = epochs[0]["setup_time_s"]
    train = sum(e["train_time_s"] for e in epochs)
    evaluation = sum(e["eval_time_s"] for e in epochs)
    return {"total_s": total_s, "setup_s": setup, "train_s": train, "eval_s": evaluation,
            "rest_s": total_s - setup - train - evaluation}


def timed(command: list[str]) -> tuple[float, float, str]:
    """(unix start time, wall seconds, stdout) of a command that must succeed."""
    started, clock = time.time(), time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - clock
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return started, wall, result.stdout


def loop_side(space: Path, args) -> dict:
    _, wall, out = timed([sys.executable, __file__, "--loop", str(space), "--data", str(args.data),
                          "--trials", str(args.trials)])
    trials = json.loads(out.strip().splitlines()[-1])["trials"]
    return {"wall_s": wall, "trials": trials, "outside": {"imports_and_exit_s": wall - _sum(trials, "total_s")}}


def launch_side(space: Path, storage: Path, args) -> dict:
    name = f"overhead-{len(list(storage.glob('overhead-*'))) if storage.is_dir() else 0}"
    started, wall, _ = timed([sys.executable, str(ROOT / "launch.py"), "--space", str(space), "--data",
                              str(args.data), "--storage", str(storage), "--name", name, "--no-wandb"])
    experiment = storage / name
    results = [[json.loads(line) for line in path.read_text().splitlines()]
               for path in experiment.glob("*/result.json")]
    trials = [trial_split(epochs, epochs[-1]["time_total_s"]) for epochs in results]
    starts = [epochs[-1]["timestamp"] - epochs[-1]["time_total_s"] for epochs in results]
    ends = [epochs[-1]["timestamp"] for epochs in results]
    ray_up = (experiment / "launch.json").stat().st_mtime  # written once Ray has started
    return {"wall_s": wall, "trials": trials, "outside": {
        "driver_until_ray_up_s": ray_up - started,
        "until_first_trial_s": min(starts) - ray_up,
        "between_trials_s": max(ends) - min(starts) - _sum(trials, "total_s"),
        "after_last_trial_s": started + wall - max(ends),
    }}


def _sum(trials: list[dict], key: str) -> float:
    return sum(t[key] for t in trials)


def _median_split(rounds: list[dict], part: str) -> dict:
    """The median over rounds of each time of part ('outside', or the trials' sums)."""
    if part == "outside":
        keys, values = rounds[0]["outside"], lambda r, k: r["outside"][k]
    else:
        keys, values = rounds[0]["trials"][0], lambda r, k: _sum(r["trials"], k)
    return {k: round(statistics.median(values(r, k) for r in rounds), 1) for k in keys}


def main() -> None:
    args = parse_args()
    if args.loop:
        run_loop(args.loop, args.data, args.trials)
        return
    if args.data is None:
        from data_pipeline.sample_data import ensure_sample_dataset

        args.data = ensure_sample_dataset()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        space = work / "space.yaml"
        space.write_text(SPACE.format(trials=args.trials, epochs=args.epochs, resize=args.resize, cpus=args.cpus))
        from data_pipeline.trial_data import DataSpec

        DataSpec.from_config(trial_config(space, args.data)).train_val(args.resize)  # build the cache, untimed
        loops, launches = [], []
        for round_ in range(args.rounds):
            sides = [lambda: loops.append(loop_side(space, args)),
                     lambda: launches.append(launch_side(space, work / "runs", args))]
            for side in sides if round_ % 2 == 0 else reversed(sides):
                side()
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(a, b))  # noqa: E731
    mean_trial = lambda side: [_sum(r["trials"], "total_s") / len(r["trials"]) for r in side]  # noqa: E731
    print(json.dumps({
        "trials": args.trials, "epochs": args.epochs, "resize": args.resize, "cpus": args.cpus, "rounds": args.rounds,
        "loop_wall_s": round(statistics.median(r["wall_s"] for r in loops), 1),
        "launch_wall_s": round(statistics.median(r["wall_s"] for r in launches), 1),
        "overhead_ratio": round(ratio([r["wall_s"] for r in launches], [r["wall_s"] for r in loops]), 3),
        "overhead_ratios": [round(a["wall_s"] / b["wall_s"], 3) for a, b in zip(launches, loops)],
        "mean_trial_s_loop": round(statistics.median(mean_trial(loops)), 1),
        "mean_trial_s_tune": round(statistics.median(mean_trial(launches)), 1),
        "trial_ratio": round(ratio(mean_trial(launches), mean_trial(loops)), 3),
        "loop_trials_s": _median_split(loops, "trials"), "launch_trials_s": _median_split(launches, "trials"),
        "loop_outside_s": _median_split(loops, "outside"), "launch_outside_s": _median_split(launches, "outside"),
    }))


if __name__ == "__main__":
    main()
