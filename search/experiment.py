"""Reading a finished (or interrupted) experiment through Ray Tune's ExperimentAnalysis, without Ray.

An experiment directory is Tune's own layout under the storage path; this project adds
`leaderboard.csv` and an `ensemble/` folder beside Tune's files.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ray.tune import ExperimentAnalysis

from atomic_file import atomic_path
from errors import UserError

from models.losses import loss_label, parse_loss
from models.metrics import METRIC_MODES

from .space import TRIAL_PARAMS, trial_defaults

LEADERBOARD_FILE = "leaderboard.csv"
LEADERBOARD_COLUMNS = ["trial_id", "decoder", "backbone", "loss", "focal_gamma", "augmentation", "resize", "lr",
                       "best_val_miou", "epochs", "status", "time_s"]


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    config: dict
    status: str  # finished | stopped early | errored | unfinished
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
    max_epochs = int(trial.config.get("max_epochs", 0))
    if trial.status == "ERROR":
        status = "errored"
    elif trial.status != "TERMINATED":
        status = "unfinished"
    else:
        status = "finished" if epochs >= max_epochs else "stopped early"
    checkpoint = analysis.get_best_checkpoint(trial, metric, METRIC_MODES[metric]) if epochs else None
    return TrialRecord(
        trial_id=trial.trial_id, config=dict(trial.config), status=status,
        best_val_miou=float(result.get("best_val_miou", math.nan)), epochs=epochs,
        time_s=float(result.get("time_total_s", 0.0)),
        checkpoint=Path(checkpoint.path) if checkpoint is not None else None,
        error=_last_error_line(trial) if status == "errored" else "",
        metric=metric, best=float(result.get(f"best_{metric}", math.nan)),
    )


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


def leaderboard_rows(trials: list[TrialRecord]) -> list[dict]:
    """One row per trial, best first by the experiment's metric; trials that never reported last.
    A metric other than val mIoU gets a column of its own after best_val_miou, and UNKNOWN
    treatments one after lr when a trial does not keep UNKNOWN as a class."""
    rows = []
    treatments = any(t.config.get("unknown", "keep") != "keep" for t in trials)
    for t in sorted(trials, key=TrialRecord.sort_key):
        c = {**trial_defaults(), **t.config}
        rows.append({
            "trial_id": t.trial_id, "decoder": c.get("decoder", ""), "backbone": c.get("backbone", ""),
            "loss": loss_label(c["loss"]), "focal_gamma": _fmt(c["focal_gamma"]) if _uses_focal(c["loss"]) else "",
            "augmentation": c.get("augmentation", ""), "resize": c.get("resize", ""), "lr": _fmt(c.get("lr")),
            **({"unknown": _treatment(c)} if treatments else {}),
            "best_val_miou": _score(t.best_val_miou),
            **({f"best_{t.metric}": _score(t.best)} if t.metric != "val_miou" else {}),
            "epochs": t.epochs, "status": t.status, "time_s": f"{t.time_s:.1f}",
        })
    return rows


def _treatment(config: dict) -> str:
    margin = config.get("objectosphere_margin") if config["unknown"] == "open_set" else None
    return config["unknown"] if margin is None else f"open_set+objectosphere({_fmt(margin)})"


def _uses_focal(loss) -> bool:
    return "focal" in dict(parse_loss(loss))


def _score(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def write_leaderboard(experiment: str | Path, rows: list[dict]) -> Path:
    path = Path(experiment) / LEADERBOARD_FILE
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


def format_table(rows: list[dict]) -> str:
    columns = list(rows[0]) if rows else LEADERBOARD_COLUMNS
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
