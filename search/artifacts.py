"""What the report shows, read from an experiment's files and computed: per-trial results, Optuna's
parameter importances, slices by parameter, UNKNOWN shares and open-set curves, the ensemble's val
predictions and its worst images. No figures here (search.figures), no page (search.report)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import torch
from ray.tune import ExperimentAnalysis

from labels import IGNORE

from .experiment import TrialRecord
from .space import TRIAL_PARAMS

IMPORTANCE_TRIALS = 20  # below this many trials, importances are a rough ranking and the report says so


def histories(experiment: Path) -> dict[str, list[dict]]:
    """Every trial's reported results in order: {trial_id: [{epoch, value columns...}]}."""
    frames = ExperimentAnalysis(str(Path(experiment).resolve())).trial_dataframes  # Ray takes absolute paths only
    return {trial_id: frame.to_dict("records") for trial_id, frame in frames.items()}


def curves(trials: list[TrialRecord], runs: dict[str, list[dict]]) -> dict:
    """Each trial's ranking metric per epoch: {trial_id: {epochs, values, status}}."""
    metric = trials[0].metric
    return {t.trial_id: {"epochs": [r["training_iteration"] for r in runs.get(t.trial_id, [])],
                         "values": [r.get(metric) for r in runs.get(t.trial_id, [])], "status": t.status}
            for t in trials}


def progress(trials: list[TrialRecord], runs: dict[str, list[dict]]) -> dict:
    """The best value reported so far by any trial against seconds since the first report."""
    metric, better = trials[0].metric, (max if maximised(trials) else min)
    points = sorted((r["timestamp"], r[metric]) for rows in runs.values() for r in rows if r.get(metric) is not None)
    times, best = [], []
    for stamp, value in points:
        times.append(stamp - points[0][0])
        best.append(better(best[-1], value) if best else value)
    return {"seconds": times, "best": best}


def read_summary(path: Path) -> dict | None:
    """An ensemble.json, or None where ensemble_select.py has not written one."""
    return json.loads(path.read_text()) if path.is_file() else None


def maximised(trials: list[TrialRecord]) -> bool:
    from models.metrics import METRIC_MODES

    return METRIC_MODES[trials[0].metric] == "max"


def searched_params(trials: list[TrialRecord]) -> dict[str, list]:
    """The trial parameters that took more than one value across the trials: {name: values per trial}."""
    values = {name: [t.config.get(name) for t in trials] for name in TRIAL_PARAMS}
    return {name: v for name, v in values.items() if len({json.dumps(x, default=str) for x in v}) > 1}


def importances(trials: list[TrialRecord]) -> dict[str, float]:
    """Optuna's importances (its default evaluator) over a study rebuilt from the trials that reported."""
    scored = [t for t in trials if not math.isnan(t.best)]
    params = searched_params(scored)
    if len(scored) < 3 or not params:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" lines in the CLIs' output
    study = optuna.create_study(direction="maximize" if maximised(scored) else "minimize")
    distributions = {name: _distribution(values) for name, values in params.items()}
    for i, t in enumerate(scored):
        chosen = {name: _encode(params[name][i]) for name in params}
        study.add_trial(optuna.trial.create_trial(params=chosen, distributions=distributions, value=t.best))
    return dict(optuna.importance.get_param_importances(study))


