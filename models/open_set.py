"""How a trial treats pixels labelled UNKNOWN, and open-set recognition of them (Dhamija et al., "Reducing
Network Agnostophobia", NeurIPS 2018).

The label space keeps UNKNOWN as a class (label u), as the competition scores it. A trial's `unknown`
parameter says how training treats those pixels:

  keep        a class like any other (the model predicts u by argmax)
  background  trained as background (label 0)
  ignore      not trained (label 255)
  open_set    the Entropic Open-Set loss: the softmax over the known classes is pushed towards
              uniform on UNKNOWN pixels. With `objectosphere_margin` ξ the Objectosphere term adds
              λ·max(ξ - ‖F‖, 0)² on known pixels and λ·‖F‖² on UNKNOWN ones (F: the features the
              head's classifier reads, λ = `objectosphere_weight`).

An open-set model scores the known classes only: its head has one output fewer and `KnownClassHead`
puts a constant, very low logit at u, so everything that reads probabilities (evaluation, ensembles,
submissions) sees the full label space with P(u) = 0. UNKNOWN is predicted by rejection instead: a
pixel whose score (its max softmax probability, or ‖F‖ with Objectosphere) is below a threshold chosen
on val to maximise val mIoU gets the reject label (`reject_as`: unknown = u, background = 0).
`ThresholdSweep` scores every candidate threshold in one pass over val.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import number, one_of
from labels import IGNORE

from .metrics import mean_iou

TREATMENTS = ("keep", "background", "ignore", "open_set")
REJECT_AS = ("unknown", "background")
UNKNOWN_LOGIT = -1.0e4  # exp(-1e4 - max) is 0 in float32: P(u) is exactly 0, and fp16 can hold it
SOFTMAX_THRESHOLDS = torch.linspace(0.0, 1.0, 101)  # the first, 0, rejects nothing
MAGNITUDE_THRESHOLDS = torch.cat([torch.zeros(1), torch.logspace(-3, 4, 141)])  # 20 per decade


# Trial parameters of the UNKNOWN treatment (search.space merges them into its TRIAL_PARAMS).
OPEN_SET_PARAMS = {
    "unknown": (one_of(TREATMENTS), "keep"),
    # ξ; null = Entropic Open-Set loss only, softmax rejection
    "objectosphere_margin": (number(low=0, low_open=True, optional=True, expected="a number > 0"), None),
    "objectosphere_weight": (number(low=0, low_open=True), 0.01),  # λ
    "reject_as": (one_of(REJECT_AS), "unknown"),
}


class KnownClassHead(nn.Module):
    """Wraps an smp segmentation head built for the known classes: inserts the constant UNKNOWN_LOGIT
    plane at the unknown label, and with `track_magnitude` keeps ‖F‖ of its input per pixel (at its
    output resolution) in `magnitude`, for the Objectosphere loss and magnitude rejection."""

    def __init__(self, head: nn.Module, unknown_label: int):
        super().__init__()
        self.head, self.unknown_label = head, unknown_label
        self.track_magnitude = False
        self.magnitude: torch.Tensor | None = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        known = self.head(features)
        if self.track_magnitude:
            norm = features.float().norm(dim=1, keepdim=True)
            self.magnitude = F.interpolate(norm, size=known.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        u = self.unknown_label
        plane = known.new_full((known.shape[0], 1, *known.shape[2:]), UNKNOWN_LOGIT)
        return torch.cat([known[:, :u], plane, known[:, u:]], dim=1)


def with_known_class_head(model: nn.Module, unknown_label: int) -> nn.Module:
    """model (built with one output fewer than the label space) as an open-set model."""
    model.segmentation_head = KnownClassHead(model.segmentation_head, unknown_label)
    return model


def known_class_head(model: nn.Module) -> KnownClassHead | None:
    head = getattr(model, "segmentation_head", None)
    return head if isinstance(head, KnownClassHead) else None


def known_targets(target: torch.Tensor, unknown_label: int) -> torch.Tensor:
    """Targets in the known label space (u removed: labels above it move down one), UNKNOWN ignored."""
    shifted = torch.where(target > unknown_label, target - 1, target)
    return torch.where((target == unknown_label) | (target == IGNORE), IGNORE, shifted)


def known_logits(logits: torch.Tensor, unknown_label: int) -> torch.Tensor:
    return torch.cat([logits[:, :unknown_label], logits[:, unknown_label + 1:]], dim=1)


def entropic_open_set(logits: torch.Tensor) -> torch.Tensor:
    """Per pixel -1/C Σ_c log softmax_c: the Entropic Open-Set loss of [B, C, ...] logits over C classes.
    Its gradient, softmax - 1/C, vanishes for a uniform prediction."""
    return -F.log_softmax(logits, dim=1).mean(dim=1)


class Relabelled(nn.Module):
    """A loss with UNKNOWN pixels relabelled first (as background, or ignored)."""

    def __init__(self, loss: nn.Module, unknown_label: int, label: int):
        super().__init__()
        self.loss, self.unknown_label, self.label = loss, unknown_label, label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, torch.where(target == self.unknown_label, self.label, target))


class OpenSetLoss(nn.Module):
    """(N_known·known_loss + N_unknown·mean EOS) / N over the labelled pixels, plus λ·the mean Objectosphere
    term when a margin is given. known_loss is the trial's loss over the known classes; for `ce` the
    sum is the paper's Entropic Open-Set loss exactly."""

    def __init__(self, known_loss: nn.Module, unknown_label: int, head: KnownClassHead | None = None,
                 margin: float | None = None, weight: float = 0.01):
        super().__init__()
        if margin is not None and head is None:
            raise ValueError("the Objectosphere term needs the model's KnownClassHead")
        self.known_loss, self.unknown_label, self.margin, self.weight = known_loss, unknown_label, margin, weight
        self.head = [head]  # a list: not a submodule of the loss (the model owns it)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = known_logits(logits, self.unknown_label)
        unknown = target == self.unknown_label
        labelled = (target != IGNORE).sum()
        n_unknown = unknown.sum()
        n_known = labelled - n_unknown
        eos = (entropic_open_set(known) * unknown).sum()
        total = self.known_loss(known, known_targets(target, self.unknown_label)) * n_known + eos
        if self.margin is not None:
            total = total + self.weight * self._objectosphere(target, unknown)
        return total / labelled.clamp_min(1)

    def _objectosphere(self, target: torch.Tensor, unknown: torch.Tensor) -> torch.Tensor:
        magnitude = self.head[0].magnitude
        if magnitude is None or magnitude.shape != target.shape:
            raise RuntimeError("the Objectosphere term needs the head's magnitude of this batch "
                               "(KnownClassHead.track_magnitude)")
        known = (target != IGNORE) & ~unknown
        short = (self.margin - magnitude).clamp_min(0) ** 2
        return (short * known).sum() + (magnitude ** 2 * unknown).sum()


