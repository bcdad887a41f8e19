"""From an experiment to a submission: pick the top trials of one backbone, compute their val
probabilities, select a weighted ensemble on val mIoU (models.ensemble.ensemble_selection), run it on
the test set.

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
from data_pipeline.pseudo_labels import write_pseudo_labels
from data_pipeline.submission import write_submission
from data_pipeline.trial_data import DataSpec
from errors import UserError
from labels import by_label
from models.checkpoint import WEIGHTS_FILE, load_checkpoint
from models.class_filter import ClassFilter, FilterFit, fit_class_filter
from models.class_scales import ScaledChoice, choose_with_scales, weight_candidates
from models.ensemble import (ClassSelection, Decision, OverBudget, Selection, combine, combine_in_chunks,
                             ensemble_selection, has_weight, per_class_selection, quantize)
from models.inference import predict_batch
from models.optim import inference_amp
from models.metrics import iou_per_class
from models.open_set import UnknownScoring

from .experiment import TrialRecord, ranked, read_trials

BATCH_SIZE = 16


@dataclass
class Member:
    trial: TrialRecord
    model: torch.nn.Module
    meta: dict

    @property
    def input_size(self) -> int:
        return self.meta["input_size"][0]

    def predict(self, images: torch.Tensor, size: int, device, tta: str) -> torch.Tensor:
        """Probabilities [B, C, size, size] of a loader's uint8 batch, in the precision inference runs
        at on device (bf16 where it is fast, as in training)."""
        return predict_batch(self.model, images, (size, size), device, tta, self.meta["normalization"],
                             inference_amp(device))


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


def split_probabilities(member: Member, split: Split, size: int, device, tta: str = "none") -> torch.Tensor:
    """[N, C, size, size] uint8 probabilities (x 255, models.ensemble.quantize) of one member on a split
    loaded at its input size, on the CPU."""
    return torch.cat([quantize(member.predict(images, size, device, tta)).cpu() for images, _ in _loader(split)])


def val_probabilities(member: Member, data: DataSpec, size: int, device, tta: str = "none"):
    """split_probabilities of the val set."""
    return split_probabilities(member, data.val_split(member.input_size, with_masks=False), size, device, tta)


def inference_ms_per_image(member: Member, data: DataSpec, size: int, device, tta: str) -> float:
    """One member's prediction time per image (TTA and resize to the submission size included) on a
    val batch, after a warm-up run on it."""
    images = next(iter(_loader(data.val_split(member.input_size, with_masks=False))))[0]

    def predict():
        member.predict(images, size, device, tta)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    predict()
    started = time.perf_counter()
    predict()
    return (time.perf_counter() - started) * 1000 / len(images)


def val_cache_path(member: Member, data: DataSpec, size: int, tta: str, cache_dir: Path, device) -> Path:
    """Where a member's val probabilities are cached: the name holds a hash of what they depend on
    (weights file, val set, size, TTA), so a changed checkpoint or val set is never read from a stale file."""
    weights = Path(member.trial.checkpoint) / WEIGHTS_FILE
    key = json.dumps([str(weights), weights.stat().st_mtime_ns, weights.stat().st_size,
                      data.val_fingerprint(), size, tta, "uint8", str(inference_amp(device))])
    return cache_dir / f"val-{member.trial.trial_id}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"


def load_val_cache(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def cached_val_probabilities(member: Member, data: DataSpec, size: int, device, tta: str,
                             path: Path) -> tuple[torch.Tensor, bool]:
    """val_probabilities, kept as a uint8 .npy at path (val_cache_path) and memory-mapped by later
    runs. Returns (probabilities, whether they came from the cache)."""
    if path.is_file():
        return load_val_cache(path), True
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
    val_cache: list[Path]  # each member's cached val probabilities
    ms_per_image: list[float]  # each member's inference time per image
    class_selection: ClassSelection | None = None  # with --per-class
    scaled: ScaledChoice | None = None  # the weights kept with their class scales (models.class_scales)
    rejection: dict | None = None  # with open-set members: unknown_label, reject_label, threshold, curve, ...
    filter_fit: FilterFit | None = None  # the per-class false-positive control chosen on val

    @property
    def ensemble_ms_per_image(self) -> float:
        """The members with a weight run one after another."""
        return sum(ms for ms, w in zip(self.ms_per_image, self.weights) if has_weight(w))

    @property
    def confusion(self) -> torch.Tensor:
        """The ensemble's on val (with rejection at its threshold, and its class filter)."""
        if self.filter_fit:
            return self.filter_fit.confusion
        return self.unfiltered_confusion

    @property
    def unfiltered_confusion(self) -> torch.Tensor:
        if self.rejection:
            return self.rejection["confusion"]
        if self.scaled:
            return self.scaled.confusion
        return self.selected.confusion

    @property
    def per_class_iou(self) -> np.ndarray:
        return iou_per_class(self.confusion)

    @property
    def val_miou(self) -> float:
        if self.filter_fit:
            return self.filter_fit.val_miou
        if self.rejection:
            return self.rejection["curve"][self.rejection["index"]]["miou"]
        if self.scaled:
            return self.scaled.val_miou
        return self.selected.val_miou

    @property
    def reject(self) -> tuple[float, int] | None:
        """(threshold, label) of the ensemble's open-set rejection, if any."""
        return (self.rejection["threshold"], self.rejection["reject_label"]) if self.rejection else None

    @property
    def class_filter(self):
        return self.filter_fit.filter if self.filter_fit else None

    @property
    def scales(self) -> list[float] | None:
        return self.scaled.fit.scales if self.scaled else None

    @property
    def decision(self) -> Decision:
        """How the weighted probabilities become labels (models.ensemble.combine's arguments)."""
        return Decision(self.reject, self.class_filter, self.scales)

    @property
    def class_names(self) -> list[str]:
        return self.members[0].meta["class_names"]

    def terms(self, probs: list[torch.Tensor]) -> list[tuple]:
        """(weight, probabilities) of the members that take part, for models.ensemble.combine."""
        return [(w, p) for w, p in zip(self.weights, probs) if has_weight(w)]

    @property
    def weights(self) -> list:
        """Per member: one weight, or one per class with --per-class."""
        if self.scaled:
            return self.scaled.weights
        return self.selected.weights

    @property
    def selected(self) -> Selection | ClassSelection:
        """The weights as selection made them: the class-wise refinement with --per-class."""
        return self.class_selection or self.selection


