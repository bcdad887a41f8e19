"""Reading a finished (or interrupted) experiment through Ray Tune's ExperimentAnalysis, without Ray.

An experiment directory is Tune's own layout under the storage path; this project adds
`leaderboard.csv` and an `ensemble/` folder beside Tune's files.
"""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import ExperimentAnalysis

from atomic_file import atomic_path
from errors import UserError

from models.checkpoint import META_FILE, read_meta
from models.metrics import METRIC_MODES

from .space import TRIAL_PARAMS

LEADERBOARD_FILE = "leaderboard.csv"
LAUNCH_FILE = "launch.json"  # written by launch.py at the search's start: what --resume needs
LEADERBOARD_COLUMNS = ["experiment", "trial_id", "best_val_miou", "best_epoch", "epochs", "status", "time_s"]


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    config: dict
    status: str  # finished | stopped early (by ASHA) | cut by budget | errored | unfinished
    best_val_miou: float  # NaN when the trial never reported
    epochs: int
    time_s: float
    checkpoint: Path | None  # directory of the best checkpoint, if any
    error: str = ""  # last line of the trial's traceback, for errored trials
    metric: str = "val_miou"  # the experiment's ranking metric (experiment.metric of the space)
    best: float = math.nan  # the trial's best value of it

    def sort_key(self) -> float:
        """Smaller is better; trials that never reported last."""
        if math.isnan(self.best):
            return math.inf
        return -self.best if METRIC_MODES[self.metric] == "max" else self.best


def is_experiment(path: Path) -> bool:
    return path.is_dir() and any(path.glob("experiment_state-*.json"))


def latest_experiment(storage: str | Path) -> Path:
    storage = Path(storage)
    candidates = [p for p in storage.iterdir() if is_experiment(p)] if storage.is_dir() else []
    if not candidates:
        raise UserError(f"no experiment found under {storage}; run launch.py first or pass --experiment")
    return max(candidates, key=lambda p: max(f.stat().st_mtime for f in p.glob("experiment_state-*.json")))


def read_trials(experiment: str | Path) -> list[TrialRecord]:
    experiment = Path(experiment)
    if not is_experiment(experiment):
        raise UserError(f"{experiment} is not a Ray Tune experiment folder (no experiment_state-*.json)")
    analysis = ExperimentAnalysis(str(Path(experiment).resolve()))  # a relative path is no URI to Ray
    return [_record(analysis, trial) for trial in analysis.trials]


def _record(analysis: ExperimentAnalysis, trial) -> TrialRecord:
    metric = trial.config.get("metric", "val_miou")
    result = trial.last_result or {}
    epochs = int(result.get("training_iteration", 0))
    status = trial_status(trial.status, result, int(trial.config.get("max_epochs", 0)))
    checkpoint = analysis.get_best_checkpoint(trial, metric, METRIC_MODES[metric]) if epochs else None
    return TrialRecord(
        trial_id=trial.trial_id, config=dict(trial.config), status=status,
        best_val_miou=float(result.get("best_val_miou", math.nan)), epochs=epochs,
        time_s=float(result.get("time_total_s", 0.0)),
        checkpoint=Path(checkpoint.path) if checkpoint is not None else None,
        error=_last_error_line(trial) if status == "errored" else "",
        metric=metric, best=float(result.get(f"best_{metric}", math.nan)),
    )


def trial_status(tune_status: str, result: dict, max_epochs: int) -> str:
    """finished | stopped early (by ASHA) | cut by budget | errored | unfinished, of a trial with this
    Tune status and last result."""
    epochs = int(result.get("training_iteration", 0))
    if tune_status == "ERROR":
        return "errored"
    if tune_status != "TERMINATED":
        return "unfinished"
    if epochs >= max_epochs:
        return "finished"
    # a trial plans fewer epochs than max_epochs only to end before a time budget's deadline
    return "cut by budget" if int(result.get("planned_epochs", max_epochs)) < max_epochs else "stopped early"


def _last_error_line(trial) -> str:
    try:
        text = trial.get_error() or ""
    except OSError:
        return ""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def ranked(trials: list[TrialRecord]) -> list[TrialRecord]:
    """Trials with a checkpoint, best first by the experiment's metric."""
    usable = [t for t in trials if t.checkpoint is not None and not math.isnan(t.best)]
    return sorted(usable, key=TrialRecord.sort_key)


WARM_START_TRIALS = 3  # the best trials of an earlier experiment a warm-started search begins with


def warm_start_points(spec, trials: list[TrialRecord], count: int = WARM_START_TRIALS) -> list[dict]:
    """The searched parameters of an earlier experiment's best `count` trials, as first trials of the
    search spec (a search.space.SearchSpec): a parameter this space fixes or does not search, a value
    outside its range and a condition that does not hold are left to the sampler."""
    searched = {p.name: p for p in spec.params if p.kind != "fixed"}
    fixed = {p.name: p.values[0] for p in spec.params if p.kind == "fixed"}
    points = []
    for t in ranked(trials)[:count]:
        point = {name: t.config[name] for name, p in searched.items() if name in t.config and p.admits(t.config[name])}
        point = {name: value for name, value in point.items() if searched[name].active({**fixed, **point})}
        if point and point not in points:
            points.append(point)
    return points


