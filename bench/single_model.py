"""One trial config trained outside Ray, scored on val every epoch and, at the end, on a labelled test
file at the submission size: the single-model figures of bench/README.md's time-budget section.

    .venv/bin/python bench/single_model.py [--data ../shared/datasets/trashcan-mini]
        [--space search_spaces/quick.yaml] [--set decoder=Unet lr=2e-3 ...] [--gt test_gt.json]

The config is the space's data, experiment settings and fixed values, with --set giving a value to
each searched parameter (and overriding any other); values are read as JSON, else YAML (2e-3,
Unet, "[pseudo.json]"). It trains on one thread, as a trial holding one CPU does; the test score is the
last epoch's model, written as a submission and scored by search.score, as it is and with a class
filter fitted on val (models.class_filter, as ensemble_select.py fits one). Last line: JSON.
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
    parser.add_argument("--save", type=Path, default=None, help="also keep the last epoch's checkpoint there")
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


def predict_split(trial, split, size: int) -> tuple:
    """(labels, top-class shares) of the trial's model on a split, at size x size, as an ensemble of one."""
    import torch

    from data_pipeline.dataset import SegmentationDataset, make_loader
    from models.ensemble import combine
    from models.inference import predict_probs

    loader = make_loader(SegmentationDataset(split, "none", train=False), 32)
    probs = predict_probs(trial.model, loader, (size, size), trial.device, normalization=trial.normalization,
                          amp=trial.amp)
    chunks = [combine([(1.0, p)]) for p in probs]
    return torch.cat([labels for labels, _ in chunks]), torch.cat([share for _, share in chunks])


def score_on_test(trial, data: Path, gt: str, size: int) -> dict:
    """Test scores of the last epoch's model, as it is and with a class filter fitted on val
    (models.class_filter), each written as a submission and scored by search.score."""
    import torch

    from data_pipeline.cache import load_split
    from data_pipeline.submission import write_submission
    from data_pipeline.trial_data import DataSpec
    from models.class_filter import fit_class_filter
    from search.score import score_submission

    val = trial.val_loader.dataset.split
    val_labels, val_share = predict_split(trial, val, size)
    truth = DataSpec.from_config(trial.cfg).val_split(size).masks
    fit = fit_class_filter(val_labels, val_share, torch.from_numpy(truth.copy()), trial.num_classes)
    test = load_split(data, gt, trial.cfg["resize"], with_masks=False)
    labels, share = predict_split(trial, test, size)
    scores = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, predicted in (("plain", labels), ("filtered", fit.filter.apply(labels, share))):
            submission = Path(directory) / f"{name}.csv"
            write_submission(submission, zip(test.file_names, predicted.numpy().astype("uint8")))
            scores[name] = score_submission(submission, data, gt)
    scores["filter"] = {"rules": fit.filter.to_dict(val.class_names), "val_before": fit.val_miou_before,
                        "val_after": fit.val_miou}
    return scores


def main(argv=None) -> int:
    from labels import by_name
    from search.trainable import build_trial, run_epochs

    args = parse_args(argv)
    config = trial_config(args.space, args.data, args.set)
    started = time.perf_counter()
    trial = build_trial(config)
    epochs = []

    names = trial.meta["class_names"]

    def report(metrics: dict, _checkpoint) -> None:
        epochs.append(metrics)
        per_class = ", ".join(f"{names[label]} {iou:.2f}" for label, iou in enumerate(metrics["val_class_iou"])
                              if iou is not None)
        print(f"epoch {metrics['epoch']:2d}  val mIoU {metrics['val_miou']:.4f}  loss {metrics['train_loss']:.3f}  "
              f"train {metrics['train_time_s']:.0f} s  eval {metrics['eval_time_s']:.0f} s  ({per_class})", flush=True)

    run_epochs(trial, report)
    if args.save:
        from search.trainable import save_trial_checkpoint

        save_trial_checkpoint(trial, trial.model, epochs[-1], args.save)
    scores = score_on_test(trial, args.data, args.gt, args.size)
    per_class = {kind: {name: round(iou, 3) for name, iou in scores[kind]["per_class_iou"].items() if iou is not None}
                 for kind in ("plain", "filtered")}
    for kind in ("plain", "filtered"):
        print(f"test IoU per class ({kind}): " + ", ".join(f"{n} {iou:.2f}" for n, iou in per_class[kind].items()))
    result = {"set": args.set, "epochs": len(epochs), "val_miou": round(epochs[-1]["val_miou"], 4),
              "best_val_miou": round(max(m["val_miou"] for m in epochs), 4),
              "val_miou_by_epoch": [round(m["val_miou"], 4) for m in epochs],
              "val_per_class_iou": by_name(epochs[-1]["val_class_iou"], names, None),
              "test_miou": round(scores["plain"]["miou"], 4), "test_per_class_iou": per_class["plain"],
              "filtered_test_miou": round(scores["filtered"]["miou"], 4),
              "filtered_test_per_class_iou": per_class["filtered"], "class_filter": scores["filter"],
              "wall_s": round(time.perf_counter() - started)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from errors import exit_cli  # a bad space or value: one line, not a traceback

    exit_cli(main)