@dataclass(frozen=True)
class EnsembleOptions:
    """What ensemble_select.py asks for (see its --help)."""
    topk: int = 5
    backbone: str | None = None  # None: the best trial's; "auto": every backbone, keep the best on val
    size: int = 256  # the submission's label maps, size x size: members are scored at it
    out: Path | None = None  # submission path (default EXPERIMENT/ensemble/submission.csv)
    data_root: Path | None = None  # where the data lives now, if it moved since the search
    max_rounds: int = 10  # greedy rounds (and class-wise additions with per_class)
    tta: str = "none"
    per_class: bool = False  # refine the weights class by class (models.ensemble.per_class_selection)
    latency_budget: float | None = None  # most ms per image the members may take together
    class_filter: bool = True  # fit per-class thresholds on val (models.class_filter)
    class_scales: bool = True  # fit per-class factors on val (models.class_scales)
    pseudo_labels: Path | None = None  # also write the confident test predictions as COCO there
    pseudo_threshold: float = 0.9


def select_group(trials: list[TrialRecord], backbone: str, options: EnsembleOptions, device, cache_dir: Path,
                 log) -> GroupEnsemble:
    """The ensemble of the top trials of one backbone: weights selected on val, then its open-set
    rejection and class filter fitted on val."""
    size, tta, budget_ms, max_rounds = options.size, options.tta, options.latency_budget, options.max_rounds
    _, chosen = choose_members(trials, options.topk, backbone)
    data = DataSpec.from_config(chosen[0].config, options.data_root)
    members = [Member(t, *load_checkpoint(t.checkpoint, device)) for t in chosen]
    val = data.val_split(size)
    _check_compatible(members, val.file_names)
    log(f"Backbone {backbone}: {len(members)} candidate(s) " + ", ".join(m.trial.trial_id for m in members))
    labels = torch.from_numpy(np.array(val.masks))  # a copy: the cached maps are read-only
    num_classes = members[0].meta["num_classes"]
    paths = [val_cache_path(m, data, size, tta, cache_dir, device) for m in members]
    cached = [cached_val_probabilities(m, data, size, device, tta, path) for m, path in zip(members, paths)]
    probs = [p for p, _ in cached]
    log(f"Val probabilities: {sum(hit for _, hit in cached)} of {len(cached)} read from {cache_dir}")
    ms = [inference_ms_per_image(m, data, size, device, tta) for m in members]
    log("Inference ms per image: " + ", ".join(f"{m.trial.trial_id} {t:.1f}" for m, t in zip(members, ms)))
    budget = {"costs": ms, "budget": budget_ms}
    selection = ensemble_selection(probs, labels, num_classes, max_rounds=max_rounds, **budget)  # may raise OverBudget
    _log_selection(selection, members, log)
    refined = None
    if options.per_class:
        refined = per_class_selection(probs, labels, num_classes, selection.counts, max_rounds=max_rounds, **budget)
        _log_class_selection(refined, members, members[0].meta["class_names"], log)
    group = GroupEnsemble(backbone, data, members, selection, paths, ms, refined)
    if options.class_scales:
        group.scaled = _choose_with_scales(group, probs, labels, num_classes, ms, budget_ms, log)
    group.rejection = _ensemble_rejection(group, probs, labels, num_classes, log)
    if options.class_filter:
        group.filter_fit = _fit_class_filter(group, probs, labels, num_classes, log)
    log(f"Ensemble inference: {group.ensemble_ms_per_image:.1f} ms per image"
        + (f" (budget {budget_ms:g})" if budget_ms else ""))
    return group


