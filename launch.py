#!/usr/bin/env python
"""Search decoders, backbones, losses, augmentations and resizes with Ray Tune: Optuna TPE proposes, the space
chooses the scheduler (ASHA stops weak trials early; FIFO trains each to max_epochs).

    python launch.py                                      # CPU demo on the built-in sample dataset
    python launch.py --space search_spaces/full.yaml --data /data/trash --gpus 4
    python launch.py --resume --name NAME                 # continue an interrupted experiment
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from atomic_file import write_atomically
from errors import UserError, exit_cli

DEFAULT_SPACE = Path(__file__).resolve().parent / "search_spaces" / "quick.yaml"


DRIVER_LOG = "driver.log"  # everything the search printed, Ray's, Tune's and wandb's output included
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def duration(text: str) -> float:
    """Seconds in '90', '90s', '20m', '1.5h' or '1h30m' (argparse type: a bad value is a usage error)."""
    rest, seconds = text.strip().lower(), 0.0
    try:
        if rest.replace(".", "", 1).isdigit():  # a bare number is seconds; '1h30' is refused, not guessed
            rest += "s"
        while rest:
            number = rest[:next(i for i, c in enumerate(rest) if c in DURATION_UNITS)]
            seconds += float(number) * DURATION_UNITS[rest[len(number)]]
            rest = rest[len(number) + 1:]
    except (StopIteration, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 20m, 1h30m or 900s") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the time budget must be positive")
    return seconds


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=None, help=f"search space YAML (default: {DEFAULT_SPACE})")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset root with train.json/val.json/test.json (default: the built-in sample)")
    parser.add_argument("--gpus", type=float, default=None, help="GPUs to use in all (default 0 = CPU only)")
    parser.add_argument("--num-samples", type=int, default=None, help="trials to run (default: from the space)")
    parser.add_argument("--name", default=None, help="experiment name (default: search-<timestamp>)")
    parser.add_argument("--storage", type=Path, default=Path("runs"), help="where experiments live (default: runs)")
    parser.add_argument("--time-budget", type=duration, default=None, metavar="DURATION",
                        help="wall-clock budget of the whole search (20m, 1h30m, 900s): each trial plans its "
                             "last epoch to end before it, with its lr schedule annealed by then; none trains "
                             "past it, and each keeps its best checkpoint")
    parser.add_argument("--warm-start", type=Path, default=None, metavar="EXPERIMENT",
                        help="begin with the best configurations of an earlier experiment (those this space admits)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="train without images that fail validation (listed in a warning) instead of stopping")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted experiment --name (space and data as it was started with)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the space and data, print the plan and exit without starting Ray")
    parser.add_argument("--wandb", choices=("offline", "online"), default=None,
                        help="wandb mode (default: online if WANDB_API_KEY is set, else offline)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log trials to wandb")
    parser.add_argument("--dashboard-host", default="127.0.0.1",
                        help="address the Ray dashboard binds to (default: %(default)s, this machine only)")
    parser.add_argument("--address", default=None,
                        help="join an existing Ray cluster (auto, HOST:PORT or ray://HOST:PORT) instead of starting one")
    args = parser.parse_args(argv)
    if args.gpus is not None and args.gpus < 0:
        parser.error(f"--gpus must be >= 0, got {args.gpus}")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.no_wandb and args.wandb:
        parser.error("--no-wandb and --wandb contradict each other")
    if args.resume:
        if not args.name:
            parser.error("--resume needs --name (the experiment to continue)")
        given = [flag for flag, value in (("--space", args.space), ("--data", args.data), ("--gpus", args.gpus),
                                          ("--num-samples", args.num_samples), ("--skip-bad", args.skip_bad),
                                          ("--time-budget", args.time_budget), ("--warm-start", args.warm_start),
                                          ("--dry-run", args.dry_run)) if value not in (None, False)]
        if given:
            parser.error(f"--resume continues the experiment as it was started; leave out {', '.join(given)}")
    if args.address and args.dashboard_host != "127.0.0.1":
        parser.error("--dashboard-host applies to a Ray instance launch.py starts, not to one joined with --address")
    args.space = args.space or DEFAULT_SPACE
    args.gpus = args.gpus or 0
    return args


def _check_installed() -> None:
    """Ray's trial workers import the project as an installed package, not from this folder: it must be
    installed (`pip install -e .`), and from this checkout, or trials would run other code or none."""
    import subprocess
    import tempfile

    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as elsewhere:  # where this folder is not on the import path
        found = subprocess.run([sys.executable, "-c", "import search; print(search.__file__)"], cwd=elsewhere,
                               capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                    if k != "PYTHONPATH"})
    if found.returncode:
        raise UserError(f"the project is not installed in {sys.executable}'s environment; run "
                        f"`{sys.executable} -m pip install -e {here}` (Ray's trial workers import it as a package)")
    installed = Path(found.stdout.strip()).resolve().parent.parent
    if installed != here:
        raise UserError(f"this Python imports the project from {installed}, not from {here}; run "
                        f"`{sys.executable} -m pip install -e {here}` (Ray's trial workers import the installed one)")


def _check_gpus(requested: float) -> None:
    import torch

    available = torch.cuda.device_count()
    if requested > available:
        raise UserError(f"--gpus {requested:g} asks for more GPUs than this machine has ({available})")


def _warm_start(spec, experiment: Path) -> list[dict]:
    """The best configurations of an earlier experiment that this space can take (search.experiment)."""
    from search.experiment import read_trials, warm_start_points

    points = warm_start_points(spec, read_trials(experiment))
    if not points:
        raise UserError(f"--warm-start {experiment}: none of its trials has a checkpoint and a searched parameter "
                        f"this space admits")
    return points


def _check_trial_fits(e, args) -> None:
    """A trial that needs more CPUs or GPUs than this machine has would wait for ever: Ray never
    schedules it."""
    cpus = os.cpu_count() or 1
    if e.cpus_per_trial > cpus:
        raise UserError(f"{args.space}: experiment.cpus_per_trial is {e.cpus_per_trial:g}, but this machine has "
                        f"{cpus} CPUs: no trial could ever start; set cpus_per_trial to at most {cpus}")
    if args.gpus > 0 and e.gpus_per_trial > args.gpus:
        raise UserError(f"{args.space}: experiment.gpus_per_trial is {e.gpus_per_trial:g}, more than --gpus "
                        f"{args.gpus:g}: no trial could ever start; give more GPUs or lower gpus_per_trial")


def _wandb_warnings(args) -> list[str]:
    """wandb online without credentials fails in every trial's logger, not at start."""
    if _wandb_mode(args) != "online" or os.environ.get("WANDB_API_KEY"):
        return []
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"):
        return []
    return ["wandb is online but no credentials were found (WANDB_API_KEY or `wandb login`): trials cannot log "
            "there; run `wandb login`, or use --wandb offline"]


