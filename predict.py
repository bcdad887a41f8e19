#!/usr/bin/env python
"""Label new images with a finished search: its saved ensemble (ensemble_select.py), or one trial.

    python predict.py photos/ --out predictions/                     # the latest experiment's ensemble
    python predict.py a.jpg b.jpg --experiment runs/search-20261128-120000 --trial 6a1adc7e --out pred/

Per image, at its own size: OUT/<name>.png (one byte per pixel: the class label, as in the
submission) and OUT/<name>_overlay.jpg (the classes drawn over the image); OUT/legend.json maps labels
to class names and overlay colours.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from errors import exit_cli
from models.inference import TTA_MODES


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="folder for the label maps and overlays")
    parser.add_argument("--experiment", type=Path, default=None, help="experiment folder (default: the most recent)")
    parser.add_argument("--storage", type=Path, default=Path("runs"), help="where experiments live (default: runs)")
    parser.add_argument("--trial", default=None, metavar="ID",
                        help="predict with this trial's best checkpoint alone (default: the saved ensemble)")
    parser.add_argument("--tta", choices=TTA_MODES, default=None,
                        help="test-time augmentation (default: the ensemble's own; none for --trial)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from search.experiment import latest_experiment
    from search.predict_job import Predictor, image_files, predict_files

    files = image_files(args.images)
    experiment = (args.experiment or latest_experiment(args.storage)).resolve()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.trial:
        predictor = Predictor.from_trial(experiment, args.trial, device, args.tta)
        print(f"Trial {args.trial} of {experiment}", flush=True)
    else:
        summary = experiment / "ensemble" / "ensemble.json"
        predictor = Predictor.from_ensemble(summary, device, args.tta)
        print(f"Ensemble of {len(predictor.members)} member(s): {summary}", flush=True)
    count = predict_files(predictor, files, args.out, device)
    print(f"{count} image(s) labelled into {args.out} (legend: {args.out / 'legend.json'})")
    return 0


if __name__ == "__main__":
    exit_cli(main)