def build_ensemble(experiment: Path, options: EnsembleOptions, log=print) -> dict:
    """Selects and runs the ensemble; writes submission.csv and ensemble.json; returns the summary."""
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trials = read_trials(experiment)
    best_backbone, _ = choose_members(trials, options.topk, None)  # raises when there is nothing to ensemble
    backbones = _backbones_by_rank(trials) if options.backbone == "auto" else [options.backbone or best_backbone]
    cache_dir = Path(experiment) / "ensemble" / "val_cache"
    groups, fastest = [], []
    for b in backbones:
        try:
            groups.append(select_group(trials, b, options, device, cache_dir, log))
        except OverBudget as exc:
            log(f"Backbone {b}: no candidate fits the latency budget (the fastest takes {exc.cheapest:.1f} ms)")
            fastest.append(exc.cheapest)
    if not groups:
        raise UserError(f"--latency-budget {options.latency_budget:g} ms: no candidate fits (the fastest takes "
                        f"{min(fastest):.1f} ms per image on {device})")
    group = max(groups, key=lambda g: g.val_miou)
    if len(groups) > 1:
        scores = ", ".join(f"{g.backbone} {g.val_miou:.4f}" for g in groups)
        log(f"Backbone groups by ensemble val mIoU: {scores}; keeping {group.backbone}")

    out = Path(options.out) if options.out else Path(experiment) / "ensemble" / "submission.csv"
    rows, pseudo = _write_outputs(group, options, out, device, log)
    summary = _summary(experiment, group, groups, options, device)
    summary.update({"submission": str(out), "test_images": rows, "seconds": round(time.perf_counter() - started, 1),
                    "pseudo_labels": pseudo and {"file": str(options.pseudo_labels),
                                                 "threshold": options.pseudo_threshold, **pseudo}})
    write_atomically(out.with_name("ensemble.json"), json.dumps(summary, indent=2, default=str))
    return summary