def _wandb_mode(args) -> str | None:
    """None = wandb off; else the WANDB_MODE workers get (an explicit WANDB_MODE in the environment
    is kept when --wandb is not given)."""
    if args.no_wandb:
        return None
    if args.wandb:
        return args.wandb
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def _wandb_mode_on_resume(args, wandb_mode: str | None, settings: dict) -> str | None:
    """The wandb logger is part of the saved experiment: resume keeps it unless --no-wandb switches it
    to wandb's disabled mode; it cannot be added to an experiment started without it."""
    if args.no_wandb:
        return "disabled"
    if not settings.get("wandb", True):
        if args.wandb:
            raise UserError(f"--resume: {args.name} was started with --no-wandb; wandb logging cannot be added now")
        return None
    return wandb_mode


def _read_launch_file(experiment: Path) -> dict:
    from search.experiment import LAUNCH_FILE, is_experiment

    path = experiment / LAUNCH_FILE
    if not experiment.is_dir():
        raise UserError(f"--resume: experiment {experiment} does not exist")
    if not path.is_file() or not is_experiment(experiment):
        raise UserError(f"--resume: {experiment} is not an experiment started by launch.py "
                        f"(no {LAUNCH_FILE} or no Ray Tune state)")
    try:
        settings = json.loads(path.read_text())
        settings["experiment"], settings["data_root"], settings["gpus"]  # noqa: B018 (the keys resume needs)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: {path} is unreadable or incomplete ({exc!r})") from None
    return settings


def _print_plan(launch: Launch, checked, args) -> None:
    from search.preflight import training_sources, weights_report
    from search.space import describe, eval_size
    from search.tune_runner import concurrency, trial_resources

    e, spec = launch.settings, launch.spec
    res = trial_resources(e, args.gpus)
    if args.address:
        at_once = f"as the cluster at {args.address} allows (not known without joining it)"
    else:
        at_once = f"up to {concurrency(e, os.cpu_count() or 1, args.gpus)} at once ({os.cpu_count()} CPUs, {args.gpus:g} GPUs)"
    stopping = (f"ASHA grace_period {e.grace_period}, reduction_factor {e.reduction_factor} "
                f"(rungs at epochs {', '.join(map(str, e.rungs))})" if e.scheduler == "asha" else "FIFO (no early stopping)")
    print(f"Dry run: nothing started.\nData: {launch.data_root} ({checked.summary}, {checked.num_classes} classes)\n"
          f"Space: {args.space}\nExperiment: {launch.experiment}\n"
          f"Trials: {args.num_samples or e.num_samples}, {at_once}; each {res['cpu']:g} CPUs, {res['gpu']:g} GPUs\n"
          f"Epochs: up to {e.max_epochs}; {stopping}\n"
          f"Time budget: {_format_duration(args.time_budget) if args.time_budget else 'none'}\n"
          f"Ranking: {e.metric} ({e.mode}) on {eval_size(spec)} px val label maps; seed {e.seed}"
          f"{' + the trial number' if e.seed_per_trial else ', shared by every trial'}; "
          f"max_failures {e.max_failures}\n"
          f"wandb: {launch.wandb_mode or 'off'}\nSearch space:")
    for line in describe(spec):
        print(f"  {line}")
    print("Training data by source:\n" + "\n".join(f"  {line}" for line in training_sources(spec.data, launch.data_root)))
    weights = weights_report(spec)
    if weights:
        print("Pretrained encoders:\n" + "\n".join(f"  {line}" for line in weights))


