"""Confusion-matrix segmentation metrics.

mIoU is computed over the whole dataset from one accumulated confusion matrix. Classes that appear
in neither the ground truth nor the prediction have no IoU and are left out of the mean. Some
competitions average per-image mIoU instead (`image_mious`): each image's mIoU over the classes in
its truth or prediction, images whose pixels are all ignored left out.
"""
from __future__ import annotations

import numpy as np
import torch

from labels import IGNORE

# What evaluation reports per epoch, each with its direction: any of them can rank trials.
METRIC_MODES = {"val_miou": "max", "val_image_miou": "max", "val_pixel_acc": "max", "val_loss": "min"}


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (true class, predicted class) over pixels whose target is not IGNORE.

    Works on any device; returns an int64 [num_classes, num_classes] tensor (rows = truth).
    """
    valid = target != IGNORE
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


def image_mious(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float64 [B]: the mIoU of each image of a [B, H, W] batch (NaN for an all-ignored image).

    One batched bincount (image index offsets the pair index), so it runs on the device.
    """
    batch = target.shape[0]
    valid = target != IGNORE
    image = torch.arange(batch, device=target.device).view(-1, *([1] * (target.dim() - 1))).expand_as(target)
    index = (image[valid] * num_classes + target[valid].long()) * num_classes + pred[valid].long()
    conf = torch.bincount(index, minlength=batch * num_classes ** 2).view(batch, num_classes, num_classes).double()
    tp = conf.diagonal(dim1=1, dim2=2)
    union = conf.sum(1) + conf.sum(2) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
    return iou.sum(1) / present.sum(1)  # 0/0 = NaN for an image with no valid pixel
