"""Per-class prior correction of an ensemble's probabilities, chosen on val.

Rare classes lose the top-class vote twice: a model trained on a few percent of object pixels is
biased towards the frequent classes, and averaging members dilutes them further (each member finds
a small object in slightly different pixels, so their mean falls below background's where any one
of them alone would have won). Class scales multiply each class's weighted probability sum by a
factor before the top class is taken: the boundaries between classes move, the ranking of pixels
within a class does not. Background (label 0) keeps 1, the reference the others move against.

`fit_class_scales` chooses the factors by coordinate ascent on val mIoU: each class in turn takes
the best factor of SCALES, the others fixed. Every candidate factor of a class is scored from one
histogram of the pixels' margins (how much the class's log-probability falls short of the best
other class's), so a class costs one pass over the pixels, not one per candidate. A change must
raise val mIoU by MIN_GAIN: a factor that gains less on val is more likely to cost on new images
(a class raised just enough to be predicted in images without it adds a zero to their mean) than to
help.

Scales change which member weights are best: an average of members that loses to its best member
on val may beat it once both are rescaled. `choose_with_scales` fits the scales of several weight
candidates (the selection's, and equal weights of the best N members: Caruana's sorted
initialisation) and keeps the best on val.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from labels import BACKGROUND, IGNORE, by_name

from .ensemble import Terms, ensemble_confusion, weighted_sum
from .metrics import mean_iou

SCALES = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0)
MIN_GAIN = 0.002
FIT_STRIDE = 4  # every 4th row and column of a val image: same factors as all pixels, a sixteenth of the cost


@dataclass
class ScalesFit:
    scales: list[float]  # per label; 1 leaves the class as it was
    val_miou_before: float  # on the fitting pixels
    val_miou: float  # on the fitting pixels, with the scales

    def to_dict(self, class_names) -> dict:
        """{class name: factor} of the classes whose factor is not 1 (labels.by_label reads it back)."""
        return by_name(self.scales, class_names, 1.0)


@dataclass
class ScaledChoice:
    """The member weights kept once each candidate has its own class scales."""
    name: str  # which candidate: "selection" or "best N"
    weights: list  # per member, as the candidate had them
    fit: ScalesFit
    tried: dict[str, float]  # val mIoU (fitting pixels, with its scales) of each candidate
    confusion: torch.Tensor  # the kept candidate's on every val pixel, with its scales
    val_miou: float  # its mean IoU


def weight_candidates(selection_weights: list, member_miou: list[float], costs: list[float] | None = None,
                      budget: float | None = None) -> dict[str, list]:
    """{"selection": its weights, "best N": equal weights of the N best members by their own val mIoU}
    for every N whose members fit the budget (of costs per member), leaving out repeats."""
    order = sorted(range(len(member_miou)), key=lambda m: -member_miou[m])
    candidates = {"selection": list(selection_weights)}
    for n in range(1, len(order) + 1):
        best_n = [1.0 / n if m in order[:n] else 0.0 for m in range(len(order))]
        within = budget is None or sum(costs[m] for m in order[:n]) <= budget
        if within and best_n not in candidates.values():
            candidates[f"best {n}"] = best_n
    return candidates


def choose_with_scales(candidates: dict[str, list], member_probs: list[torch.Tensor], truth: torch.Tensor,
                       num_classes: int) -> ScaledChoice:
    """Of candidates ({name: weights per member}, first preferred on ties), the one with the best val
    mIoU after fitting its class scales on val. member_probs: [N, C, H, W] per member; truth [N, H, W]."""
    fits = {}
    for name, weights in candidates.items():
        terms = [(w, p) for w, p in zip(weights, member_probs)]
        fits[name] = fit_class_scales(*fit_pixels(terms, truth), num_classes)
    name = max(fits, key=lambda n: fits[n].val_miou)  # the first of equals
    terms = [(w, p) for w, p in zip(candidates[name], member_probs)]
    confusion = ensemble_confusion(terms, truth, num_classes, scales=fits[name].scales)
    return ScaledChoice(name, candidates[name], fits[name], {n: f.val_miou for n, f in fits.items()}, confusion,
                        mean_iou(confusion))


def fit_pixels(terms: Terms, truth: torch.Tensor, stride: int = FIT_STRIDE,
               chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(log of the weighted probability sums [C, P], labels [P]) of every stride-th row and column of
    each val image: the pixels the factors are fitted on. A class without probability has log -inf: no
    factor makes it the top class, as in combine."""
    sums = [torch.log(weighted_sum([(w, p[start:start + chunk, :, ::stride, ::stride]) for w, p in terms]))
            for start in range(0, len(truth), chunk)]
    log_probs = torch.cat(sums).transpose(0, 1).reshape(len(sums[0][0]), -1)
    return log_probs, truth[:, ::stride, ::stride].reshape(-1)


def fit_class_scales(log_probs: torch.Tensor, truth: torch.Tensor, num_classes: int, passes: int = 2) -> ScalesFit:
    """The per-class factors with the best val mIoU found by coordinate ascent (module docstring).

    log_probs: [C, P] log of the ensemble's (weighted, summed) probabilities of P val pixels;
    truth: [P] their labels (IGNORE pixels are left out)."""
    kept = truth != IGNORE
    log_probs, truth = log_probs[:, kept].float(), truth[kept].long()
    grid = torch.tensor(np.log(SCALES), dtype=torch.float32)
    one = SCALES.index(1.0)
    chosen = [one] * num_classes
    before = current = _scores(log_probs, truth, grid, chosen, BACKGROUND + 1, num_classes)[one]
    for _ in range(passes):
        for cls in range(BACKGROUND + 1, num_classes):
            scores = _scores(log_probs, truth, grid, chosen, cls, num_classes)
            best = int(np.argmax(scores))
            if scores[best] >= scores[chosen[cls]] + MIN_GAIN:
                chosen[cls] = best
            current = scores[chosen[cls]]
    scales = [SCALES[i] for i in chosen]
    scales[BACKGROUND] = 1.0
    return ScalesFit(scales, before, current)


def _scores(log_probs: torch.Tensor, truth: torch.Tensor, grid: torch.Tensor, chosen: list[int], cls: int,
            num_classes: int) -> list[float]:
    """Val mIoU for each factor of `grid` given to cls, the other classes at their chosen factors.

    cls is the top class at log-factor g exactly where its margin (best other class's scaled
    log-probability minus its own) is below g; a histogram of the margins' grid bins by (true label,
    best other class) gives every candidate's confusion matrix by cumulative sums."""
    offsets = grid[torch.tensor(chosen)].clone()
    offsets[BACKGROUND] = 0.0
    others = log_probs + offsets[:, None]
    others[cls] = -torch.inf
    best_other, other_label = others.max(dim=0)
    margin = best_other - log_probs[cls]
    first_win = torch.searchsorted(grid, margin.contiguous(), right=True)  # cls wins at every grid index >= this
    size = len(grid) + 1
    hist = torch.bincount((first_win * num_classes + truth) * num_classes + other_label,
                          minlength=size * num_classes * num_classes).view(size, num_classes, num_classes)
    never = hist.sum(dim=0)  # [true label, predicted]: cls never the top class
    won = hist.cumsum(dim=0)
    scores = []
    for index in range(len(grid)):
        conf = never - won[index]
        conf[:, cls] += won[index].sum(dim=1)
        scores.append(mean_iou(conf))
    return scores
