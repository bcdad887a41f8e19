"""Score a submission CSV against a labelled COCO file (e.g. test_gt.json) at the submission size.

    python -m search.score SUBMISSION --data ROOT [--gt test_gt.json]

Ground-truth label maps are resized to the submission size with nearest neighbour; the score is the
dataset mIoU of one confusion matrix, as during the search.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from data_pipeline.cache import load_split
from data_pipeline.classes import UNKNOWN_POLICIES, class_map_for
from data_pipeline.submission import read_submission
from errors import UserError, exit_cli
from models.metrics import confusion_matrix, iou_per_class, mean_iou


def score_submission(submission: str | Path, data_root: str | Path, gt_ann: str, class_map=None) -> dict:
    rows = read_submission(submission)
    if not rows:
        raise UserError(f"{submission} has no rows")
    size = math.isqrt(len(rows[0][1]))
    truth = load_split(data_root, gt_ann, size, class_map=class_map)
    by_name = dict(rows)
    missing = [name for name in truth.file_names if name not in by_name]
    if missing:
        raise UserError(f"{submission} has no row for {len(missing)} image(s) of {gt_ann}, e.g. {missing[0]}")
    num_classes = len(truth.class_names)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for name, labels in zip(truth.file_names, truth.masks):
        pred = torch.from_numpy(by_name[name].reshape(size, size))
        conf += confusion_matrix(torch.from_numpy(labels.astype(np.int64)), pred, num_classes)
    iou = iou_per_class(conf)
    return {"miou": mean_iou(conf), "images": len(truth.file_names), "size": size,
            "per_class_iou": {n: None if np.isnan(v) else float(v) for n, v in zip(truth.class_names, iou)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("submission", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="dataset root")
    parser.add_argument("--gt", default="test_gt.json", help="labelled annotation file (default: %(default)s)")
    parser.add_argument("--class-map", type=Path, default=None, help="class-map YAML the search used, if any")
    parser.add_argument("--unknown", choices=UNKNOWN_POLICIES, default=None,
                        help="UNKNOWN policy the search used (default: the class map's, else keep)")
    args = parser.parse_args(argv)
    if not args.submission.is_file():
        raise UserError(f"submission {args.submission} does not exist")
    result = score_submission(args.submission, args.data, args.gt, class_map_for(args.class_map, args.unknown))
    for name, value in result["per_class_iou"].items():
        print(f"  {name:24s} {'-' if value is None else f'{value:.4f}'}")
    print(f"mIoU {result['miou']:.4f} over {result['images']} images at {result['size']}x{result['size']}")
    return 0


if __name__ == "__main__":
    exit_cli(main)