def leaderboard_rows(trials: list[TrialRecord], experiment: str | Path | None = None) -> list[dict]:
    """One row per trial, best first by the experiment's metric (trials that never reported last):
    experiment, trial_id, every trial parameter the space set (searched or fixed, exact values), the
    seed it trained from, best_val_miou (and best_<metric> for another ranking metric), best_epoch,
    epochs, status, time_s, the val metrics of its best checkpoint and its per-class val IoU
    (iou_<class>), the checkpoint, and the search's space file, dataset, external training data and
    start time (launch.json)."""
    launch = _launch_settings(experiment)
    params = [name for name in TRIAL_PARAMS if any(name in t.config for t in trials)]
    rows = []
    for t in sorted(trials, key=TrialRecord.sort_key):
        meta = read_meta(t.checkpoint) if t.checkpoint and (t.checkpoint / META_FILE).is_file() else {}
        rows.append({
            "experiment": Path(experiment).name if experiment else "", "trial_id": t.trial_id,
            **{name: _exact(t.config.get(name)) for name in params}, "seed": t.config.get("seed", ""),
            "best_val_miou": _score(t.best_val_miou),
            **({f"best_{t.metric}": _score(t.best)} if t.metric != "val_miou" else {}),
            "best_epoch": meta.get("epoch", ""), "epochs": t.epochs, "status": t.status, "time_s": f"{t.time_s:.1f}",
            **_checkpoint_metrics(meta),
            "checkpoint": str(t.checkpoint or ""), "space": launch.get("space", ""),
            "dataset": launch.get("data_root", ""), "extra_data": "; ".join(launch.get("extra_data", [])),
            "started": launch.get("started", ""),
        })
    return _same_columns(rows)


def _launch_settings(experiment: str | Path | None) -> dict:
    path = Path(experiment) / LAUNCH_FILE if experiment else None
    if path is None or not path.is_file():
        return {}
    settings = json.loads(path.read_text())
    settings.setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)))
    return settings


def _checkpoint_metrics(meta: dict) -> dict:
    """The val metrics of a best checkpoint (at its epoch), and its per-class IoU as iou_<class> columns."""
    metrics = meta.get("metrics", {})
    values = {k: _score(v) for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))}
    names = meta.get("class_names", [])
    values.update({f"iou_{n}": "" if v is None else _score(v) for n, v in zip(names, metrics.get("val_class_iou", []))})
    return values


def _same_columns(rows: list[dict]) -> list[dict]:
    """Every row with every column any row has (trials differ in conditional parameters and metrics)."""
    columns = list(dict.fromkeys(c for r in rows for c in r))
    return [{c: r.get(c, "") for c in columns} for r in rows]


def varying_columns(rows: list[dict]) -> list[str]:
    """The columns worth a console table: trial, the parameters that differ between trials, the scores."""
    params = [c for c in rows[0] if c in TRIAL_PARAMS and len({r[c] for r in rows}) > 1] if rows else []
    scores = [c for c in (rows[0] if rows else {}) if c.startswith("best_") and c != "best_epoch"]
    return ["trial_id", *params, *scores, "best_epoch", "epochs", "status", "time_s"]


def _exact(value) -> str:
    """A parameter as the trial got it: repr of a float keeps every digit that identifies it."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _score(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def write_leaderboard(experiment: str | Path, rows: list[dict]) -> Path:
    return _write_csv(Path(experiment) / LEADERBOARD_FILE, rows)


def write_storage_leaderboard(storage: str | Path) -> Path:
    """STORAGE/leaderboard.csv: the rows of every experiment's leaderboard under storage, in one sheet."""
    rows = []
    for experiment in sorted(p for p in Path(storage).iterdir() if is_experiment(p)):
        if (experiment / LEADERBOARD_FILE).is_file():
            with open(experiment / LEADERBOARD_FILE, newline="") as f:
                rows += [{"experiment": experiment.name, **row} for row in csv.DictReader(f)]
    return _write_csv(Path(storage) / LEADERBOARD_FILE, _same_columns(rows))


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else LEADERBOARD_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def best_trial_summary(trials: list[TrialRecord]) -> str:
    """The best trial's score, searched parameters and checkpoint, for the end of a search."""
    reported = [t for t in trials if not math.isnan(t.best)]
    if not reported:
        return "No trial reported a score."
    best = min(reported, key=TrialRecord.sort_key)
    params = "\n".join(f"    {k}: {v}" for k, v in best.config.items() if k in TRIAL_PARAMS)
    return (f"Best trial {best.trial_id}: {best.metric} {best.best:.4f} ({best.status}, {best.epochs} epochs)\n"
            f"  config:\n{params}\n  checkpoint: {best.checkpoint or 'none kept'}")


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or (list(rows[0]) if rows else LEADERBOARD_COLUMNS)
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
