"""One trial config trained outside Ray, scored on val every epoch and, at the end, on a labelled test
file at the submission size: the single-model figures of the README's time-budget section.

    .venv/bin/python bench/single_model.py [--data ../shared/datasets/trashcan-mini]
        [--space search_spaces/quick.yaml] [--set decoder=Unet lr=2e-3 ...] [--gt test_gt.json]

The config is the space's data, experiment settings and fixed values, with --set giving a value to
each searched parameter (and overriding any other); values are read as JSON, else YAML (2e-3,
Unet, "[pseudo.json]"). It trains on one thread, as a trial holding one CPU does; the test score is the
last epoch's model, written as a submission and scored by search.score. Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from trashcan import ROOT, TRASHCAN, check_data  # bench/ is on the path of a bench script


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=TRASHCAN)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "quick.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="trial parameter values")
    parser.add_argument("--gt", default="test_gt.json", help="labelled test annotations under --data")
    parser.add_argument("--size", type=int, default=256, help="submission size the test is scored at")
    args = parser.parse_args(argv)
    check_data(args.data)
    return args


def trial_config(space: Path, data: Path, assignments: list[str]) -> dict:
    from search.space import load_space
    from search.tune_runner import trial_constants

    spec = load_space(space)
    config = {**trial_constants(spec, data.resolve()), "cpus_per_trial": 1}
    config.update({p.name: p.values[0] for p in spec.params if p.kind == "fixed"})
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            sys.exit(f"error: --set {assignment!r} is not KEY=VALUE")
        config[key] = _value(value)
    unset = [p.name for p in spec.params if p.name not in config and p.active(config)]
    if unset:
        sys.exit(f"error: {space} searches {', '.join(unset)}; give each a value with --set")
    return config


def _value(text: str):
    try:
        return json.loads(text)  # numbers as JSON reads them: PyYAML takes 2e-3 for a string
    except ValueError:
        return yaml.safe_load(text)


def score_on_test(trial, data: Path, gt: str, size: int) -> dict:
    import numpy as np

    from data_pipeline.cache import load_split
    from data_pipeline.dataset import SegmentationDataset, make_loader
    from data_pipeline.submission import write_submission
    from models.factory import NORMALIZATION
    from models.inference import predict_probs, to_labels
    from search.score import score_submission

    images = load_split(data, gt, trial.cfg["resize"], with_masks=False)
    loader = make_loader(SegmentationDataset(images, "none", train=False), 32)
    trial.model.eval()
    probs = predict_probs(trial.model, loader, (size, size), trial.device, normalization=NORMALIZATION)
    labels = np.concatenate([to_labels(p).cpu().numpy().astype(np.uint8) for p in probs])
    with tempfile.TemporaryDirectory() as directory:
        submission = Path(directory) / "submission.csv"
        write_submission(submission, zip(images.file_names, labels))
        return score_submission(submission, data, gt)


def main(argv=None) -> int:
    from search.trainable import build_trial, run_epochs

    args = parse_args(argv)
    config = trial_config(args.space, args.data, args.set)
    started = time.perf_counter()
    trial = build_trial(config)
    epochs = []

    def report(metrics: dict, _checkpoint) -> None:
        epochs.append(metrics)
        print(f"epoch {metrics['epoch']:2d}  val mIoU {metrics['val_miou']:.4f}  loss {metrics['train_loss']:.3f}  "
              f"train {metrics['train_time_s']:.0f} s  eval {metrics['eval_time_s']:.0f} s", flush=True)

    run_epochs(trial, report)
    score = score_on_test(trial, args.data, args.gt, args.size)
    per_class = {name: round(iou, 3) for name, iou in score["per_class_iou"].items() if iou is not None}
    print("test IoU per class: " + ", ".join(f"{name} {iou:.2f}" for name, iou in per_class.items()))
    result = {"set": args.set, "epochs": len(epochs), "val_miou": round(epochs[-1]["val_miou"], 4),
              "best_val_miou": round(max(m["val_miou"] for m in epochs), 4), "test_miou": round(score["miou"], 4),
              "test_per_class_iou": per_class, "wall_s": round(time.perf_counter() - started)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from errors import run_cli  # a bad space or value: one line, not a traceback

    sys.exit(run_cli(main))
