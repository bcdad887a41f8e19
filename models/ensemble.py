"""Forward ensemble selection with replacement (Caruana et al., ICML 2004) on val mIoU, and a
class-wise refinement of it.

Members' val probabilities come quantised to uint8 (`quantize`: probability x 255), a quarter of the
bytes of float32, and their sums are exact integers: selection never meets float rounding between
near-ties. Arrays are [N, C, H, W]: each class is a contiguous plane per image, and a pixel's top
class is found with elementwise maxima over the planes of packed (score, class) keys (`KeySpace`),
which vectorises far better than a max over a dimension of ~12 classes.

A hill-climb starts from a set of members with equal weights; each later round adds (again,
possibly) the member whose addition gives the highest val mIoU. After max_rounds the best prefix of
the path (never shorter than the start) is kept. Weights are selection counts / rounds.

`ensemble_selection` runs two hill-climbs and keeps the better on val: Caruana's plain greedy from
the best single member, and one from the best equal-weight subset of the members (every subset when
there are few candidates, else the best N by their own val mIoU: Caruana's sorted initialisation).
Plain greedy cannot pass through a dip: when every pair scores below the best member, it never adds a
second one, though three together may beat it. Neither ends below the best single member on val.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch

from labels import IGNORE

from .class_filter import ClassFilter
from .inference import to_labels
from .metrics import confusion_matrix, mean_iou

PROB_SCALE = 255  # a quantised probability of 1

Terms = Sequence[tuple["float | list[float]", torch.Tensor]]  # (weight, probabilities [N, C, H, W]) pairs


def quantize(probs: torch.Tensor) -> torch.Tensor:
    """[0, 1] probabilities -> uint8 0..255, the form val probabilities are cached and selected in."""
    return probs.float().mul(PROB_SCALE).round_().clamp_(0, PROB_SCALE).to(torch.uint8)


def weigh(weight, probs: torch.Tensor) -> torch.Tensor:
    """weight * probs [B, C, H, W] in float32; weight is one number or a list with one per class."""
    if isinstance(weight, (int, float)):
        return weight * probs.float()
    return torch.as_tensor(weight, dtype=torch.float32, device=probs.device).view(1, -1, 1, 1) * probs.float()


def has_weight(weight) -> bool:
    """Whether a member with this weight (one number, or one per class) takes part."""
    return any(weight) if isinstance(weight, (list, tuple)) else bool(weight)


def weighted_sum(terms: Terms, scales: Sequence[float] | None = None) -> torch.Tensor:
    """Sum of weight * probabilities over the members that take part (float32 [B, C, H, W]), each class
    times its factor of `scales` (models.class_scales) when given."""
    total = sum(weigh(w, p) for w, p in terms if has_weight(w))
    return total if scales is None else weigh(list(scales), total)


class Decision(NamedTuple):
    """What turns an ensemble's weighted probabilities into labels, besides the weights (combine's
    arguments after the terms, in its order)."""
    reject: tuple[float, int] | None = None
    class_filter: ClassFilter | None = None
    scales: Sequence[float] | None = None


def combine(terms: Terms, reject: tuple[float, int] | None = None, class_filter: ClassFilter | None = None,
            scales: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """How an ensemble labels pixels: (labels [B, H, W] int64, top-class share [B, H, W]) of its members'
    weighted probabilities (terms: (weight, [B, C, H, W] probabilities) pairs, uint8 or float).

    The label is the top class (first on ties) of the weighted sum, each class times its factor of
    `scales` (models.class_scales) when given; the share is its part of that sum. reject: (threshold,
    label) of an open-set ensemble: a share below the threshold gets that label. class_filter: the
    ensemble's per-class false-positive control, applied last."""
    total = weighted_sum(terms, scales)
    share, labels = (total / total.sum(dim=1, keepdim=True)).max(dim=1)
    if reject is not None:
        labels[share < reject[0]] = reject[1]
    if class_filter is not None:
        labels = class_filter.apply(labels, share)
    return labels, share


def combine_in_chunks(terms: Terms, reject: tuple[float, int] | None = None,
                      class_filter: ClassFilter | None = None, scales: Sequence[float] | None = None, chunk: int = 8):
    """combine over [N, ...] members' probabilities a few images at a time: yields (labels, share) chunks,
    so that no full-size float32 copy of the members is ever made."""
    count = len(terms[0][1])
    for start in range(0, count, chunk):
        yield combine([(w, p[start:start + chunk]) for w, p in terms], reject, class_filter, scales)


