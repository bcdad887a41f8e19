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


def main(argv=None) -> int:
    args = parse_args(argv)
    from data_pipeline.coco import CocoSegmentation
    from search.space import load_space

    spec = load_space(args.space)
    _check_gpus(args.gpus)
    if args.data is None:
        from data_pipeline.sample_data import ensure_sample_dataset

        print("Using the built-in sample dataset (generated on first use)...", flush=True)
        data_root = ensure_sample_dataset()
    else:
        data_root = args.data.resolve()
    train, val = CocoSegmentation(data_root, spec.data.train), CocoSegmentation(data_root, spec.data.val)
    if train.class_names != val.class_names:
        raise UserError(f"{train.ann_path} and {val.ann_path} have different categories")
    for split in (train, val):
        split.check_images_exist()
    storage = args.storage.resolve()
    name = args.name or time.strftime("search-%Y%m%d-%H%M%S")
    if (storage / name).exists():
        raise UserError(f"experiment {storage / name} already exists; choose another --name")

    from search.experiment import format_table, leaderboard_rows, read_trials, write_leaderboard
    from search.tune_runner import run_search, start_ray

    print(f"Data: {data_root} ({len(train.image_ids)} train / {len(val.image_ids)} val images, "
          f"{train.num_classes} classes)\nSpace: {args.space}\nExperiment: {storage / name}", flush=True)
    dashboard = start_ray(args.gpus)
    if dashboard:
        print(f"Ray dashboard: http://{dashboard} (local only; Ray's token is in ~/.ray/auth_token)", flush=True)
    experiment = run_search(spec, data_root, storage=storage, name=name, gpus=args.gpus,
                            num_samples=args.num_samples)
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