def _write_outputs(group: GroupEnsemble, options: EnsembleOptions, out: Path, device, log) -> tuple[int, dict | None]:
    """Writes the test submission (and the pseudo-labels when asked); (rows written, pseudo-label counts)."""
    kept = []  # (file_name, labels, confident) per test image, for the pseudo-labels

    def submission_rows():
        for file_name, labels, confidence in _predict_test(group, options.size, device, options.tta):
            if options.pseudo_labels:
                kept.append((file_name, labels, confidence >= options.pseudo_threshold))
            yield file_name, labels

    rows = write_submission(out, submission_rows())
    if not options.pseudo_labels:
        return rows, None
    return rows, _write_pseudo_labels(options.pseudo_labels, group.data, kept, group.class_names, log)


def _summary(experiment: Path, group: GroupEnsemble, groups: list[GroupEnsemble], options: EnsembleOptions,
             device) -> dict:
    """ensemble.json, less what writing the submission adds."""
    members, selection, refined, class_names = group.members, group.selection, group.class_selection, group.class_names
    fit = group.filter_fit
    return {
        "experiment": str(experiment), "backbone": group.backbone, "size": options.size, "tta": options.tta,
        "data_root": group.data.root, "val_miou": group.val_miou, "selection_val_miou": selection.val_miou,
        "selection": {"start": selection.start, "tried": selection.tried, "stopped": selection.stopped,
                      "best_member_val_miou": max(selection.member_miou),
                      "gain_over_best_member": selection.val_miou - max(selection.member_miou),
                      "members_with_weight": sum(1 for c in selection.counts if c)},
        "groups": {g.backbone: g.val_miou for g in groups},
        "per_class_iou": dict(zip(class_names, _nan_to_none(group.per_class_iou))),
        "confusion": group.confusion.tolist(),  # val pixels, rows = truth, columns = prediction
        "selection_path": [{**s, "trial_ids": [members[m].trial.trial_id for m in s["members"]]}
                           for s in selection.path],
        "per_class_path": [{**s, "trial_id": members[s["member"]].trial.trial_id, "class_name": class_names[s["class"]]}
                           for s in refined.path] if refined else None,
        "members": [{"trial_id": m.trial.trial_id, "checkpoint": str(m.trial.checkpoint), "config": m.trial.config,
                     "weight": dict(zip(class_names, w)) if refined else w, "val_miou": v,
                     "per_class_iou": dict(zip(class_names, _nan_to_none(iou_per_class(conf)))),
                     "ms_per_image": ms, "train_val_miou": m.trial.best_val_miou,
                     "val_cache": str(cache)}
                    for m, w, v, conf, ms, cache in zip(members, group.weights, selection.member_miou,
                                                        selection.member_conf, group.ms_per_image, group.val_cache)],
        "ms_per_image": group.ensemble_ms_per_image, "latency_budget_ms": options.latency_budget,
        "device": str(device),
        "open_set": group.rejection and {k: v for k, v in group.rejection.items() if k not in ("confusion", "index")},
        "class_scales": group.scaled and {
            "rules": group.scaled.fit.to_dict(class_names), "weights_of": group.scaled.name,
            "tried": group.scaled.tried, "val_miou_before": group.selected.val_miou,
            "val_gain": group.scaled.val_miou - group.selected.val_miou},
        "class_filter": fit and {"rules": fit.filter.to_dict(class_names), "val_miou_before": fit.val_miou_before,
                                 "val_gain": fit.val_miou - fit.val_miou_before,
                                 "unseen": [class_names[c] for c in fit.unseen]},
    }