def ensemble_confusion(terms: Terms, labels: torch.Tensor, num_classes: int, chunk: int = 8,
                       scales: Sequence[float] | None = None) -> torch.Tensor:
    """Confusion matrix of argmax(sum of weight * probabilities, times `scales`) against labels [N, H, W].

    Summed a few images at a time, so no full-size float32 copy of the members is ever made. With
    uint8 probabilities and integer weights (selection counts) the sums are exact.
    """
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(labels), chunk):
        total = weighted_sum([(w, p[start:start + chunk]) for w, p in terms], scales)
        conf += confusion_matrix(labels[start:start + chunk], to_labels(total), num_classes)
    return conf


def ensemble_miou(terms: Terms, labels: torch.Tensor, num_classes: int) -> float:
    return mean_iou(ensemble_confusion(terms, labels, num_classes))


EXHAUSTIVE_START_LIMIT = 8  # up to this many candidates every equal-weight subset is tried as a start


@dataclass
class Selection:
    counts: list[int]  # times each member was chosen in the kept prefix of the path
    # {"round", "members" (added in the round: the whole start in round 1), "val_miou"} per round
    path: list[dict] = field(default_factory=list)
    val_miou: float = 0.0
    member_miou: list[float] = field(default_factory=list)
    member_conf: list[torch.Tensor] = field(default_factory=list)  # each member's own confusion matrix
    confusion: torch.Tensor | None = None  # the selected ensemble's
    start: str = "best member"  # what the hill-climb started from: "best member" or "best subset"
    stopped: str = ""  # why the kept ensemble is where the path was cut
    tried: dict[str, float] = field(default_factory=dict)  # val mIoU of each start ensemble_selection tried

    @property
    def weights(self) -> list[float]:
        return [c / sum(self.counts) for c in self.counts]


@dataclass
class ClassSelection:
    counts: list[list[int]]  # [member][class]: the greedy counts plus the class-wise additions
    rounds: int  # of the greedy selection it refined (the weights' denominator)
    path: list[dict] = field(default_factory=list)  # {"round", "member", "class", "val_miou"} per step
    val_miou: float = 0.0
    start_miou: float = 0.0  # that of the ensemble it refined
    confusion: torch.Tensor | None = None  # the refined ensemble's

    @property
    def weights(self) -> list[list[float]]:
        return [[c / self.rounds for c in row] for row in self.counts]


class _Scorer:
    """Labels in the form selection counts them: truth * C + prediction indexes a confusion matrix,
    ignored pixels go to spare bins past the C*C real ones. Up to 15 classes the index fits a byte,
    and a bincount over bytes is several times faster than over int64."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.num_classes = num_classes
        dtype = torch.uint8 if num_classes * (num_classes + 1) <= 256 else torch.int32
        self.truth = torch.where(labels == IGNORE, num_classes * num_classes,
                                 labels.long() * num_classes).to(dtype).reshape(len(labels), -1)

    def counts(self, truth: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        bins = torch.bincount(truth + predicted.to(truth.dtype), minlength=self.num_classes * (self.num_classes + 1))
        return bins[:self.num_classes ** 2].reshape(self.num_classes, self.num_classes)

    def confusion(self, predicted: torch.Tensor) -> torch.Tensor:
        return self.counts(self.truth.reshape(-1), predicted.reshape(-1))

    def moved(self, conf: torch.Tensor, truth: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """conf after the pixels with these truths moved from old to new predictions."""
        return conf + self.counts(truth, new) - self.counts(truth, old)


def _check_quantized(member_probs: list[torch.Tensor]) -> None:
    if not member_probs:
        raise ValueError("no ensemble members")
    if any(p.dtype != torch.uint8 for p in member_probs):
        raise TypeError("ensemble selection takes uint8 probabilities (models.ensemble.quantize)")


class KeySpace:
    """Packed (score, class) integer keys: a pixel's key for class c is score * shift + (shift - 1 - c),
    so the largest key is the largest score and, among equal scores, the first class. An elementwise
    maximum over the class planes is then argmax (first on ties), and the class reads back from the
    low bits. Adding a uint8 probability to a score is an add with alpha=shift.

    int16 keys (half the memory traffic of int32) when scores of up to max_count members fit;
    shift is the smallest power of two above the class count. The int16 range is used from -32768.
    """

    def __init__(self, num_classes: int, max_count: int):
        bits = max(1, (num_classes - 1).bit_length())
        if (max_count * PROB_SCALE + 1) << bits <= 1 << 16:
            self.dtype, self.shift, offset = torch.int16, 1 << bits, -(1 << 15)
        else:
            self.dtype, self.shift, offset = torch.int32, 256, 0
        self.base = (offset + self.shift - 1 - torch.arange(num_classes)).to(self.dtype).view(1, -1, 1, 1)

    def keys(self, member_probs: list[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
        """Keys of the sum of counts[m] x member_probs[m] ([N, C, H, W] uint8 each)."""
        keys = self.base.expand(member_probs[0].shape).clone()
        for probs, count in zip(member_probs, counts):
            if count:
                keys.add_(probs, alpha=self.shift * count)
        return keys

    def class_of(self, keys: torch.Tensor) -> torch.Tensor:
        """The class a key stands for (uint8)."""
        return (self.shift - 1 - (keys & (self.shift - 1))).to(torch.uint8)

    def top(self, keys: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Per pixel of [n, C, H, W] keys (+ extra uint8 probabilities added to each class's score):
        the largest key, [n, H, W]."""
        best = keys[:, 0].clone()
        if extra is not None:
            best.add_(extra[:, 0], alpha=self.shift)
        buffer = torch.empty_like(best)
        for c in range(1, keys.shape[1]):
            value = keys[:, c] if extra is None else torch.add(keys[:, c], extra[:, c], alpha=self.shift, out=buffer)
            torch.maximum(best, value, out=best)
        return best

    def top_in_chunks(self, keys: torch.Tensor, chunk: int) -> torch.Tensor:
        return torch.cat([self.top(keys[i:i + chunk]) for i in range(0, len(keys), chunk)])

    def member_labels(self, probs: torch.Tensor, chunk: int) -> torch.Tensor:
        """One member's own labels: its probabilities added to zero scores."""
        zero = self.base.expand(min(chunk, len(probs)), -1, *probs.shape[2:])
        return torch.cat([self.class_of(self.top(zero[:len(part)], part))
                          for part in (probs[i:i + chunk] for i in range(0, len(probs), chunk))])


