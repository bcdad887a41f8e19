#!/usr/bin/env python
"""Search decoders, backbones, losses, augmentations and resizes with Ray Tune (Optuna TPE + ASHA).

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
import sys
import time
from pathlib import Path

from atomic_file import write_atomically
from errors import UserError, run_cli

DEFAULT_SPACE = Path(__file__).resolve().parent / "search_spaces" / "quick.yaml"


LAUNCH_FILE = "launch.json"  # what --resume needs, saved beside the experiment at start
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
                                          ("--time-budget", args.time_budget),
                                          ("--dry-run", args.dry_run)) if value not in (None, False)]
        if given:
            parser.error(f"--resume continues the experiment as it was started; leave out {', '.join(given)}")
    if args.address and args.dashboard_host != "127.0.0.1":
        parser.error("--dashboard-host applies to a Ray instance launch.py starts, not to one joined with --address")
    args.space = args.space or DEFAULT_SPACE
    args.gpus = args.gpus or 0
    return args


def _check_gpus(requested: float) -> None:
    import torch

    available = torch.cuda.device_count()
    if requested > available:
        raise UserError(f"--gpus {requested:g} asks for more GPUs than this machine has ({available})")


def _validate_data(spec, data_root: Path, skip_bad: bool) -> tuple[list[str], str, int]:
    """Checks the annotation files the search trains and validates on (pseudo-labels included), and
    every image they list, before Ray starts. Returns (file_names to leave out, image counts, number
    of classes)."""
    from data_pipeline.pseudo_labels import pseudo_class_map

    if not data_root.is_dir():
        raise UserError(f"data root {data_root} does not exist or is not a folder")
    d = spec.data
    files = {"train": d.train, "val": d.val} if d.split == "given" else {f"{d.folds}-fold": d.train_all}
    skip, counts, classes = [], [], {}
    for role, ann in files.items():
        report, bad = _checked(data_root, ann, spec.class_map, skip_bad)
        skip += bad
        counts.append(f"{report.num_images - len(bad)} {role}")
        classes[ann] = report.class_names
    _check_test_images(data_root, d.test, spec.class_map)
    (first, first_names), *others = classes.items()
    for ann, names in others:
        if names != first_names:
            raise UserError(f"{data_root / first} and {data_root / ann} have different classes: "
                            f"{first_names} vs {names}")
    _check_unknown_class(spec, first, first_names)
    for ann in d.pseudo_labels:  # in the search's classes (and Uncertain), or refused
        report, bad = _checked(data_root, ann, pseudo_class_map(first_names), skip_bad)
        skip += bad
        counts.append(f"{report.num_images - len(bad)} pseudo-labelled")
    return skip, " / ".join(counts) + " images", len(first_names)


def _check_unknown_class(spec, ann: str, class_names) -> None:
    """A space whose trials may treat UNKNOWN their own way needs an UNKNOWN class in the data."""
    from data_pipeline.classes import ClassMap, unknown_label
    from search.space import possible_values

    treatments = sorted(set(possible_values(spec.params, "unknown")) - {"keep"})
    if treatments and unknown_label(class_names, spec.class_map) is None:
        names = ", ".join((spec.class_map or ClassMap()).unknown_names)
        raise UserError(f"space.unknown: {treatments[0]} needs an UNKNOWN class, but {ann} has no category named "
                        f"{names} (its classes: {', '.join(class_names)}); name it with the class map's unknown.names")


def _checked(data_root: Path, ann: str, class_map, skip_bad: bool):
    """(validation report, file_names to leave out) of one annotation file; warns about those."""
    from data_pipeline.validate import check_usable, format_warning, validate_dataset

    report = validate_dataset(data_root, ann, class_map=class_map)
    bad = check_usable(report, skip_bad)
    if bad:
        print(format_warning(report), file=sys.stderr, flush=True)
    return report, bad


def _check_test_images(data_root: Path, test_ann: str, class_map) -> None:
    """The test images must all be readable now: the submission needs a row for each of them."""
    from data_pipeline.validate import summarise, validate_dataset

    if not (data_root / test_ann).is_file():
        print(f"warning: {data_root / test_ann} does not exist; ensemble_select.py will need it", file=sys.stderr)
        return
    report = validate_dataset(data_root, test_ann, class_map=class_map, require_annotations=False)
    if report.problems():
        raise UserError(f"{test_ann} cannot be used (test images cannot be skipped: the submission needs "
                        f"every one): {summarise(report.problems())}")


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
    from search.experiment import is_experiment

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


def _print_plan(spec, space: Path, data_root: Path, counts: str, num_classes: int, experiment: Path, args,
                wandb_mode: str | None) -> None:
    from search.space import describe
    from search.tune_runner import concurrency, trial_resources

    e = spec.experiment
    res = trial_resources(e, args.gpus)
    if args.address:
        at_once = f"as the cluster at {args.address} allows (not known without joining it)"
    else:
        at_once = f"up to {concurrency(e, os.cpu_count() or 1, args.gpus)} at once ({os.cpu_count()} CPUs, {args.gpus:g} GPUs)"
    rungs = [e.grace_period * e.reduction_factor ** k
             for k in range(int(math.log(e.max_epochs / e.grace_period, e.reduction_factor) + 1e-9) + 1)]
    stopping = (f"ASHA grace_period {e.grace_period}, reduction_factor {e.reduction_factor} "
                f"(rungs at epochs {', '.join(map(str, rungs))})" if e.scheduler == "asha" else "FIFO (no early stopping)")
    print(f"Dry run: nothing started.\nData: {data_root} ({counts}, {num_classes} classes)\nSpace: {space}\n"
          f"Experiment: {experiment}\n"
          f"Trials: {args.num_samples or e.num_samples}, {at_once}; each {res['cpu']:g} CPUs, {res['gpu']:g} GPUs\n"
          f"Epochs: up to {e.max_epochs}; {stopping}\n"
          f"Time budget: {_format_duration(args.time_budget) if args.time_budget else 'none'}\n"
          f"Ranking: {e.metric} ({e.mode}); seed {e.seed}; max_failures {e.max_failures}\n"
          f"wandb: {wandb_mode or 'off'}\nSearch space:")
    for line in describe(spec):
        print(f"  {line}")
    _print_weights(spec)


def _check_weights_cached(spec) -> None:
    """Every pretrained encoder the space can propose must be in the cache (or downloadable) before
    Ray starts: a trial would otherwise fail on it (it never trains random weights instead)."""
    from models.factory import cached_weights
    from models.weights import hub_reachable
    from search.space import pretrained_encoders

    for backbone, weights in pretrained_encoders(spec):
        found, hint = cached_weights(backbone, weights)
        if not found and not hub_reachable():
            raise UserError(f"space: backbone {backbone} with encoder_weights {weights!r} {hint}")


def _print_weights(spec) -> None:
    """Whether the weight files of every pretrained encoder the space can propose are in the cache."""
    from models.factory import cached_weights, input_normalization
    from search.space import pretrained_encoders

    pairs = pretrained_encoders(spec)
    if pairs:
        print("Pretrained encoders:")
    for backbone, weights in pairs:
        found, hint = cached_weights(backbone, weights)
        if found:
            norm = input_normalization(backbone, weights)
            print(f"  {backbone} {weights}: cached ({found}); input mean {norm['mean']}, std {norm['std']}")
        else:
            print(f"  {backbone} {weights}: MISSING, trials using it will fail: {hint}")


def _format_duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def main(argv=None) -> int:
    args = parse_args(argv)
    storage = args.storage.resolve()
    wandb_mode = _wandb_mode(args)
    if args.dashboard_host not in LOCAL_HOSTS:
        print(f"warning: the Ray dashboard will listen on {args.dashboard_host}: the dashboard and its job API run "
              f"code for anyone who reaches them (Ray's token is all that stands in the way)",
              file=sys.stderr, flush=True)
    if args.resume:
        experiment = storage / args.name
        settings = _read_launch_file(experiment)
        from search.space import ExperimentSettings

        e = ExperimentSettings(**settings["experiment"])
        gpus, data_root = float(settings["gpus"]), Path(settings["data_root"])
        if not data_root.is_dir():
            raise UserError(f"--resume: the experiment's data root {data_root} does not exist any more")
        if not args.address:
            _check_gpus(gpus)
        wandb_mode = _wandb_mode_on_resume(args, wandb_mode, settings)
        print(f"Resuming {experiment} (data {data_root}, space {settings.get('space', '?')})", flush=True)
    else:
        from search.space import load_space

        spec = load_space(args.space)
        e = spec.experiment
        if not args.address:
            _check_gpus(args.gpus)
        if args.data is None:
            from data_pipeline.sample_data import ensure_sample_dataset

            print("Using the built-in sample dataset (generated on first use)...", flush=True)
            data_root = ensure_sample_dataset()
        else:
            data_root = args.data.resolve()
        skip, counts, num_classes = _validate_data(spec, data_root, args.skip_bad)
        name = args.name or time.strftime("search-%Y%m%d-%H%M%S")
        experiment = storage / name
        if experiment.exists():
            raise UserError(f"experiment {experiment} already exists; choose another --name (or --resume it)")
        if args.dry_run:
            _print_plan(spec, args.space, data_root, counts, num_classes, experiment, args, wandb_mode)
            return 0
        if not args.address:  # on a cluster the weights must be on the workers' nodes, not necessarily here
            _check_weights_cached(spec)
        gpus = args.gpus
        print(f"Data: {data_root} ({counts}, {num_classes} classes)\nSpace: {args.space}\n"
              f"Experiment: {experiment}", flush=True)

    from search.experiment import best_trial_summary, format_table, leaderboard_rows, read_trials, write_leaderboard
    from search.trainable import DEADLINE_ENV
    from search.tune_runner import auth_token_path, resume_search, run_search, start_ray, trial_resources

    if wandb_mode:
        os.environ["WANDB_MODE"] = wandb_mode  # before Ray starts: the workers inherit it
    os.environ.pop(DEADLINE_ENV, None)
    if args.time_budget:  # trials plan their last epoch to end by it (search.trainable)
        os.environ[DEADLINE_ENV] = str(time.time() + args.time_budget)
    dashboard = start_ray(gpus, dashboard_host=args.dashboard_host, address=args.address)
    if dashboard:
        where = "local only" if args.dashboard_host in LOCAL_HOSTS and not args.address else "reachable from the network"
        print(f"Ray dashboard: http://{dashboard} ({where}; it asks for Ray's token: "
              f"`ray get-auth-token` prints it, from {auth_token_path()}; API clients send `Authorization: Bearer "
              f"<token>`)", flush=True)
    if args.resume:
        resume_search(experiment, trial_resources(e, gpus))
    else:
        write_atomically(experiment / LAUNCH_FILE, json.dumps({
            "space": str(args.space.resolve()), "experiment": dataclasses.asdict(e), "data_root": str(data_root),
            "skip": sorted(skip), "gpus": gpus, "num_samples": args.num_samples or e.num_samples,
            "wandb": wandb_mode is not None, "time_budget_s": args.time_budget,
        }, indent=2))
        run_search(spec, data_root, storage=storage, name=experiment.name, gpus=gpus,
                   num_samples=args.num_samples, skip=skip, wandb=wandb_mode is not None,
                   time_budget_s=args.time_budget)
    trials = read_trials(experiment)
    rows = leaderboard_rows(trials)
    path = write_leaderboard(experiment, rows)
    print(f"\nLeaderboard ({path}):\n{format_table(rows)}\n\n{best_trial_summary(trials)}")
    errored = [t for t in trials if t.status == "errored"]
    if errored:
        print(f"{len(errored)} trial(s) errored (each tried {e.max_failures + 1} time(s)); "
              f"trial {errored[0].trial_id}: {errored[0].error}", file=sys.stderr)
    if not any(r["best_val_miou"] for r in rows):
        print("error: no trial reported a val mIoU; see the errors above", file=sys.stderr)
        return 1
    from search.report import report_after_run

    report_after_run(experiment)
    print(f"\nNext: python ensemble_select.py --experiment {experiment} --topk 5")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
