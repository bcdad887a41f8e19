"""Confusion-matrix segmentation metrics.

mIoU is computed over the whole dataset from one accumulated confusion matrix. Classes that appear
in neither the ground truth nor the prediction have no IoU and are left out of the mean.
"""
from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = 255


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (true class, predicted class) over pixels whose target is not IGNORE_INDEX.

    Works on any device; returns an int64 [num_classes, num_classes] tensor (rows = truth).
    """
    valid = target != IGNORE_INDEX
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU of each class; NaN where the class is absent from both truth and prediction."""
    conf = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray | torch.Tensor) -> float:
    """Dataset mIoU: the mean IoU over the classes present in truth or prediction."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0


def pixel_accuracy(conf: np.ndarray | torch.Tensor) -> float:
    conf = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else 0.0