def _format_duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


@dataclasses.dataclass
class Launch:
    """What starting Ray and the search needs, for a new search or a resumed one."""
    experiment: Path
    settings: object  # search.space.ExperimentSettings
    gpus: float
    wandb_mode: str | None
    spec: object = None  # search.space.SearchSpec of a new search (a resumed one keeps Tune's state)
    data_root: Path | None = None
    skip: list = dataclasses.field(default_factory=list)
    header: str = ""  # what the console says first about the search


def main(argv=None) -> int:
    args = parse_args(argv)
    _check_installed()
    if args.dashboard_host not in LOCAL_HOSTS:
        print(f"warning: the Ray dashboard will listen on {args.dashboard_host}: the dashboard and its job API run "
              f"code for anyone who reaches them (Ray's token is all that stands in the way)",
              file=sys.stderr, flush=True)
    launch = _resumed(args) if args.resume else _new_search(args)
    if launch is None:  # --dry-run: the plan is printed, nothing started
        return 0
    from driver_log import output_to_log
    from search.experiment import LAUNCH_FILE

    log = launch.experiment / DRIVER_LOG
    try:
        with output_to_log(log) as console:  # Ray's, Tune's and wandb's output: in the log only
            console.print(launch.header + f"\nFull output: {log}")
            return _run(args, launch, console)
    except BaseException:
        if not args.resume and not (launch.experiment / LAUNCH_FILE).exists():
            # Ray never got to start the search: no half-made experiment keeps the name from a second try
            shutil.rmtree(launch.experiment, ignore_errors=True)
        raise


def _run(args, launch: Launch, console) -> int:
    import ray

    _start_ray(args, launch, console)
    from search.tune_runner import resume_search, run_search, trial_resources

    stopping = None
    try:
        if args.resume:
            resume_search(launch.experiment, trial_resources(launch.settings, launch.gpus))
        else:
            _write_launch_file(args, launch)
            run_search(launch.spec, launch.data_root, storage=launch.experiment.parent, name=launch.experiment.name,
                       gpus=launch.gpus, num_samples=args.num_samples, skip=launch.skip,
                       wandb=launch.wandb_mode is not None, time_budget_s=args.time_budget)
        # The leaderboard and report read files only: Ray shuts down meanwhile (about a second,
        # spent waiting for its processes to exit one after another).
        stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
        stopping.start()
        return _finish(launch, console)
    finally:  # while the output still goes to the log: the workers' last words land there
        if stopping is None:
            ray.shutdown()
        else:
            stopping.join()


def _resumed(args) -> Launch:
    """An interrupted experiment, as launch.json says it was started."""
    from search.space import ExperimentSettings

    experiment = args.storage.resolve() / args.name
    settings = _read_launch_file(experiment)
    gpus, data_root = float(settings["gpus"]), Path(settings["data_root"])
    if not data_root.is_dir():
        raise UserError(f"--resume: the experiment's data root {data_root} does not exist any more")
    if not args.address:
        _check_gpus(gpus)
    wandb_mode = _wandb_mode_on_resume(args, _wandb_mode(args), settings)
    return Launch(experiment, ExperimentSettings(**settings["experiment"]), gpus, wandb_mode, data_root=data_root,
                  header=f"Resuming {experiment} (data {data_root}, space {settings.get('space', '?')}); "
                         f"Tune's progress goes to the log only")