class OverBudget(ValueError):
    """No member alone fits the budget."""

    def __init__(self, budget: float, cheapest: float):
        super().__init__(f"no member fits the budget {budget:g} (the cheapest costs {cheapest:g})")
        self.budget, self.cheapest = budget, cheapest


def greedy_selection(member_probs: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                     max_rounds: int = 10, chunk: int = 8, costs: Sequence[float] | None = None,
                     budget: float | None = None, start: Sequence[int] | None = None) -> Selection:
    """member_probs: per member [N, C, H, W] uint8 probabilities (quantize) on the same val images.

    The hill-climb starts from the members in start (equal weights; default the best single member
    that fits the budget) and adds one member in each of the max_rounds - 1 later rounds. The
    ensemble's summed probabilities are kept between rounds (as keys); a candidate is scored by
    adding it to the running sum, never by re-summing the members. With costs (e.g. each member's
    inference ms per image) and a budget, only members that keep the total cost of the distinct
    members within it are considered (choosing a member again costs nothing).
    """
    scorer, member_conf = _score_members(member_probs, labels, num_classes, chunk, costs, budget)
    return _hill_climb(member_probs, scorer, member_conf, start, max_rounds, chunk, costs, budget)


def _score_members(member_probs: list[torch.Tensor], labels: torch.Tensor, num_classes: int, chunk: int,
                   costs, budget) -> tuple[_Scorer, list[torch.Tensor]]:
    """The scorer of the val labels and each member's own confusion matrix; raises OverBudget when no
    member alone fits the budget."""
    _check_quantized(member_probs)
    if not any(_within_budget(costs, budget, set(), len(member_probs))):
        raise OverBudget(budget, min(costs))
    scorer = _Scorer(labels, num_classes)
    return scorer, [scorer.confusion(KeySpace(num_classes, 1).member_labels(p, chunk)) for p in member_probs]


