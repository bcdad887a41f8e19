#!/usr/bin/env python
"""Build a weighted ensemble of the best trials that share a backbone and write the submission.

    python ensemble_select.py --topk 5                     # most recent experiment under ./runs
    python ensemble_select.py --experiment runs/search-20261128-120000 --topk 3 --out submission.csv
"""
from __future__ import annotations

import argparse
from pathlib import Path

from errors import exit_cli
from models.inference import TTA_MODES


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, default=None, help="experiment folder (default: the most recent)")
    parser.add_argument("--storage", type=Path, default=Path("runs"), help="where experiments live (default: runs)")
    parser.add_argument("--topk", type=int, default=5, help="candidates: the K best trials of the backbone")
    parser.add_argument("--backbone", default=None,
                        help="backbone to ensemble (default: the best trial's; auto: try every backbone, keep the best)")
    parser.add_argument("--out", type=Path, default=None,
                        help="submission CSV (default: EXPERIMENT/ensemble/submission.csv)")
    parser.add_argument("--size", type=int, default=256, help="submission label map size (default: 256)")
    parser.add_argument("--max-rounds", type=int, default=10, help="greedy selection rounds (default: 10)")
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="test-time augmentation, for val selection and test alike (default: none)")
    parser.add_argument("--per-class", action="store_true",
                        help="refine the weights class by class, so a member strong on one class contributes there")
    parser.add_argument("--no-class-filter", action="store_true",
                        help="keep every predicted pixel (default: per-class thresholds chosen on val relabel "
                             "doubtful pixels as background, and never predict a class that only loses on val)")
    parser.add_argument("--no-class-scales", action="store_true",
                        help="take the top class of the weighted probabilities as they are (default: per-class "
                             "factors chosen on val raise the rare classes averaging dilutes; with them, the "
                             "weights are chosen again among the selection's and the best N members')")
    parser.add_argument("--latency-budget", type=float, default=None, metavar="MS",
                        help="most inference ms per image the ensemble may take (members timed on a val batch)")
    parser.add_argument("--pseudo-labels", type=Path, default=None, metavar="FILE",
                        help="also write the ensemble's confident test predictions as COCO annotations (a file "
                             "under the data root, for data.pseudo_labels of a later search)")
    parser.add_argument("--pseudo-threshold", type=float, default=0.9,
                        help="ensemble probability a pixel needs to be pseudo-labelled (default: 0.9)")
    parser.add_argument("--data", type=Path, default=None, help="dataset root (default: the one the search used)")
    args = parser.parse_args(argv)
    if not 0 < args.pseudo_threshold <= 1:
        parser.error(f"--pseudo-threshold must be in (0, 1], got {args.pseudo_threshold:g}")
    if args.latency_budget is not None and args.latency_budget <= 0:
        parser.error(f"--latency-budget must be > 0 ms, got {args.latency_budget:g}")
    for flag in ("topk", "size", "max_rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from search.ensemble_job import EnsembleOptions, build_ensemble
    from search.experiment import latest_experiment

    experiment = (args.experiment or latest_experiment(args.storage)).resolve()
    print(f"Experiment: {experiment}", flush=True)
    summary = build_ensemble(experiment, EnsembleOptions(
        topk=args.topk, backbone=args.backbone, size=args.size, out=args.out, data_root=args.data,
        max_rounds=args.max_rounds, tta=args.tta, per_class=args.per_class, latency_budget=args.latency_budget,
        class_filter=not args.no_class_filter, class_scales=not args.no_class_scales, pseudo_labels=args.pseudo_labels,
        pseudo_threshold=args.pseudo_threshold))
    print(f"Submission: {summary['submission']} ({summary['test_images']} images, {args.size}x{args.size})")
    print(f"Ensemble: val mIoU {summary['val_miou']:.4f}, {summary['ms_per_image']:.1f} ms per image on "
          f"{summary['device']}")
    print(f"Details: {Path(summary['submission']).with_name('ensemble.json')}")
    from search.report import report_after_run

    print(report_after_run(experiment, Path(summary["submission"]).with_name("ensemble.json")))
    return 0



if __name__ == "__main__":
    exit_cli(main)
