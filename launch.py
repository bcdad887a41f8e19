#!/usr/bin/env python
"""Search decoders, backbones, losses, augmentations and resizes with Ray Tune (Optuna TPE + ASHA).

    python launch.py                                      # CPU demo on the built-in sample dataset
    python launch.py --space search_spaces/full.yaml --data /data/trash --gpus 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from errors import UserError, run_cli

DEFAULT_SPACE = Path(__file__).resolve().parent / "search_spaces" / "quick.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="search space YAML (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset root with train.json/val.json/test.json (default: the built-in sample)")
    parser.add_argument("--gpus", type=float, default=0, help="GPUs to use in all (0 = CPU only)")
    parser.add_argument("--num-samples", type=int, default=None, help="trials to run (default: from the space)")
    parser.add_argument("--name", default=None, help="experiment name (default: search-<timestamp>)")
    parser.add_argument("--storage", type=Path, default=Path("runs"), help="where experiments live (default: runs)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="train without images that fail validation (listed in a warning) instead of stopping")
    args = parser.parse_args(argv)
    if args.gpus < 0:
        parser.error(f"--gpus must be >= 0, got {args.gpus}")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
    return args


def _check_gpus(requested: float) -> None:
    import torch

    available = torch.cuda.device_count()
    if requested > available:
        raise UserError(f"--gpus {requested:g} asks for more GPUs than this machine has ({available})")


def _validate_data(spec, data_root: Path, skip_bad: bool) -> tuple[list[str], str, int]:
    """Checks the annotation files the search trains and validates on, and every image they list,
    before Ray starts. Returns (file_names to leave out, image counts, number of classes)."""
    from data_pipeline.coco import CocoSegmentation
    from data_pipeline.validate import check_usable, format_warning, validate_dataset

    if not data_root.is_dir():
        raise UserError(f"data root {data_root} does not exist or is not a folder")
    d = spec.data
    files = {"train": d.train, "val": d.val} if d.split == "given" else {f"{d.folds}-fold": d.train_all}
    skip, counts, classes = [], [], {}
    for role, ann in files.items():
        report = validate_dataset(data_root, ann, class_map=spec.class_map)
        bad = check_usable(report, skip_bad)
        if bad:
            print(format_warning(report), file=sys.stderr, flush=True)
        skip += bad
        counts.append(f"{report.num_images - len(bad)} {role}")
        classes[ann] = CocoSegmentation(data_root, ann, class_map=spec.class_map).class_names
    _check_test_images(data_root, d.test, spec.class_map)
    (first, first_names), *others = classes.items()
    for ann, names in others:
        if names != first_names:
            raise UserError(f"{data_root / first} and {data_root / ann} have different classes: "
                            f"{first_names} vs {names}")
    return skip, " / ".join(counts) + " images", len(first_names)


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


def main(argv=None) -> int:
    args = parse_args(argv)
    from search.space import load_space

    spec = load_space(args.space)
    _check_gpus(args.gpus)
    if args.data is None:
        from data_pipeline.sample_data import ensure_sample_dataset

        print("Using the built-in sample dataset (generated on first use)...", flush=True)
        data_root = ensure_sample_dataset()
    else:
        data_root = args.data.resolve()
    skip, counts, num_classes = _validate_data(spec, data_root, args.skip_bad)
    storage = args.storage.resolve()
    name = args.name or time.strftime("search-%Y%m%d-%H%M%S")
    if (storage / name).exists():
        raise UserError(f"experiment {storage / name} already exists; choose another --name")

    from search.experiment import format_table, leaderboard_rows, read_trials, write_leaderboard
    from search.tune_runner import run_search, start_ray

    print(f"Data: {data_root} ({counts}, {num_classes} classes)\nSpace: {args.space}\n"
          f"Experiment: {storage / name}", flush=True)
    dashboard = start_ray(args.gpus)
    if dashboard:
        print(f"Ray dashboard: http://{dashboard} (local only; Ray's token is in ~/.ray/auth_token)", flush=True)
    experiment = run_search(spec, data_root, storage=storage, name=name, gpus=args.gpus,
                            num_samples=args.num_samples, skip=skip)
    trials = read_trials(experiment)
    rows = leaderboard_rows(trials)
    path = write_leaderboard(experiment, rows)
    print(f"\nLeaderboard ({path}):\n{format_table(rows)}")
    errored = [t for t in trials if t.status == "errored"]
    if errored:
        print(f"{len(errored)} trial(s) errored; trial {errored[0].trial_id}: {errored[0].error}", file=sys.stderr)
    if not any(r["best_val_miou"] for r in rows):
        print("error: no trial reported a val mIoU; see the errors above", file=sys.stderr)
        return 1
    print(f"\nNext: python ensemble_select.py --experiment {experiment} --topk 5")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
