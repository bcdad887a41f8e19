"""The four UNKNOWN treatments (keep, background, ignore, open_set) compared on a real dataset with an
UNKNOWN class (default: trashcan-mini), with the same trial budget: one launch.py search per
treatment, each with the same space otherwise (the same seed, so the same proposals), then the best
trial of each as a one-member ensemble (with its rejection for open_set) scored on the test set.

    .venv/bin/python bench/unknown_policies.py [--data ../shared/datasets/trashcan-mini] [--storage DIR]

Every mIoU is over the same label space, UNKNOWN included (what a submission with that class is
scored on). Last line: JSON, per treatment: best val mIoU, the shares of UNKNOWN and of known val
pixels flagged as UNKNOWN (predicted, or rejected for open_set), the rejection threshold, the area
under each open-set trial's val open-set curve (how well max-softmax separates UNKNOWN pixels from
known ones; 0.5 is chance), test mIoU, and the search's wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from trashcan import ROOT, TRASHCAN, check_data  # bench/ is on the path of a bench script
TREATMENTS = ("keep", "background", "ignore", "open_set")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=TRASHCAN)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "cpu_real.yaml")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--storage", type=Path, default=ROOT / "runs" / "bench-unknown")
    parser.add_argument("--reuse", action="store_true", help="summarise the experiments already under --storage")
    args = parser.parse_args()
    check_data(args.data)
    return args


def _run(*command) -> str:
    result = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        sys.exit(f"error: {' '.join(map(str, command[:2]))} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def search(treatment: str, args) -> float:
    """One search with every trial trained under treatment (FIFO: the full budget each); its wall seconds."""
    space = yaml.safe_load(args.space.read_text())
    space["experiment"].update(num_samples=args.trials, max_epochs=args.epochs, scheduler="fifo")
    space["space"] = {"unknown": treatment, **space["space"]}
    path = args.storage / f"{treatment}-space.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    started = time.perf_counter()
    _run("launch.py", "--space", path, "--data", args.data, "--storage", args.storage, "--name", treatment,
         "--no-wandb")
    return time.perf_counter() - started


def summarise(treatment: str, args) -> dict:
    from models.checkpoint import read_meta
    from search.experiment import ranked, read_trials
    from search.score import score_submission

    experiment = args.storage / treatment
    best = ranked(read_trials(experiment))[0]
    metrics = read_meta(best.checkpoint)["metrics"]
    out = experiment / "ensemble" / "submission.csv"
    if not out.is_file():
        _run("ensemble_select.py", "--experiment", experiment, "--topk", "1", "--out", out)
    score = score_submission(out, args.data, "test_gt.json")
    curves = [read_meta(t.checkpoint).get("open_set", {}).get("curve") for t in ranked(read_trials(experiment))]
    return {"open_set_auc": [round(_area(c), 3) for c in curves if c] or None,"val_miou": round(metrics["val_miou"], 4), "unknown_flagged": round(metrics["val_unknown_rejected"], 4),
            "known_flagged": round(metrics["val_known_rejected"], 4),
            "threshold": metrics.get("val_reject_threshold"), "test_miou": round(score["miou"], 4),
            "test_unknown_iou": score["per_class_iou"].get("unknown")}


def _area(curve: list[dict]) -> float:
    """Area under the open-set curve (UNKNOWN rejected against known rejected, over the thresholds):
    1 separates UNKNOWN from known pixels perfectly, 0.5 is chance."""
    points = sorted((p["known_rejected"], p["unknown_rejected"]) for p in curve)
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))


def main() -> None:
    args = parse_args()
    walls = {}
    for treatment in TREATMENTS:
        if not args.reuse:
            walls[treatment] = round(search(treatment, args), 1)
    results = {t: {**summarise(t, args), "search_s": walls.get(t)} for t in TREATMENTS}
    for treatment, r in results.items():
        print(f"{treatment:>10}: val mIoU {r['val_miou']:.4f}, UNKNOWN flagged {r['unknown_flagged']:.1%}, "
              f"known flagged {r['known_flagged']:.1%}, test mIoU {r['test_miou']:.4f}")
    print(json.dumps({"trials": args.trials, "epochs": args.epochs, "results": results}))


if __name__ == "__main__":
    main()