def open_set_loss(treatment: str, loss: nn.Module, unknown_label: int, model: nn.Module, cfg: dict) -> nn.Module:
    """The trial's loss under its UNKNOWN treatment (for open_set, loss must be built over the known classes)."""
    if treatment == "keep":
        return loss
    if treatment in ("background", "ignore"):
        return Relabelled(loss, unknown_label, 0 if treatment == "background" else IGNORE)
    head = known_class_head(model)
    margin = cfg.get("objectosphere_margin")
    if margin is not None:
        head.track_magnitude = True
    return OpenSetLoss(loss, unknown_label, head, margin, cfg.get("objectosphere_weight", 0.01))


def rejection_rule(cfg: dict) -> str:
    """softmax (max probability) or magnitude (Objectosphere's ‖F‖)."""
    return "softmax" if cfg.get("objectosphere_margin") is None else "magnitude"


def reject_label(cfg: dict, unknown_label: int) -> int:
    return unknown_label if cfg.get("reject_as", "unknown") == "unknown" else 0


class ThresholdSweep:
    """Scores "reject every pixel whose score is below t" for each candidate threshold t, in one pass:
    per threshold bin, the confusion of the kept predictions and the truth of the rejected pixels.

    add(truth, labels, scores) per batch (labels: the argmax); `bins(scores)` gives each pixel's bin,
    which `labels_at` turns into the labels at a threshold.
    """

    def __init__(self, thresholds: torch.Tensor, num_classes: int, unknown_label: int, reject_label: int):
        self.thresholds = thresholds.double()
        self.num_classes, self.unknown_label, self.reject_label = num_classes, unknown_label, reject_label
        self.counts = torch.zeros(len(thresholds) + 1, num_classes, num_classes, dtype=torch.long)

    def bins(self, scores: torch.Tensor) -> torch.Tensor:
        """How many thresholds are <= each score: the pixel is rejected at threshold index j >= bin."""
        return torch.bucketize(scores.double(), self.thresholds.to(scores.device), right=True)

    def add(self, truth: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Adds a batch; returns its bins."""
        bins = self.bins(scores)
        valid = truth != IGNORE
        c = self.num_classes
        index = (bins[valid] * c + truth[valid].long()) * c + labels[valid].long()
        counts = torch.bincount(index, minlength=self.counts.numel()).view_as(self.counts)
        self.counts += counts.cpu()
        return bins

    def confusions(self) -> torch.Tensor:
        """[T, C, C]: the confusion matrix at each threshold."""
        kept = self.counts.flip(0).cumsum(0).flip(0)[1:]  # bins above j: score >= t_j
        rejected_truth = self.counts.sum(2).cumsum(0)[:-1]  # bins up to j: score < t_j
        conf = kept.clone()
        conf[:, :, self.reject_label] += rejected_truth
        return conf

    def rejected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] each: the share of UNKNOWN pixels, and of known labelled pixels, rejected at each threshold."""
        truth = self.counts.sum(2)  # [bins, C]
        rejected = truth.cumsum(0)[:-1].double()
        total = truth.sum(0).double()
        u = self.unknown_label
        known = torch.ones(self.num_classes, dtype=torch.bool)
        known[u] = False
        unknown_share = rejected[:, u] / total[u].clamp_min(1)
        known_share = rejected[:, known].sum(1) / total[known].sum().clamp_min(1)
        return unknown_share, known_share

    def best(self) -> int:
        """The index of the threshold with the best mIoU (the lowest of equals: reject least)."""
        mious = torch.tensor([mean_iou(conf) for conf in self.confusions()])
        return int(torch.argmax(mious))

    def curve(self) -> list[dict]:
        """Per threshold: threshold, miou, unknown_rejected, known_rejected."""
        unknown, known = self.rejected()
        return [{"threshold": float(t), "miou": mean_iou(conf), "unknown_rejected": float(u), "known_rejected": float(k)}
                for t, conf, u, k in zip(self.thresholds, self.confusions(), unknown, known)]

    def labels_at(self, labels: torch.Tensor, bins: torch.Tensor, index: int) -> torch.Tensor:
        """labels with the pixels rejected at threshold `index` set to the reject label."""
        return torch.where(bins <= index, torch.full_like(labels, self.reject_label), labels)


@dataclass(frozen=True)
class UnknownScoring:
    """How evaluation treats the UNKNOWN class of a label space: which label it is and, for an
    open-set model, how pixels are rejected (rule: softmax | magnitude) and as which label."""
    unknown_label: int
    open_set: bool = False
    rule: str = "softmax"
    reject_label: int = 0

    @classmethod
    def of_trial(cls, cfg: dict, unknown_label: int | None) -> "UnknownScoring | None":
        if unknown_label is None:
            return None
        if cfg.get("unknown", "keep") != "open_set":
            return cls(unknown_label)
        return cls(unknown_label, True, rejection_rule(cfg), reject_label(cfg, unknown_label))

    def sweep(self, num_classes: int) -> ThresholdSweep:
        thresholds = SOFTMAX_THRESHOLDS if self.rule == "softmax" else MAGNITUDE_THRESHOLDS
        return ThresholdSweep(thresholds, num_classes, self.unknown_label, self.reject_label)


def flagged_as_unknown(conf: torch.Tensor, unknown_label: int) -> tuple[float, float]:
    """From a confusion matrix: the share of UNKNOWN pixels, and of known ones, predicted UNKNOWN."""
    conf = conf.double().cpu()
    u = unknown_label
    known_rows = torch.cat([conf[:u], conf[u + 1:]])
    return float(conf[u, u] / conf[u].sum().clamp_min(1)), float(known_rows[:, u].sum() / known_rows.sum().clamp_min(1))