def _new_search(args) -> Launch | None:
    """A new search, its space and data checked before Ray starts; None after a dry run."""
    from search.preflight import check_data, check_weights_cached
    from search.space import load_space, never_active

    spec = load_space(args.space)
    if not args.address:
        _check_gpus(args.gpus)
        _check_trial_fits(spec.experiment, args)
    warm = _warm_start(spec, args.warm_start) if args.warm_start else []
    spec = dataclasses.replace(spec, first_trials=(*warm, *spec.first_trials))
    for warning in never_active(spec) + _wandb_warnings(args):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    data_root = _data_root(args)
    checked = check_data(spec, data_root, args.skip_bad)
    for warning in checked.warnings:
        print(warning, file=sys.stderr, flush=True)
    spec = dataclasses.replace(spec, data=spec.data.skipping_extra(checked.extra_skip))
    experiment = args.storage.resolve() / (args.name or time.strftime("search-%Y%m%d-%H%M%S"))
    if experiment.exists():
        raise UserError(f"experiment {experiment} already exists; choose another --name (or --resume it)")
    launch = Launch(experiment, spec.experiment, args.gpus, _wandb_mode(args), spec, data_root, checked.skip)
    if args.dry_run:
        _print_plan(launch, checked, args)
        return None
    if not args.address:  # on a cluster the weights must be on the workers' nodes, not necessarily here
        check_weights_cached(spec)
    launch.header = (f"Data: {data_root} ({checked.summary}, {checked.num_classes} classes)\nSpace: {args.space}\n"
                     f"Experiment: {experiment}"
                     + (f"\nWarm start: the first {len(warm)} trial(s) take the best configurations of "
                        f"{args.warm_start}" if warm else ""))
    return launch


def _data_root(args) -> Path:
    if args.data is not None:
        return args.data.resolve()
    from data_pipeline.sample_data import ensure_sample_dataset

    print("Using the built-in sample dataset (generated on first use)...", flush=True)
    return ensure_sample_dataset()


def _start_ray(args, launch: Launch, console) -> None:
    """Sets what trial workers inherit (wandb's mode, the time budget's deadline), then starts or joins Ray."""
    from search.trainable import DEADLINE_ENV
    from search.tune_runner import auth_token_path, start_ray

    if launch.wandb_mode:
        os.environ["WANDB_MODE"] = launch.wandb_mode  # before Ray starts: the workers inherit it
    os.environ.pop(DEADLINE_ENV, None)
    if args.time_budget:  # trials plan their last epoch to end by it (search.trainable)
        os.environ[DEADLINE_ENV] = str(time.time() + args.time_budget)
    dashboard = start_ray(launch.gpus, dashboard_host=args.dashboard_host, address=args.address)
    if dashboard:
        where = "local only" if args.dashboard_host in LOCAL_HOSTS and not args.address else "reachable from the network"
        console.print(f"Ray dashboard: http://{dashboard} ({where}; it asks for Ray's token: "
                      f"`ray get-auth-token` prints it, from {auth_token_path()}; API clients send `Authorization: "
                      f"Bearer <token>`)")


def _write_launch_file(args, launch: Launch) -> None:
    """What --resume needs, beside the experiment."""
    from search.experiment import LAUNCH_FILE

    e = launch.settings
    write_atomically(launch.experiment / LAUNCH_FILE, json.dumps({
        "space": str(args.space.resolve()), "experiment": dataclasses.asdict(e), "data_root": str(launch.data_root),
        "skip": sorted(launch.skip), "gpus": launch.gpus, "num_samples": args.num_samples or e.num_samples,
        "wandb": launch.wandb_mode is not None, "time_budget_s": args.time_budget,
        "extra_data": [source.name for source in launch.spec.data.sources()],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2))


def _finish(launch: Launch, console) -> int:
    """The leaderboard, the best trial and the report; exit code 1 when no trial reported a val mIoU."""
    from search.experiment import (best_trial_summary, format_table, leaderboard_rows, read_trials, varying_columns,
                                   write_leaderboard, write_storage_leaderboard)
    from search.report import report_after_run

    trials = read_trials(launch.experiment)
    rows = leaderboard_rows(trials, launch.experiment)
    path = write_leaderboard(launch.experiment, rows)
    every = write_storage_leaderboard(launch.experiment.parent)
    console.print(f"\nLeaderboard ({path}; every experiment under {every.parent}: {every}):\n"
                  f"{format_table(rows, varying_columns(rows))}\n\n{best_trial_summary(trials)}")
    errored = [t for t in trials if t.status == "errored"]
    if errored:
        console.print(f"{len(errored)} trial(s) errored (each tried {launch.settings.max_failures + 1} time(s)); "
                      f"trial {errored[0].trial_id}: {errored[0].error}", error=True)
    if not any(r["best_val_miou"] for r in rows):
        console.print("error: no trial reported a val mIoU; see the errors above", error=True)
        return 1
    console.print(report_after_run(launch.experiment))
    console.print(f"\nNext: python ensemble_select.py --experiment {launch.experiment} --topk 5")
    return 0


if __name__ == "__main__":
    exit_cli(main)
