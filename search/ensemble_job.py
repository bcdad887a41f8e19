"""From an experiment to a submission: pick the top trials of one backbone, compute their val
probabilities, select a weighted ensemble greedily on val mIoU, run it on the test set.

Every member is evaluated at the submission resolution (size x size): its logits are resized
bilinearly before the softmax, and val labels are resized with nearest neighbour.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atomic_file import atomic_path, write_atomically
from data_pipeline.dataset import SegmentationDataset, Split, make_loader
from data_pipeline.submission import write_submission
from data_pipeline.trial_data import DataSpec
from errors import UserError
from models.checkpoint import WEIGHTS_FILE, load_checkpoint
from models.ensemble import Selection, ensemble_confusion, greedy_selection
from models.inference import predict_batch, predict_probs, to_labels
from models.metrics import iou_per_class

from .experiment import TrialRecord, ranked, read_trials

BATCH_SIZE = 16


@dataclass
class Member:
    trial: TrialRecord
    model: torch.nn.Module
    meta: dict


def choose_members(trials: list[TrialRecord], topk: int, backbone: str | None) -> tuple[str, list[TrialRecord]]:
    """The topk best trials sharing a backbone (by default the best trial's) and a val set (the best of
    them's k-fold fold: members of other folds trained on its val images)."""
    candidates = ranked(trials)
    if not candidates:
        raise UserError("the experiment has no trial with a checkpoint to ensemble (did every trial fail?)")
    backbone = backbone or candidates[0].config.get("backbone")
    group = [t for t in candidates if t.config.get("backbone") == backbone]
    if not group:
        available = sorted({str(t.config.get("backbone")) for t in candidates})
        raise UserError(f"no finished trial uses backbone {backbone!r}; available: {', '.join(available)}")
    fold = group[0].config.get("fold", 0)
    return backbone, [t for t in group if t.config.get("fold", 0) == fold][:topk]


def _loader(split: Split):
    return make_loader(SegmentationDataset(split, "none", train=False), BATCH_SIZE)


def val_probabilities(member: Member, data: DataSpec, size: int, device, tta: str = "none"):
    """[N, C, size, size] float16 val probabilities of one member (kept on the CPU)."""
    loader = _loader(data.val_split(member.meta["input_size"][0], with_masks=False))
    probs = predict_probs(member.model, loader, (size, size), device, tta, member.meta["normalization"])
    return torch.cat([p.half().cpu() for p in probs])


def cached_val_probabilities(member: Member, data: DataSpec, size: int, device, tta: str,
                             cache_dir: Path) -> tuple[torch.Tensor, bool]:
    """val_probabilities, kept as a float16 .npy in cache_dir and memory-mapped by later runs.

    The file name holds a hash of what the probabilities depend on (weights file, val set, size,
    TTA), so a changed checkpoint or val set is never read from a stale file.
    Returns (probabilities, whether they came from the cache).
    """
    weights = Path(member.trial.checkpoint) / WEIGHTS_FILE
    key = json.dumps([str(weights), weights.stat().st_mtime_ns, weights.stat().st_size,
                      data.val_fingerprint(), size, tta])
    path = cache_dir / f"val-{member.trial.trial_id}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path, mmap_mode="c")), True
    probs = val_probabilities(member, data, size, device, tta)
    with atomic_path(path) as tmp:
        np.save(tmp, probs.numpy())
    return probs, False


@dataclass
class GroupEnsemble:
    """The ensemble selected among the top trials of one backbone."""
    backbone: str
    data: DataSpec
    members: list[Member]
    selection: Selection
    per_class_iou: np.ndarray


def select_group(trials: list[TrialRecord], backbone: str, topk: int, data_root: Path | None, size: int, device, *,
                 max_rounds: int, tta: str, cache_dir: Path, log) -> GroupEnsemble:
    _, chosen = choose_members(trials, topk, backbone)
    data = DataSpec.from_config(chosen[0].config, data_root)
    members = [Member(t, *load_checkpoint(t.checkpoint, device)) for t in chosen]
    val = data.val_split(size)
    _check_compatible(members, val.file_names)
    log(f"Backbone {backbone}: {len(members)} candidate(s) " + ", ".join(m.trial.trial_id for m in members))
    labels = torch.from_numpy(np.asarray(val.masks))
    num_classes = members[0].meta["num_classes"]
    cached = [cached_val_probabilities(m, data, size, device, tta, cache_dir) for m in members]
    probs = [p for p, _ in cached]
    log(f"Val probabilities: {sum(hit for _, hit in cached)} of {len(cached)} read from {cache_dir}")
    selection = greedy_selection(probs, labels, num_classes, max_rounds=max_rounds)
    _log_selection(selection, members, log)
    per_class = iou_per_class(ensemble_confusion(list(zip(selection.weights, probs)), labels, num_classes))
    return GroupEnsemble(backbone, data, members, selection, per_class)


def build_ensemble(experiment: Path, *, topk: int, backbone: str | None, size: int, out: Path | None,
                   data_root: Path | None = None, max_rounds: int = 10, tta: str = "none", log=print) -> dict:
    """Selects and runs the ensemble; writes submission.csv and ensemble.json; returns the summary.

    backbone: a name, None for the best trial's backbone, or "auto" to select an ensemble for every
    backbone and keep the one with the best val mIoU.
    """
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trials = read_trials(experiment)
    best_backbone, _ = choose_members(trials, topk, None)  # raises when there is nothing to ensemble
    backbones = _backbones_by_rank(trials) if backbone == "auto" else [backbone or best_backbone]
    cache_dir = Path(experiment) / "ensemble" / "val_cache"
    groups = [select_group(trials, b, topk, data_root, size, device, max_rounds=max_rounds, tta=tta,
                           cache_dir=cache_dir, log=log) for b in backbones]
    group = max(groups, key=lambda g: g.selection.val_miou)
    if len(groups) > 1:
        scores = ", ".join(f"{g.backbone} {g.selection.val_miou:.4f}" for g in groups)
        log(f"Backbone groups by ensemble val mIoU: {scores}; keeping {group.backbone}")

    members, selection = group.members, group.selection
    out = Path(out) if out else Path(experiment) / "ensemble" / "submission.csv"
    data = group.data
    test_rows = _predict_test(members, selection.weights, data, size, device, tta)
    rows = write_submission(out, test_rows)
    summary = {
        "experiment": str(experiment), "backbone": group.backbone, "size": size, "tta": tta,
        "data_root": data.root, "val_miou": selection.val_miou,
        "groups": {g.backbone: g.selection.val_miou for g in groups},
        "per_class_iou": dict(zip(members[0].meta["class_names"], _nan_to_none(group.per_class_iou))),
        "selection_path": [{**s, "trial_id": members[s["member"]].trial.trial_id} for s in selection.path],
        "members": [{"trial_id": m.trial.trial_id, "checkpoint": str(m.trial.checkpoint), "config": m.trial.config,
                     "weight": w, "val_miou": v, "train_val_miou": m.trial.best_val_miou}
                    for m, w, v in zip(members, selection.weights, selection.member_miou)],
        "submission": str(out), "test_images": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    write_atomically(out.with_name("ensemble.json"), json.dumps(summary, indent=2, default=str))
    return summary


def _backbones_by_rank(trials: list[TrialRecord]) -> list[str]:
    return list(dict.fromkeys(t.config.get("backbone") for t in ranked(trials)))


def _check_compatible(members: list[Member], val_images) -> None:
    """Every member must predict the same classes and have been validated on the same val images."""
    first = members[0]
    for m in members:
        if m.meta["class_names"] != first.meta["class_names"]:
            raise UserError(f"trial {m.trial.trial_id} predicts different classes than {first.trial.trial_id}")
        if m.meta.get("val_images") != list(val_images):
            raise UserError(f"trial {m.trial.trial_id} was validated on other images than the val set of "
                            f"{first.trial.trial_id} (was the data changed since the search?)")


def _log_selection(selection: Selection, members: list[Member], log) -> None:
    for i, (m, score) in enumerate(zip(members, selection.member_miou)):
        c = m.trial.config
        log(f"  member {i} {m.trial.trial_id} {c.get('decoder')}/{c.get('loss')}: val mIoU {score:.4f}")
    log("Selection path (round, member added, ensemble val mIoU):")
    for step in selection.path:
        log(f"  {step['round']:2d}  member {step['member']}  {step['val_miou']:.4f}")
    weights = ", ".join(f"{m.trial.trial_id}={w:.2f}" for m, w in zip(members, selection.weights) if w)
    log(f"Ensemble val mIoU {selection.val_miou:.4f} (best single {max(selection.member_miou):.4f}); weights {weights}")


def _predict_test(members: list[Member], weights: list[float], data: DataSpec, size: int, device, tta: str):
    """Yields (file_name, uint8 label map) per test image, one batch of all members at a time."""
    used = [(m, w) for m, w in zip(members, weights) if w]
    loaders = [_loader(data.load(data.test, m.meta["input_size"][0], with_masks=False)) for m, _ in used]
    file_names = loaders[0].dataset.split.file_names
    index = 0
    for batches in zip(*loaders):
        total = sum(w * predict_batch(m.model, b[0], (size, size), device, tta, m.meta["normalization"])
                    for (m, w), b in zip(used, batches))
        for labels in to_labels(total).to(torch.uint8).cpu().numpy():
            yield file_names[index], labels
            index += 1


def _nan_to_none(values: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in values]


