"""Greedy forward ensemble selection with replacement (Caruana et al., ICML 2004) on val mIoU.

The ensemble starts from the best single member; each round adds (again, possibly) the member whose
addition gives the highest val mIoU. After max_rounds the best prefix of the path is kept, so the
ensemble is never worse on val than the best single member. Weights are selection counts / rounds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .inference import to_labels
from .metrics import confusion_matrix, mean_iou


Terms = Sequence[tuple[float, torch.Tensor]]  # (weight, probabilities [N, C, H, W]) pairs


def ensemble_confusion(terms: Terms, labels: torch.Tensor, num_classes: int, chunk: int = 8) -> torch.Tensor:
    """Confusion matrix of argmax(sum of weight * probabilities) against labels [N, H, W].

    Summed a few images at a time, so no full-size float32 copy of the members is ever made.
    """
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(labels), chunk):
        total = sum(w * p[start:start + chunk].float() for w, p in terms if w)
        conf += confusion_matrix(labels[start:start + chunk], to_labels(total), num_classes)
    return conf


def _confusions_after_adding(candidates: list[torch.Tensor], running: torch.Tensor, predicted: torch.Tensor,
                             conf: torch.Tensor, labels: torch.Tensor, num_classes: int, chunk: int) -> list[torch.Tensor]:
    """For each candidate, the confusion matrix of running + candidate, from conf (that of running,
    whose labels are `predicted`), recounting only the pixels whose label changes.

    Image chunks are the outer loop, so each chunk of the running sum is read once for all
    candidates while it is still in cache.
    """
    confs = [conf.clone() for _ in candidates]
    buffer = torch.empty_like(running[:chunk])  # reused: fresh large allocations cost page faults
    for i in range(0, len(labels), chunk):
        part, old, truth = running[i:i + chunk], predicted[i:i + chunk], labels[i:i + chunk]
        summed = buffer[:len(part)]
        for candidate, candidate_conf in zip(candidates, confs):
            new = to_labels(torch.add(part, candidate[i:i + chunk], out=summed))
            changed = new != old
            candidate_conf += (confusion_matrix(truth[changed], new[changed], num_classes)
                               - confusion_matrix(truth[changed], old[changed], num_classes))
    return confs


def ensemble_miou(terms: Terms, labels: torch.Tensor, num_classes: int) -> float:
    return mean_iou(ensemble_confusion(terms, labels, num_classes))


@dataclass
class Selection:
    weights: list[float]  # one per member
    path: list[dict] = field(default_factory=list)  # {"round", "member", "val_miou"} per round
    val_miou: float = 0.0
    member_miou: list[float] = field(default_factory=list)


def greedy_selection(member_probs: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                     max_rounds: int = 10, chunk: int = 8) -> Selection:
    """member_probs: per member [N, C, H, W] probabilities (any float dtype) on the same val images.

    The ensemble's summed probabilities, its predicted labels and its confusion matrix are kept
    between rounds; a candidate is scored by updating the confusion matrix only where adding it
    changes the prediction.
    """
    if not member_probs:
        raise ValueError("no ensemble members")
    member_conf = [ensemble_confusion([(1.0, p)], labels, num_classes, chunk) for p in member_probs]
    member_miou = [mean_iou(conf) for conf in member_conf]
    first = int(np.argmax(member_miou))
    running = member_probs[first].float().clone()
    predicted = torch.cat([to_labels(running[i:i + chunk]) for i in range(0, len(labels), chunk)])
    conf = member_conf[first]
    path = [{"round": 1, "member": first, "val_miou": member_miou[first]}]
    for round_index in range(2, max_rounds + 1):
        confs = _confusions_after_adding(member_probs, running, predicted, conf, labels, num_classes, chunk)
        scores = [mean_iou(c) for c in confs]
        best = int(np.argmax(scores))
        conf = confs[best]
        for i in range(0, len(labels), chunk):
            running[i:i + chunk] += member_probs[best][i:i + chunk]
            predicted[i:i + chunk] = to_labels(running[i:i + chunk])
        path.append({"round": round_index, "member": best, "val_miou": scores[best]})
    # Keep the best prefix (earliest on ties).
    best_len = max(range(len(path)), key=lambda i: (path[i]["val_miou"], -i)) + 1
    kept = [0] * len(member_probs)
    for step in path[:best_len]:
        kept[step["member"]] += 1
    return Selection(weights=[c / best_len for c in kept], path=path,
                     val_miou=path[best_len - 1]["val_miou"], member_miou=member_miou)