def _write_pseudo_labels(path: Path, data: DataSpec, kept: list, class_names: list[str], log) -> dict:
    from data_pipeline.coco import CocoSegmentation

    test = CocoSegmentation(data.root, data.test)
    by_name = {test.file_name(i): test.coco.imgs[i] for i in test.image_ids}
    images = [{k: by_name[name][k] for k in ("id", "file_name", "width", "height")} for name, _, _ in kept]
    counts = write_pseudo_labels(path, images, ((labels, confident) for _, labels, confident in kept), class_names)
    log(f"Pseudo-labels: {path} ({counts['images']} images, {counts['confident_share']:.0%} of pixels confident)")
    return counts


def _ensemble_rejection(group: GroupEnsemble, probs: list[torch.Tensor], labels: torch.Tensor, num_classes: int,
                        log, chunk: int = 8) -> dict | None:
    """With open-set members given weight (models.open_set): the threshold on the ensemble's top-class share below
    which a pixel is rejected, chosen on val for the best mIoU. The members' own rules (magnitude
    among them) do not combine across models; the ensemble's probabilities do."""
    open_set = [m.meta["open_set"] for m, w in zip(group.members, group.weights)
                if m.meta.get("open_set") and has_weight(w)]
    if not open_set:
        return None
    unknown, reject = open_set[0]["unknown_label"], open_set[0]["reject_label"]
    sweep = UnknownScoring(unknown, open_set=True, rule="softmax", reject_label=reject).sweep(num_classes)
    for start, (predicted, share) in zip(range(0, len(labels), chunk),
                                         combine_in_chunks(group.terms(probs), scales=group.scales, chunk=chunk)):
        sweep.add(labels[start:start + chunk], predicted, share)
    index = sweep.best()
    curve = sweep.curve()
    log(f"Open-set rejection: top-class share below {curve[index]['threshold']:.2f} -> label {reject}; val mIoU "
        f"{curve[index]['miou']:.4f} (without rejection {curve[0]['miou']:.4f}), UNKNOWN pixels rejected "
        f"{curve[index]['unknown_rejected']:.1%}, known pixels rejected {curve[index]['known_rejected']:.1%}")
    return {"unknown_label": unknown, "reject_label": reject, "threshold": curve[index]["threshold"],
            "index": index, "curve": curve, "confusion": sweep.confusions()[index]}


def _choose_with_scales(group: GroupEnsemble, probs: list[torch.Tensor], truth: torch.Tensor, num_classes: int,
                        ms: list[float], budget_ms: float | None, log) -> ScaledChoice:
    """The weights and class scales (models.class_scales) with the best val mIoU, among the selection's
    weights and equal weights of the best N members by their own val mIoU (those within the latency
    budget). With --per-class, the class-wise weights alone."""
    if group.class_selection:
        candidates = {"per-class selection": group.class_selection.weights}
    else:
        candidates = weight_candidates(group.selection.weights, group.selection.member_miou, ms, budget_ms)
    choice = choose_with_scales(candidates, probs, truth, num_classes)
    names = group.class_names
    factors = ", ".join(f"{name} x{factor:g}" for name, factor in choice.fit.to_dict(names).items())
    tried = ", ".join(f"{name} {miou:.4f}" for name, miou in choice.tried.items())
    log(f"Class scales: {factors or 'none'}; kept the weights of {choice.name} (val mIoU with scales: {tried}); "
        f"val mIoU {group.selected.val_miou:.4f} -> {choice.val_miou:.4f}")
    return choice


def _fit_class_filter(group: GroupEnsemble, probs: list[torch.Tensor], truth: torch.Tensor, num_classes: int,
                      log) -> FilterFit:
    """The per-class thresholds (models.class_filter) that raise the ensemble's val mIoU most, fitted on
    its val predictions (after any rejection)."""
    chunks = list(combine_in_chunks(group.terms(probs), group.reject, scales=group.scales))
    labels = torch.cat([labels.to(torch.uint8) for labels, _ in chunks])
    share = torch.cat([share.half() for _, share in chunks])
    fit = fit_class_filter(labels, share, truth, num_classes)
    names = group.class_names
    rules = ", ".join(f"{name} never" if threshold > 1 else f"{name} at share >= {threshold:g}"
                      for name, threshold in fit.filter.to_dict(names).items())
    log(f"Class filter: {rules or 'none'}; val mIoU {fit.val_miou_before:.4f} -> {fit.val_miou:.4f}"
        + (f" (never predicted, absent from the val truth: {', '.join(names[c] for c in fit.unseen)})"
           if fit.unseen else ""))
    return fit


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


