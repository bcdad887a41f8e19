"""Per-class control of false positives: how confident a predicted pixel of each class must be, chosen
on val.

Dataset mIoU counts every class that is predicted anywhere, even one absent from the images' truth,
where its IoU is 0: a few hundred stray pixels of one class can cost a tenth of the mean. A
ClassFilter relabels as background the pixels of class c whose top-class share (the ensemble's
normalised probability) is below `thresholds[c]`; a threshold above 1 means the class is never
predicted. `fit_class_filter` chooses the thresholds by coordinate ascent on val mIoU, scoring every
candidate from one histogram per class (no pass over the pixels per candidate).

A class absent from the val truth but predicted on val only loses there, so it is never predicted
(of the thresholds that score the same on val, it takes the highest, NEVER; any other class takes
the lowest, keeping the most pixels); `fit_class_filter` reports those classes (`unseen`), as their
test behaviour is a guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from labels import BACKGROUND, IGNORE, by_label, by_name

from .metrics import confusion_matrix, mean_iou

NEVER = 1.01  # a threshold no share reaches: the class is never predicted
THRESHOLDS = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, NEVER)
SHARE_BINS = 100  # shares are histogrammed in steps of 0.01


@dataclass
class ClassFilter:
    thresholds: list[float]  # per label; 0 keeps every pixel of the class

    @classmethod
    def identity(cls, num_classes: int) -> "ClassFilter":
        return cls([0.0] * num_classes)

    @classmethod
    def from_dict(cls, rules: dict, class_names) -> "ClassFilter":
        """The filter of to_dict's {class name: threshold} (classes not named keep every pixel)."""
        return cls(by_label(rules, class_names, 0.0))

    def to_dict(self, class_names) -> dict:
        return by_name(self.thresholds, class_names, 0.0)

    def apply(self, labels: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """labels [B, H, W] with the filtered pixels set to background; share [B, H, W] is each pixel's
        top-class share. Returns a new tensor."""
        thresholds = torch.tensor(self.thresholds, dtype=torch.float32, device=labels.device)
        keep = share.float() >= thresholds[labels.long()]
        return torch.where(keep, labels, torch.full_like(labels, BACKGROUND))


@dataclass
class FilterFit:
    filter: ClassFilter
    val_miou_before: float
    val_miou: float
    confusion: torch.Tensor  # val, after filtering
    unseen: list[int] = field(default_factory=list)  # labels predicted on val, absent from its truth


def fit_class_filter(labels: torch.Tensor, share: torch.Tensor, truth: torch.Tensor, num_classes: int,
                     passes: int = 2) -> FilterFit:
    """The ClassFilter with the best val mIoU found by coordinate ascent over the classes (each class
    in turn takes its best threshold of THRESHOLDS, the others fixed; of equal scores, the lowest
    threshold, or the highest for a class predicted on val but absent from its truth).

    labels, share, truth: [N, H, W] val predictions, their top-class shares and the true labels."""
    conf = confusion_matrix(truth.long(), labels.long(), num_classes)
    before = mean_iou(conf)
    hists = {c: _share_histogram(c, labels, share, truth, num_classes) for c in range(1, num_classes)}
    unseen = [c for c in hists if conf[c].sum() == 0 and conf[:, c].sum() > 0]
    chosen = {c: 0.0 for c in hists}
    base = conf.clone()
    for _ in range(passes):
        for c, hist in hists.items():
            without = _moved(base, c, _dropped(hist, chosen[c]), sign=-1)  # this class unfiltered
            tie = 1 if c in unseen else -1
            scored = [(mean_iou(_moved(without, c, _dropped(hist, t))), tie * t, t) for t in THRESHOLDS]
            chosen[c] = max(scored)[2]
            base = _moved(without, c, _dropped(hist, chosen[c]))
    result = ClassFilter.identity(num_classes)
    for c, t in chosen.items():
        result.thresholds[c] = t
    return FilterFit(result, before, mean_iou(base), base, unseen)


def _share_histogram(cls: int, labels: torch.Tensor, share: torch.Tensor, truth: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """[share bins + 1, true label] counts of the val pixels predicted as cls (ignored truth left out)."""
    mine = (labels == cls) & (truth != IGNORE)
    bins = (share[mine].float() * SHARE_BINS).long().clamp_(0, SHARE_BINS)
    index = bins * num_classes + truth[mine].long()
    return torch.bincount(index, minlength=(SHARE_BINS + 1) * num_classes).view(SHARE_BINS + 1, num_classes)


def _dropped(hist: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per true label, the pixels a class loses to background at threshold (shares below it)."""
    first_kept = min(SHARE_BINS + 1, int(np.ceil(threshold * SHARE_BINS - 1e-9)))
    return hist[:first_kept].sum(0)


def _moved(conf: torch.Tensor, cls: int, moved: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """conf with `moved` pixels (per true label) taken from predicted cls to background (sign -1: back)."""
    out = conf.clone()
    out[:, cls] -= sign * moved
    out[:, BACKGROUND] += sign * moved
    return out
