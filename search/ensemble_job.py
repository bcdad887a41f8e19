"""From an experiment to a submission: pick the top trials of one backbone, compute their val
probabilities, select a weighted ensemble greedily on val mIoU, run it on the test set.

Every member is evaluated at the submission resolution (size x size): its logits are resized
bilinearly before the softmax, and val labels are resized with nearest neighbour.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipeline.augment import build_transform
from data_pipeline.dataset import SegmentationDataset, load_split
from data_pipeline.submission import write_submission
from errors import UserError
from models.checkpoint import load_checkpoint
from models.ensemble import Selection, ensemble_confusion, greedy_selection
from models.inference import predict_probs, to_labels
from models.metrics import iou_per_class

from .experiment import TrialRecord, ranked, read_trials

BATCH_SIZE = 16


@dataclass
class Member:
    trial: TrialRecord
    model: torch.nn.Module
    meta: dict


def choose_members(trials: list[TrialRecord], topk: int, backbone: str | None) -> tuple[str, list[TrialRecord]]:
    """The topk best trials sharing a backbone (by default the best trial's)."""
    candidates = ranked(trials)
    if not candidates:
        raise UserError("the experiment has no trial with a checkpoint to ensemble (did every trial fail?)")
    backbone = backbone or candidates[0].config.get("backbone")
    group = [t for t in candidates if t.config.get("backbone") == backbone][:topk]
    if not group:
        available = sorted({str(t.config.get("backbone")) for t in candidates})
        raise UserError(f"no finished trial uses backbone {backbone!r}; available: {', '.join(available)}")
    return backbone, group


def _loader(data_root: Path, ann: str, meta: dict, with_masks: bool) -> DataLoader:
    split = load_split(data_root, ann, meta["input_size"][0], with_masks=with_masks)
    norm = meta["normalization"]
    return DataLoader(SegmentationDataset(split, build_transform("none", norm["mean"], norm["std"], train=False)),
                      batch_size=BATCH_SIZE)


def val_probabilities(member: Member, data_root: Path, val_ann: str, size: int, device) -> torch.Tensor:
    """[N, C, size, size] float16 val probabilities of one member (kept on the CPU)."""
    probs = predict_probs(member.model, _loader(data_root, val_ann, member.meta, with_masks=False), (size, size), device)
    return torch.cat([p.half().cpu() for p in probs])


def build_ensemble(experiment: Path, *, topk: int, backbone: str | None, size: int, out: Path | None,
                   data_root: Path | None = None, max_rounds: int = 10, log=print) -> dict:
    """Selects and runs the ensemble; writes submission.csv and ensemble.json; returns the summary."""
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone, chosen = choose_members(read_trials(experiment), topk, backbone)
    config = chosen[0].config
    data_root = Path(data_root or config["data_root"])
    val_ann, test_ann = config["val_ann"], config["test_ann"]
    members = [Member(t, *load_checkpoint(t.checkpoint, device)) for t in chosen]
    _check_compatible(members, data_root, val_ann)
    log(f"Backbone {backbone}: {len(members)} candidate(s) " + ", ".join(m.trial.trial_id for m in members))

    labels = torch.from_numpy(load_split(data_root, val_ann, size).masks)
    num_classes = members[0].meta["num_classes"]
    probs = [val_probabilities(m, data_root, val_ann, size, device) for m in members]
    selection = greedy_selection(probs, labels, num_classes, max_rounds=max_rounds)
    _log_selection(selection, members, log)
    per_class = iou_per_class(ensemble_confusion(list(zip(selection.weights, probs)), labels, num_classes))
    del probs

    out = Path(out) if out else Path(experiment) / "ensemble" / "submission.csv"
    rows = write_submission(out, _predict_test(members, selection.weights, data_root, test_ann, size, device))
    summary = {
        "experiment": str(experiment), "backbone": backbone, "size": size, "data_root": str(data_root),
        "val_miou": selection.val_miou,
        "per_class_iou": dict(zip(members[0].meta["class_names"], _nan_to_none(per_class))),
        "selection_path": [{**s, "trial_id": members[s["member"]].trial.trial_id} for s in selection.path],
        "members": [{"trial_id": m.trial.trial_id, "checkpoint": str(m.trial.checkpoint), "config": m.trial.config,
                     "weight": w, "val_miou": v, "train_val_miou": m.trial.best_val_miou}
                    for m, w, v in zip(members, selection.weights, selection.member_miou)],
        "submission": str(out), "test_images": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    _write_json(out.with_name("ensemble.json"), summary)
    return summary


def _check_compatible(members: list[Member], data_root: Path, val_ann: str) -> None:
    """Every member must predict the same classes and have been validated on the same val images."""
    first = members[0]
    val_images = list(load_split(data_root, val_ann, first.meta["input_size"][0], with_masks=False).file_names)
    for m in members:
        if m.meta["class_names"] != first.meta["class_names"]:
            raise UserError(f"trial {m.trial.trial_id} predicts different classes than {first.trial.trial_id}")
        if m.meta.get("val_images") != val_images:
            raise UserError(f"trial {m.trial.trial_id} was validated on other images than {data_root / val_ann}")


def _log_selection(selection: Selection, members: list[Member], log) -> None:
    for i, (m, score) in enumerate(zip(members, selection.member_miou)):
        c = m.trial.config
        log(f"  member {i} {m.trial.trial_id} {c.get('decoder')}/{c.get('loss')}: val mIoU {score:.4f}")
    log("Selection path (round, member added, ensemble val mIoU):")
    for step in selection.path:
        log(f"  {step['round']:2d}  member {step['member']}  {step['val_miou']:.4f}")
    weights = ", ".join(f"{m.trial.trial_id}={w:.2f}" for m, w in zip(members, selection.weights) if w)
    log(f"Ensemble val mIoU {selection.val_miou:.4f} (best single {max(selection.member_miou):.4f}); weights {weights}")


def _predict_test(members: list[Member], weights: list[float], data_root: Path, test_ann: str, size: int, device):
    """Yields (file_name, uint8 label map) per test image, one batch of all members at a time."""
    used = [(m, w) for m, w in zip(members, weights) if w]
    loaders = [_loader(data_root, test_ann, m.meta, with_masks=False) for m, _ in used]
    file_names = loaders[0].dataset.split.file_names
    index = 0
    for batches in zip(*loaders):
        total = sum(w * next(predict_probs(m.model, [b], (size, size), device)) for (m, w), b in zip(used, batches))
        for labels in to_labels(total).to(torch.uint8).cpu().numpy():
            yield file_names[index], labels
            index += 1


def _nan_to_none(values: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in values]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