def _encode(value):
    """Optuna's categorical choices: None, bool, int, float or str."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def _distribution(values: list):
    present = [v for v in values if v is not None]
    if present and len(present) == len(values) and all(isinstance(v, float) for v in present):
        low, high = min(present), max(present)
        return optuna.distributions.FloatDistribution(low, high, log=low > 0 and high / low > 10)
    return optuna.distributions.CategoricalDistribution(sorted({_encode(v) for v in values}, key=str))


def slice_groups(trials: list[TrialRecord]) -> dict[str, dict]:
    """For each searched parameter that varied: {"continuous": False, "groups": {value label: the best
    values of its trials}} for a choice, {"continuous": True, "x": values, "y": best values, "log": bool}
    for a number that takes many values (lr, weight decay, focal gamma)."""
    scored = [t for t in trials if not math.isnan(t.best)]
    slices = {}
    for name, values in searched_params(scored).items():
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values) and any(isinstance(v, float) for v in numbers) and len(set(numbers)) > 3:
            low, high = min(numbers), max(numbers)
            slices[name] = {"continuous": True, "x": numbers, "y": [t.best for t in scored],
                            "log": low > 0 and high / low > 10}
            continue
        groups: dict[str, list[float]] = {}
        for t, value in zip(scored, values):
            groups.setdefault(value_label(value), []).append(t.best)
        slices[name] = {"continuous": False, "groups": groups}
    return slices


def trial_labels(trials: list[TrialRecord]) -> dict[str, str]:
    """A legend label per trial: its id and the parameters that differ between the trials."""
    params = searched_params(trials)
    return {t.trial_id: " ".join([t.trial_id, *(f"{n}={value_label(v[i])}" for n, v in params.items())])
            for i, t in enumerate(trials)}


def value_label(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def unknown_data(trials: list[TrialRecord], summary: dict | None) -> dict | None:
    """Each trial's shares of UNKNOWN and of known val pixels flagged as UNKNOWN, by treatment, and the
    open-set rules (threshold and curve) of the best open-set trials and of the ensemble; None when no
    trial reports the shares (the label space has no UNKNOWN class)."""
    from models.checkpoint import read_meta

    metas = {t.trial_id: read_meta(t.checkpoint) for t in trials if t.checkpoint}
    flagged = {tid: m["metrics"] for tid, m in metas.items() if "val_unknown_rejected" in m["metrics"]}
    if not flagged:
        return None
    by_treatment: dict[str, list] = {}
    points = {}
    for t in trials:
        if t.trial_id in flagged:
            metrics = flagged[t.trial_id]
            point = (metrics["val_known_rejected"], metrics["val_unknown_rejected"], metrics["val_miou"])
            by_treatment.setdefault(t.config.get("unknown", "keep"), []).append(point)
            points[t.trial_id] = dict(zip(("known_flagged", "unknown_flagged", "val_miou"), point))
    rules = [(tid, m["open_set"]) for tid, m in metas.items() if m.get("open_set", {}).get("curve")]
    rules = sorted(rules, key=lambda r: -metas[r[0]]["metrics"]["val_miou"])[:4]
    if summary and summary.get("open_set"):
        rules.append(("ensemble", summary["open_set"]))
    chosen = {name: {"threshold": rule["threshold"],
                     "chosen": min(rule["curve"], key=lambda p: abs(p["threshold"] - rule["threshold"]))}
              for name, rule in rules}
    return {"by_treatment": by_treatment, "trials": points, "rules": rules, "curves": chosen}


def ensemble_val_labels(summary: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(val images uint8 [N, S, S, 3], val labels [N, S, S], ensemble predictions [N, S, S], file names) at the
    submission size, from the members' cached val probabilities, labelled as ensemble_select.py
    labels them (weights, rejection, class filter, class scales: models.ensemble.combine)."""
    from data_pipeline.trial_data import DataSpec
    from models.ensemble import combine_in_chunks, has_weight
    from search.ensemble_job import load_val_cache, member_weight, saved_decision

    used = [m for m in summary["members"] if has_weight(member_weight(m["weight"]))]
    val = DataSpec.from_config(used[0]["config"], summary["data_root"]).val_split(summary["size"])
    terms = [(member_weight(m["weight"]), load_val_cache(Path(m["val_cache"]))) for m in used]
    predictions = [labels.to(torch.uint8).numpy() for labels, _ in combine_in_chunks(terms, *saved_decision(summary))]
    # copies: the cache is read-only
    return np.array(val.images), np.array(val.masks), np.concatenate(predictions), list(val.file_names)


def worst_images(summary: dict, count: int = 6) -> dict:
    """The val images where the ensemble's mIoU is lowest: the arrays to draw and, per image, its mIoU
    and the class confusions that cost most pixels there."""
    from models.metrics import image_mious

    names = list(summary["per_class_iou"])
    images, truth, predicted, files = ensemble_val_labels(summary)
    scores = image_mious(torch.from_numpy(truth), torch.from_numpy(predicted), len(names)).numpy()
    order = [int(i) for i in np.argsort(np.nan_to_num(scores, nan=np.inf))[:count]]
    worst = []
    for i in order:
        valid = truth[i] != IGNORE
        wrong = valid & (truth[i] != predicted[i])
        confusions = _top_confusions(truth[i][wrong], predicted[i][wrong], names, valid.sum())
        worst.append({"index": i, "file_name": files[i], "miou": float(scores[i]), "confusions": confusions})
    return {"names": names, "images": images, "truth": truth, "predicted": predicted, "worst": worst}


def _top_confusions(truth: np.ndarray, predicted: np.ndarray, names: list[str], valid: int) -> list[str]:
    """'true → predicted share' for the confusions covering the most pixels of an image."""
    pairs, counts = np.unique(truth.astype(np.int64) * len(names) + predicted, return_counts=True)
    top = np.argsort(counts)[::-1][:3]
    return [f"{names[pairs[k] // len(names)]} → {names[pairs[k] % len(names)]} {counts[k] / max(valid, 1):.0%}"
            for k in top]
