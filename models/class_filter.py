"""Per-class control of false positives: which predicted pixels of a class to keep, chosen on val.

Dataset mIoU counts every class that is predicted anywhere, even one absent from the images' truth,
where its IoU is 0: a few hundred stray pixels of one class can cost a tenth of the mean. And rare
classes tend to be predicted with low confidence in many small, scattered blobs. A ClassFilter
relabels as background the pixels of class c whose top-class share (the ensemble's normalised
probability) is below `thresholds[c]`, and then, per image, all of its pixels of class c when fewer
than `min_areas[c]` remain. `fit_class_filter` chooses both for each class by coordinate ascent on
val mIoU, scoring every candidate from histograms (no pass over the pixels per candidate).

A class absent from the val truth but predicted on val only loses there, so the val optimum never
predicts it; `fit_class_filter` reports those classes (`unseen`), as their test behaviour is a guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from labels import BACKGROUND, IGNORE


from .metrics import confusion_matrix, mean_iou

THRESHOLDS = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)  # 1.01: the class is never predicted
MIN_AREAS = (0, 16, 64, 256, 1024)  # pixels per image at the scored size
SHARE_BINS = 100  # shares are histogrammed in steps of 0.01


@dataclass
class ClassFilter:
    thresholds: list[float]  # per label; 0 keeps every pixel of the class
    min_areas: list[int]  # per label; 0 keeps any area

    @classmethod
    def identity(cls, num_classes: int) -> "ClassFilter":
        return cls([0.0] * num_classes, [0] * num_classes)

    def is_identity(self) -> bool:
        return not any(self.thresholds) and not any(self.min_areas)

    def apply(self, labels: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """labels [B, H, W] (any integer dtype) with the filtered pixels set to background; share
        [B, H, W] is each pixel's top-class share. Returns a new tensor."""
        labels = labels.clone()
        for c, (threshold, area) in enumerate(zip(self.thresholds, self.min_areas)):
            if c == BACKGROUND or not (threshold or area):
                continue
            mine = labels == c
            labels[mine & (share < threshold)] = BACKGROUND
            if area:
                small = (labels == c).flatten(1).sum(1) < area
                labels[small.view(-1, 1, 1) & (labels == c)] = BACKGROUND
        return labels

    @classmethod
    def from_dict(cls, rules: dict, class_names) -> "ClassFilter":
        """The filter of to_dict's {class name: {threshold, min_area}} (classes not named: kept)."""
        names = list(class_names)
        result = cls.identity(len(names))
        for name, rule in rules.items():
            result.thresholds[names.index(name)] = rule["threshold"]
            result.min_areas[names.index(name)] = rule["min_area"]
        return result

    def to_dict(self, class_names) -> dict:
        return {name: {"threshold": t, "min_area": a}
                for name, t, a in zip(class_names, self.thresholds, self.min_areas) if t or a}


@dataclass
class FilterFit:
    filter: ClassFilter
    val_miou_before: float
    val_miou: float
    confusion: torch.Tensor  # val, after filtering
    unseen: list[int] = field(default_factory=list)  # labels predicted on val, absent from its truth


class _ClassPixels:
    """The val pixels predicted as one class, as a histogram [images, share bins, true label]: what
    every (threshold, min area) candidate of the class is scored from."""

    def __init__(self, cls: int, labels: torch.Tensor, share: torch.Tensor, truth: torch.Tensor, num_classes: int):
        mine = labels == cls
        image = torch.arange(len(labels)).view(-1, 1, 1).expand_as(labels)[mine]
        bins = (share[mine].float() * SHARE_BINS).long().clamp_(0, SHARE_BINS)
        true = truth[mine].long()
        valid = true != IGNORE
        index = (image[valid] * (SHARE_BINS + 1) + bins[valid]) * num_classes + true[valid]
        self.hist = torch.bincount(index, minlength=len(labels) * (SHARE_BINS + 1) * num_classes).view(
            len(labels), SHARE_BINS + 1, num_classes)
        # counts of every pixel (ignored truth included) per image and bin, for the per-image areas
        all_index = image * (SHARE_BINS + 1) + bins
        self.area = torch.bincount(all_index, minlength=len(labels) * (SHARE_BINS + 1)).view(len(labels), -1)

    def moved(self, threshold: float, min_area: int) -> torch.Tensor:
        """Per true label, the pixels this class loses to background under (threshold, min_area)."""
        first_kept = min(SHARE_BINS + 1, int(np.ceil(threshold * SHARE_BINS - 1e-9)))
        dropped = self.hist[:, :first_kept].sum((0, 1))
        kept = self.hist[:, first_kept:].sum(1)  # [images, true label]
        small = self.area[:, first_kept:].sum(1) < min_area
        return dropped + kept[small].sum(0)


def fit_class_filter(labels: torch.Tensor, share: torch.Tensor, truth: torch.Tensor, num_classes: int,
                     passes: int = 2) -> FilterFit:
    """The ClassFilter with the best val mIoU found by coordinate ascent over the classes (each class
    in turn takes its best (threshold, min area) from THRESHOLDS x MIN_AREAS, the others fixed).

    labels, share, truth: [N, H, W] val predictions, their top-class shares and the true labels."""
    conf = confusion_matrix(truth.long(), labels.long(), num_classes)
    before = mean_iou(conf)
    pixels = {c: _ClassPixels(c, labels, share, truth, num_classes) for c in range(1, num_classes)}
    chosen = {c: (0.0, 0) for c in pixels}
    base = conf.clone()
    for _ in range(passes):
        for c, px in pixels.items():
            without = _moved_confusion(base, c, px.moved(*chosen[c]), sign=-1)  # this class unfiltered
            scored = [(mean_iou(_moved_confusion(without, c, px.moved(t, a))), -i, (t, a))
                      for i, (t, a) in enumerate((t, a) for t in THRESHOLDS for a in MIN_AREAS)]
            best = max(scored)
            chosen[c] = best[2]
            base = _moved_confusion(without, c, px.moved(*chosen[c]))
    result = ClassFilter.identity(num_classes)
    for c, (t, a) in chosen.items():
        result.thresholds[c], result.min_areas[c] = t, a
    truth_counts, predicted_counts = conf.sum(1), conf.sum(0)
    unseen = [c for c in pixels if truth_counts[c] == 0 and predicted_counts[c] > 0]
    return FilterFit(result, before, mean_iou(base), base, unseen)


def _moved_confusion(conf: torch.Tensor, cls: int, moved: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """conf with `moved` pixels (per true label) taken from predicted cls to background (sign -1: back)."""
    out = conf.clone()
    out[:, cls] -= sign * moved
    out[:, BACKGROUND] += sign * moved
    return out