def _hill_climb(member_probs: list[torch.Tensor], scorer: _Scorer, member_conf: list[torch.Tensor],
                start: Sequence[int] | None, max_rounds: int, chunk: int, costs, budget) -> Selection:
    """greedy_selection, given the members' own confusion matrices."""
    member_miou = [mean_iou(conf) for conf in member_conf]
    if start is None:
        allowed = _within_budget(costs, budget, set(), len(member_probs))
        start = [int(np.argmax([m if ok else -1.0 for m, ok in zip(member_miou, allowed)]))]
    space = KeySpace(scorer.num_classes, len(start) + max_rounds - 1)
    running = space.keys([member_probs[m] for m in start], [1] * len(start))
    conf = member_conf[start[0]] if len(start) == 1 else \
        scorer.confusion(space.class_of(space.top_in_chunks(running, chunk)))
    path = [{"round": 1, "members": list(start), "val_miou": mean_iou(conf)}]
    confs_on_path = [conf]
    for round_index in range(2, max_rounds + 1):
        chosen = {m for step in path for m in step["members"]}
        allowed = _within_budget(costs, budget, chosen, len(member_probs))
        confs = [_confusion_with(p, running, scorer, space, chunk) if ok else None
                 for p, ok in zip(member_probs, allowed)]
        scores = [mean_iou(c) if c is not None else -1.0 for c in confs]
        best = int(np.argmax(scores))
        running.add_(member_probs[best], alpha=space.shift)
        path.append({"round": round_index, "members": [best], "val_miou": scores[best]})
        confs_on_path.append(confs[best])
    # Keep the best prefix (earliest on ties).
    best_len = max(range(len(path)), key=lambda i: (path[i]["val_miou"], -i)) + 1
    counts = [0] * len(member_probs)
    for step in path[:best_len]:
        for m in step["members"]:
            counts[m] += 1
    return Selection(counts=counts, path=path, val_miou=path[best_len - 1]["val_miou"], member_miou=member_miou,
                     member_conf=member_conf, confusion=confs_on_path[best_len - 1],
                     stopped=_stop_reason(path, best_len, max_rounds))


def _stop_reason(path: list[dict], kept: int, max_rounds: int) -> str:
    if len(path) == 1:
        return "max_rounds is 1: the start is the ensemble"
    if kept == len(path):
        return f"val mIoU still rose in the last of {max_rounds} rounds (more rounds might help)"
    return f"no round after round {kept} raised val mIoU above its {path[kept - 1]['val_miou']:.4f}"


def best_subset(member_probs: list[torch.Tensor], labels: torch.Tensor, num_classes: int, member_miou: Sequence[float],
                chunk: int = 8, costs: Sequence[float] | None = None, budget: float | None = None) -> list[int]:
    """The equal-weight subset of the members (within the budget) with the highest val mIoU, fewest
    members first on ties: every subset up to EXHAUSTIVE_START_LIMIT candidates, else the best N by
    their own val mIoU for every N (sorted initialisation). A single member scores its member_miou."""
    order = sorted(range(len(member_probs)), key=lambda m: -member_miou[m])
    if len(member_probs) <= EXHAUSTIVE_START_LIMIT:
        subsets = [list(c) for n in range(1, len(order) + 1) for c in itertools.combinations(order, n)]
    else:
        subsets = [order[:n] for n in range(1, len(order) + 1)]
    if budget is not None:
        subsets = [s for s in subsets if sum(costs[m] for m in s) <= budget]
    if not subsets:
        raise OverBudget(budget, min(costs))
    scorer, space = _Scorer(labels, num_classes), KeySpace(num_classes, len(order))
    scores = [member_miou[s[0]] if len(s) == 1 else mean_iou(_subset_confusion([member_probs[m] for m in s], scorer,
                                                                                 space, chunk)) for s in subsets]
    return sorted(subsets[int(np.argmax(scores))])  # subsets come smallest first: argmax keeps the first of equals


def _subset_confusion(member_probs: list[torch.Tensor], scorer: _Scorer, space: KeySpace, chunk: int) -> torch.Tensor:
    """Confusion matrix of the equal-weight sum of member_probs, summed chunk by chunk."""
    conf = torch.zeros(scorer.num_classes, scorer.num_classes, dtype=torch.long)
    for i in range(0, len(scorer.truth), chunk):
        keys = space.keys([p[i:i + chunk] for p in member_probs], [1] * len(member_probs))
        conf += scorer.counts(scorer.truth[i:i + chunk].reshape(-1), space.class_of(space.top(keys)).reshape(-1))
    return conf


