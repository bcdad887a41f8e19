"""What the search service costs: N identical fixed trials through launch.py (Ray Tune, Optuna,
ASHA that never stops a trial, checkpoints, leaderboard) vs the same trainings in a plain loop
(search.trainable.build_trial + run_epochs, no Ray), in the same run, each in a fresh interpreter.

Both sides use the same torch threads in all: launch.py gives each trial --cpus CPUs (one trial at a
time), the loop sets the same thread count. The data cache is built before either side is timed.

    .venv/bin/python bench/search_overhead.py [--data DIR] [--trials 3] [--epochs 6] [--resize 96]

Last line: JSON with the wall time of each side, the overhead ratio (launch / loop, goal <= 1.15
for trials of >= 30 s) and the mean trial time inside Tune vs in the loop.
"""
from __future__ import annotations

import argparse
import json
import os
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

    times = []
    for _ in range(trials):
        started = time.perf_counter()
        run_epochs(build_trial(trial_config(space, data)), lambda metrics, directory: None)
        times.append(time.perf_counter() - started)
    print(json.dumps({"trial_times_s": times}))


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return wall, result.stdout


def tune_trial_times(experiment: Path) -> list[float]:
    from ray.tune import ExperimentAnalysis

    return [t.last_result["time_total_s"] for t in ExperimentAnalysis(str(experiment)).trials]


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
        loop_wall, loop_out = timed([sys.executable, __file__, "--loop", str(space), "--data", str(args.data),
                                     "--trials", str(args.trials)])
        loop_trials = json.loads(loop_out.strip().splitlines()[-1])["trial_times_s"]
        launch_wall, _ = timed([sys.executable, str(ROOT / "launch.py"), "--space", str(space), "--data",
                                str(args.data), "--storage", str(work / "runs"), "--name", "overhead", "--no-wandb"])
        tune_trials = tune_trial_times(work / "runs" / "overhead")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(json.dumps({
        "trials": args.trials, "epochs": args.epochs, "resize": args.resize, "cpus": args.cpus,
        "loop_wall_s": round(loop_wall, 1), "launch_wall_s": round(launch_wall, 1),
        "overhead_ratio": round(launch_wall / loop_wall, 3),
        "mean_trial_s_loop": round(mean(loop_trials), 1), "mean_trial_s_tune": round(mean(tune_trials), 1),
        "trial_ratio": round(mean(tune_trials) / mean(loop_trials), 3),
    }))


if __name__ == "__main__":
    main()