def _log_class_selection(refined: ClassSelection, members: list[Member], class_names: list[str], log) -> None:
    if not refined.path:
        log("Per-class refinement: no class-wise addition raises val mIoU")
        return
    log("Per-class refinement (round, member added for one class, ensemble val mIoU):")
    for step in refined.path:
        log(f"  {step['round']:2d}  member {step['member']} for {class_names[step['class']]}  {step['val_miou']:.4f}")
    log(f"Per-class ensemble val mIoU {refined.val_miou:.4f} (greedy {refined.start_miou:.4f})")


def _log_selection(selection: Selection, members: list[Member], log) -> None:
    for i, (m, score) in enumerate(zip(members, selection.member_miou)):
        c = m.trial.config
        log(f"  member {i} {m.trial.trial_id} {c.get('decoder')}/{c.get('loss')}: val mIoU {score:.4f}")
    log("Starts tried (val mIoU after the hill-climb): "
        + ", ".join(f"{name} {score:.4f}" for name, score in selection.tried.items()) + f"; kept {selection.start}")
    log("Selection path (round, members added, ensemble val mIoU):")
    for step in selection.path:
        log(f"  {step['round']:2d}  member {', '.join(map(str, step['members']))}  {step['val_miou']:.4f}")
    weights = ", ".join(f"{m.trial.trial_id}={w:.2f}" for m, w in zip(members, selection.weights) if w)
    best = max(selection.member_miou)
    log(f"Ensemble val mIoU {selection.val_miou:.4f}, {selection.val_miou - best:+.4f} over the best member's "
        f"{best:.4f}; weights {weights}; stopped: {selection.stopped}")


def _predict_test(group: GroupEnsemble, size: int, device, tta: str):
    """Yields (file_name, uint8 label map, float32 confidence map) per test image, one batch of all
    members at a time, labelled as models.ensemble.combine does (with the group's rejection and class
    filter); the confidence is the top class's share of the weighted probability sum."""
    used = [(m, w) for m, w in zip(group.members, group.weights) if has_weight(w)]
    loaders = [_loader(group.data.load(group.data.test, m.input_size, with_masks=False)) for m, _ in used]
    file_names = loaders[0].dataset.split.file_names
    index = 0
    for batches in zip(*loaders):
        terms = [(w, m.predict(b[0], size, device, tta)) for (m, w), b in zip(used, batches)]
        labels, confidence = combine(terms, *group.decision)
        for label_map, confidence_map in zip(labels.to(torch.uint8).cpu().numpy(), confidence.cpu().numpy()):
            yield file_names[index], label_map, confidence_map
            index += 1


def member_weight(weight):
    """A member's weight as ensemble.json stores it (a number, or {class name: weight}) -> combine's form."""
    return list(weight.values()) if isinstance(weight, dict) else weight


def saved_decision(summary: dict) -> Decision:
    """The open-set rejection, class filter and class scales of a saved ensemble (ensemble.json), for
    models.ensemble.combine."""
    class_names = list(summary["per_class_iou"])
    rejection, rules = summary.get("open_set"), (summary.get("class_filter") or {}).get("rules")
    factors = (summary.get("class_scales") or {}).get("rules")
    return Decision((rejection["threshold"], rejection["reject_label"]) if rejection else None,
                    ClassFilter.from_dict(rules, class_names) if rules else None,
                    by_label(factors, class_names, 1.0) if factors else None)


def _nan_to_none(values: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in values]