def ensemble_selection(member_probs: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                       max_rounds: int = 10, chunk: int = 8, costs: Sequence[float] | None = None,
                       budget: float | None = None) -> Selection:
    """The better on val (plain greedy on ties) of two hill-climbs: from the best single member
    (greedy_selection as Caruana wrote it) and from the best equal-weight subset (best_subset).
    Its `tried` holds both val mIoUs. The members are scored alone once, for both."""
    scorer, member_conf = _score_members(member_probs, labels, num_classes, chunk, costs, budget)
    climb = {"max_rounds": max_rounds, "chunk": chunk, "costs": costs, "budget": budget}
    tried = {"best member": _hill_climb(member_probs, scorer, member_conf, None, **climb)}
    start = best_subset(member_probs, labels, num_classes, tried["best member"].member_miou, chunk, costs, budget)
    if len(start) > 1:
        tried["best subset"] = _hill_climb(member_probs, scorer, member_conf, start, **climb)
        tried["best subset"].start = "best subset"
    kept = max(tried.values(), key=lambda s: s.val_miou)  # the first of equals: plain greedy
    kept.tried = {name: s.val_miou for name, s in tried.items()}
    return kept


def _within_budget(costs, budget, chosen: set, count: int) -> list[bool]:
    if budget is None:
        return [True] * count
    spent = sum(costs[m] for m in chosen)
    return [m in chosen or spent + costs[m] <= budget for m in range(count)]


def _confusion_with(candidate: torch.Tensor, running: torch.Tensor, scorer: _Scorer, space: KeySpace,
                    chunk: int) -> torch.Tensor:
    """The confusion matrix of running + candidate, counted chunk by chunk as its labels come out
    (one byte-indexed bincount per chunk costs less than finding the pixels whose label changed)."""
    conf = torch.zeros(scorer.num_classes, scorer.num_classes, dtype=torch.long)
    for i in range(0, len(running), chunk):
        labels = space.class_of(space.top(running[i:i + chunk], candidate[i:i + chunk]))
        conf += scorer.counts(scorer.truth[i:i + chunk].reshape(-1), labels.reshape(-1))
    return conf


def per_class_selection(member_probs: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                        counts: Sequence[int], max_rounds: int = 20, chunk: int = 8,
                        costs: Sequence[float] | None = None, budget: float | None = None) -> ClassSelection:
    """Class-wise refinement of a greedy selection (counts: how often it chose each member).

    Each round adds one member's probabilities for one class only: the (member, class) pair that raises
    val mIoU most, so that a member strong on a rare class contributes there without its mistakes on
    the others. Stops when no pair improves or after max_rounds. Raising one class's score can only
    switch a pixel to that class, and only where the member's probability (at most 1) covers the
    pixel's gap to its top score: those are the only pixels recounted. costs and budget as in
    greedy_selection: a member new to the ensemble must fit in what is left of the budget.
    """
    _check_quantized(member_probs)
    scorer, space = _Scorer(labels, num_classes), KeySpace(num_classes, sum(counts) + max_rounds)
    running = space.keys(member_probs, counts)
    top = space.top_in_chunks(running, chunk).reshape(-1)
    predicted = space.class_of(top)
    truth = scorer.truth.reshape(-1)
    conf = scorer.confusion(predicted)
    class_counts = [[c] * num_classes for c in counts]
    start = score = mean_iou(conf)
    path = []
    image_size = labels[0].numel()
    for round_index in range(1, max_rounds + 1):
        best = None
        in_use = {m for m, row in enumerate(class_counts) if any(row)}
        allowed = _within_budget(costs, budget, in_use, len(member_probs))
        for cls in range(num_classes):
            column = running[:, cls].reshape(-1)
            near = torch.nonzero((top.int() - column.int() < PROB_SCALE * space.shift) & (predicted != cls)).squeeze(1)
            image, pixel = near // image_size, near % image_size
            near_top, near_column = top[near].int(), column[near].int()
            near_label, near_truth = predicted[near], truth[near]
            for member, probs in enumerate(member_probs):
                if not allowed[member]:
                    continue
                raised = near_column + probs[:, cls].reshape(len(probs), -1)[image, pixel].int() * space.shift
                switches = raised > near_top
                target = near_truth[switches]
                candidate = scorer.moved(conf, target, near_label[switches], torch.full_like(target, cls))
                candidate_score = mean_iou(candidate)
                if candidate_score > (best[0] if best else score):
                    best = (candidate_score, member, cls, candidate)
        if best is None:
            break
        score, member, cls, conf = best
        running[:, cls] += (member_probs[member][:, cls].int() * space.shift).to(space.dtype)
        class_counts[member][cls] += 1
        torch.maximum(top, running[:, cls].reshape(-1), out=top)  # only this class's keys rose
        predicted = space.class_of(top)
        path.append({"round": round_index, "member": member, "class": cls, "val_miou": score})
    return ClassSelection(counts=class_counts, rounds=sum(counts), path=path, val_miou=score, start_miou=start,
                          confusion=conf)
