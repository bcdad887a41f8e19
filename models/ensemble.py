"""Greedy forward ensemble selection with replacement (Caruana et al., ICML 2004) on val mIoU.

The ensemble starts from the best single member; each round adds (again, possibly) the member whose
addition gives the highest val mIoU. After max_rounds the best prefix of the path is kept, so the
ensemble is never worse on val than the best single member. Weights are selection counts / rounds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .metrics import confusion_matrix, mean_iou


def ensemble_miou(prob_sum: torch.Tensor, labels: torch.Tensor, num_classes: int, chunk: int = 16) -> float:
    """Dataset mIoU of argmax(prob_sum) against labels; prob_sum [N, C, H, W], labels [N, H, W]."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(labels), chunk):
        pred = prob_sum[start:start + chunk].argmax(dim=1)
        conf += confusion_matrix(labels[start:start + chunk], pred, num_classes)
    return mean_iou(conf)


@dataclass
class Selection:
    weights: list[float]  # one per member
    path: list[dict] = field(default_factory=list)  # {"round", "member", "val_miou"} per round
    val_miou: float = 0.0
    member_miou: list[float] = field(default_factory=list)


def greedy_selection(member_probs: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                     max_rounds: int = 10) -> Selection:
    """member_probs: per member [N, C, H, W] probabilities (any float dtype) on the same val images."""
    if not member_probs:
        raise ValueError("no ensemble members")
    member_miou = [ensemble_miou(p, labels, num_classes) for p in member_probs]
    first = int(np.argmax(member_miou))
    running = member_probs[first].float().clone()
    path = [{"round": 1, "member": first, "val_miou": member_miou[first]}]
    for round_index in range(2, max_rounds + 1):
        scores = [ensemble_miou(running + p.float(), labels, num_classes) for p in member_probs]
        best = int(np.argmax(scores))
        running += member_probs[best].float()
        path.append({"round": round_index, "member": best, "val_miou": scores[best]})
    # Keep the best prefix (earliest on ties).
    best_len = max(range(len(path)), key=lambda i: (path[i]["val_miou"], -i)) + 1
    kept = [0] * len(member_probs)
    for step in path[:best_len]:
        kept[step["member"]] += 1
    return Selection(weights=[c / best_len for c in kept], path=path,
                     val_miou=path[best_len - 1]["val_miou"], member_miou=member_miou)
