"""report.html for an experiment: what the search tried, what mattered, what the ensemble does.

    python -m search.report EXPERIMENT      # also written at the end of launch.py and ensemble_select.py

Writes EXPERIMENT/report/report.html with PNG figures beside it (matplotlib, offline) and
report.json, the numbers behind every figure:
- learning curves: the ranking metric per epoch of every trial, trials stopped early by ASHA marked;
  and the best value so far against wall time;
- what mattered: Optuna's parameter importances over the trials (a study rebuilt from their
  configs and best values), and the best value of each trial sliced by decoder, backbone, loss,
  focal gamma, augmentation and resize;
- the ensemble (when ensemble_select.py has run): per-class IoU of the ensemble and of each member,
  and the ensemble's val confusion matrix;
- UNKNOWN (when the label space has that class): per trial, the shares of UNKNOWN and of known val
  pixels it flags as UNKNOWN (predicted, or rejected by an open-set model), by treatment; and the
  open-set curves (every rejection threshold) of the open-set trials and of the ensemble;
- error analysis: the val images where the ensemble's mIoU is lowest, as image / ground truth /
  prediction / error map, with the confusions that cost most pixels there (from the members'
  cached val probabilities, no model is run).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from ray.tune import ExperimentAnalysis  # noqa: E402

from atomic_file import write_atomically  # noqa: E402
from errors import UserError, run_cli  # noqa: E402

from .experiment import TrialRecord, is_experiment, leaderboard_rows, read_trials  # noqa: E402
from .space import TRIAL_PARAMS  # noqa: E402

REPORT_DIR = "report"
SLICED = ("decoder", "backbone", "loss", "focal_gamma", "augmentation", "resize", "unknown")


def histories(experiment: Path) -> dict[str, list[dict]]:
    """Every trial's reported results in order: {trial_id: [{epoch, value columns...}]}."""
    frames = ExperimentAnalysis(str(Path(experiment).resolve())).trial_dataframes  # Ray takes absolute paths only
    return {trial_id: frame.to_dict("records") for trial_id, frame in frames.items()}


def _save(fig, directory: Path, name: str) -> str:
    path = directory / name
    fig.tight_layout()
    fig.savefig(path.with_name(f".{path.name}"), dpi=110, format="png")
    plt.close(fig)
    path.with_name(f".{path.name}").replace(path)
    return name


def learning_curves(trials: list[TrialRecord], runs: dict[str, list[dict]], directory: Path) -> tuple[str, dict]:
    metric = trials[0].metric
    fig, ax = plt.subplots(figsize=(7, 4))
    data = {}
    for t in trials:
        rows = runs.get(t.trial_id, [])
        epochs, values = [r["training_iteration"] for r in rows], [r.get(metric) for r in rows]
        data[t.trial_id] = {"epochs": epochs, "values": values, "status": t.status}
        line, = ax.plot(epochs, values, marker=".", linewidth=1, label=t.trial_id)
        if t.status == "stopped early" and epochs:
            ax.plot(epochs[-1], values[-1], "x", color=line.get_color(), markersize=9)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch (x: stopped early by ASHA)")
    if len(trials) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, directory, "curves.png"), data


def best_over_time(trials: list[TrialRecord], runs: dict[str, list[dict]], directory: Path) -> tuple[str, dict]:
    """The best value reported so far by any trial against seconds since the first report."""
    metric, better = trials[0].metric, (max if _maximised(trials) else min)
    points = sorted((r["timestamp"], r[metric]) for rows in runs.values() for r in rows if r.get(metric) is not None)
    times, best = [], []
    for stamp, value in points:
        times.append(stamp - points[0][0])
        best.append(better(best[-1], value) if best else value)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.step(times, best, where="post")
    ax.set(xlabel="seconds since the first report", ylabel=f"best {metric} so far", title="Search progress")
    return _save(fig, directory, "progress.png"), {"seconds": times, "best": best}


def _maximised(trials: list[TrialRecord]) -> bool:
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
    study = optuna.create_study(direction="maximize" if _maximised(scored) else "minimize")
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


def importance_figure(scores: dict[str, float], directory: Path) -> str | None:
    if not scores:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(scores) + 1))
    names = list(scores)[::-1]
    ax.barh(names, [scores[n] for n in names])
    ax.set(xlabel="importance (Optuna, sums to 1)", title="What mattered")
    return _save(fig, directory, "importance.png")


def slices(trials: list[TrialRecord], directory: Path) -> tuple[str | None, dict]:
    """Each trial's best value against its decoder, backbone, loss, ... (the ones that varied)."""
    scored = [t for t in trials if not math.isnan(t.best)]
    varied = [n for n in SLICED if n in searched_params(scored)]
    if not varied:
        return None, {}
    columns = min(3, len(varied))
    rows = math.ceil(len(varied) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(varied):]:
        ax.set_visible(False)
    data = {}
    for ax, name in zip(axes.flat, varied):
        groups: dict[str, list[float]] = {}
        for t in scored:
            groups.setdefault(_label(t.config.get(name)), []).append(t.best)
        labels = sorted(groups)
        for x, label in enumerate(labels):
            ax.plot([x] * len(groups[label]), groups[label], "o", alpha=0.7)
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_title(name, fontsize=9)
        data[name] = groups
    for row in axes:
        row[0].set_ylabel(f"best {scored[0].metric}")
    return _save(fig, directory, "slices.png"), data


def _label(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def ensemble_figures(summary: dict, directory: Path) -> list[str]:
    """Per-class IoU of the ensemble and each member; the ensemble's val confusion matrix."""
    names = list(summary["per_class_iou"])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.5))
    width = 0.8 / (len(summary["members"]) + 1)
    series = [("ensemble", summary["per_class_iou"])] + [(m["trial_id"], m["per_class_iou"]) for m in summary["members"]]
    for k, (label, ious) in enumerate(series):
        ax.bar(np.arange(len(names)) + k * width, [ious[n] if ious[n] is not None else 0 for n in names], width,
               label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, fontsize=8)
    ax.set(ylabel="val IoU", title="Per-class IoU: ensemble and members")
    ax.legend(fontsize=7)
    figures = [_save(fig, directory, "ensemble_classes.png")]
    if summary.get("confusion"):
        conf = np.asarray(summary["confusion"], dtype=float)
        share = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(0.5 * len(names) + 2, 0.5 * len(names) + 1.5))
        image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title="Ensemble val confusion (row share)")
        fig.colorbar(image, ax=ax, fraction=0.046)
        figures.append(_save(fig, directory, "confusion.png"))
    return figures


def unknown_figure(trials: list[TrialRecord], summary: dict | None, directory: Path) -> tuple[str | None, dict]:
    """Left: each trial's shares of UNKNOWN and of known val pixels flagged as UNKNOWN, by treatment.
    Right: the open-set curves (share of UNKNOWN rejected against share of known rejected, one point
    per threshold) of the best open-set trials and of the ensemble, their chosen thresholds marked."""
    from models.checkpoint import read_meta

    metas = {t.trial_id: read_meta(t.checkpoint) for t in trials if t.checkpoint}
    flagged = {tid: m["metrics"] for tid, m in metas.items() if "val_unknown_rejected" in m["metrics"]}
    if not flagged:
        return None, {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    data = {"trials": {}, "curves": {}}
    by_treatment: dict[str, list] = {}
    for t in trials:
        if t.trial_id in flagged:
            metrics = flagged[t.trial_id]
            point = (metrics["val_known_rejected"], metrics["val_unknown_rejected"], metrics["val_miou"])
            by_treatment.setdefault(t.config.get("unknown", "keep"), []).append(point)
            data["trials"][t.trial_id] = dict(zip(("known_flagged", "unknown_flagged", "val_miou"), point))
    for treatment, points in sorted(by_treatment.items()):
        left.scatter([p[0] for p in points], [p[1] for p in points], alpha=0.8,
                     label=f"{treatment} (best val mIoU {max(p[2] for p in points):.3f})")
    left.set(xlabel="known val pixels flagged UNKNOWN", ylabel="UNKNOWN val pixels flagged UNKNOWN",
             title="UNKNOWN by treatment (best checkpoint of each trial)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    left.legend(fontsize=8)
    curves = [(tid, m["open_set"]) for tid, m in metas.items() if m.get("open_set", {}).get("curve")]
    curves = sorted(curves, key=lambda c: -metas[c[0]]["metrics"]["val_miou"])[:4]
    if summary and summary.get("open_set"):
        curves.append(("ensemble", summary["open_set"]))
    for name, rule in curves:
        points = rule["curve"]
        chosen = min(points, key=lambda p: abs(p["threshold"] - rule["threshold"]))
        line, = right.plot([p["known_rejected"] for p in points], [p["unknown_rejected"] for p in points],
                           label=f"{name} (t={rule['threshold']:.3g})")
        right.plot(chosen["known_rejected"], chosen["unknown_rejected"], "o", color=line.get_color())
        data["curves"][name] = {"threshold": rule["threshold"], "chosen": chosen}
    right.set(xlabel="known val pixels rejected", ylabel="UNKNOWN val pixels rejected",
              title="Open-set curves (dot: threshold of the best val mIoU)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    if curves:
        right.legend(fontsize=7)
    else:
        right.set_visible(False)
    return _save(fig, directory, "unknown.png"), data


def ensemble_val_labels(summary: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(val images uint8 [N, S, S, 3], val labels [N, S, S], ensemble predictions [N, S, S]) at the
    submission size, from the members' cached val probabilities and the ensemble's weights."""
    import torch

    from data_pipeline.trial_data import DataSpec
    from models.class_filter import ClassFilter
    from models.ensemble import combine_in_chunks, has_weight
    from search.ensemble_job import load_val_cache

    used = [m for m in summary["members"] if has_weight(_weight_values(m["weight"]))]
    val = DataSpec.from_config(used[0]["config"], summary["data_root"]).val_split(summary["size"])
    terms = [(_weight_values(m["weight"]), load_val_cache(Path(m["val_cache"]))) for m in used]
    rejection, rules = summary.get("open_set"), (summary.get("class_filter") or {}).get("rules")
    class_filter = ClassFilter.from_dict(rules, summary["per_class_iou"]) if rules else None
    reject = (rejection["threshold"], rejection["reject_label"]) if rejection else None
    predictions = [labels.to(torch.uint8).numpy() for labels, _ in combine_in_chunks(terms, reject, class_filter)]
    return np.array(val.images), np.array(val.masks), np.concatenate(predictions)  # copies: the cache is read-only


def _weight_values(weight):
    return list(weight.values()) if isinstance(weight, dict) else weight


def worst_images(summary: dict, directory: Path, count: int = 6) -> tuple[str | None, list[dict]]:
    """The val images where the ensemble's mIoU is lowest: image, truth, prediction and error map,
    with the class confusions that cost most pixels there."""
    import torch

    from labels import IGNORE
    from models.metrics import image_mious

    names = list(summary["per_class_iou"])
    images, truth, predicted = ensemble_val_labels(summary)
    scores = image_mious(torch.from_numpy(truth), torch.from_numpy(predicted), len(names)).numpy()
    order = [int(i) for i in np.argsort(np.nan_to_num(scores, nan=np.inf))[:count]]
    colours = plt.get_cmap("tab20", max(len(names), 2))
    fig, axes = plt.subplots(len(order), 4, figsize=(10, 2.8 * len(order)), squeeze=False)
    worst = []
    for row, i in zip(axes, order):
        valid = truth[i] != IGNORE
        wrong = valid & (truth[i] != predicted[i])
        confusions = _top_confusions(truth[i][wrong], predicted[i][wrong], names, valid.sum())
        worst.append({"index": i, "miou": float(scores[i]), "confusions": confusions})
        shown = [images[i], np.ma.masked_where(~valid, truth[i]), predicted[i], wrong]
        titles = [f"val #{i}: mIoU {scores[i]:.3f}", "ground truth", "ensemble", "wrong pixels:\n" + "\n".join(confusions[:2])]
        for ax, picture, title in zip(row, shown, titles):
            if picture is shown[3]:
                ax.imshow(picture, cmap="Reds", vmin=0, vmax=1)
            elif picture is shown[0]:
                ax.imshow(picture)
            else:
                ax.imshow(picture, cmap=colours, vmin=0, vmax=colours.N - 1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return _save(fig, directory, "worst_images.png"), worst


def _top_confusions(truth: np.ndarray, predicted: np.ndarray, names: list[str], valid: int) -> list[str]:
    """'true → predicted share' for the confusions covering the most pixels of an image."""
    pairs, counts = np.unique(truth.astype(np.int64) * len(names) + predicted, return_counts=True)
    top = np.argsort(counts)[::-1][:3]
    return [f"{names[pairs[k] // len(names)]} → {names[pairs[k] % len(names)]} {counts[k] / max(valid, 1):.0%}"
            for k in top]


def write_report(experiment: str | Path, ensemble_summary: Path | None = None) -> Path:
    """Renders the report; returns the path of report.html. ensemble_summary: an ensemble.json
    (default: EXPERIMENT/ensemble/ensemble.json, where ensemble_select.py writes it without --out)."""
    experiment = Path(experiment)
    if not is_experiment(experiment):
        raise UserError(f"{experiment} is not a Ray Tune experiment folder (no experiment_state-*.json)")
    trials = read_trials(experiment)
    if not trials:
        raise UserError(f"{experiment} has no trials yet")
    directory = experiment / REPORT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    runs = histories(experiment)
    curves, curve_data = learning_curves(trials, runs, directory)
    progress, progress_data = best_over_time(trials, runs, directory)
    scores = importances(trials)
    sliced, slice_data = slices(trials, directory)
    summary_path = ensemble_summary or experiment / "ensemble" / "ensemble.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    ensemble = ensemble_figures(summary, directory) if summary else []
    has_cache = summary and all(Path(m.get("val_cache", "")).is_file() for m in summary["members"])
    worst_figure, worst = worst_images(summary, directory) if has_cache else (None, [])
    unknown, unknown_data = unknown_figure(trials, summary, directory)
    sections = [
        ("Trials", _table(leaderboard_rows(trials))),
        ("Learning curves", _images([curves, progress])),
        ("What mattered", _images([importance_figure(scores, directory), sliced])
         or "<p>Too few trials or nothing varied: no importances.</p>"),
        ("Ensemble", _ensemble_text(summary) + _images(ensemble) if summary
         else "<p>No ensemble yet: run ensemble_select.py.</p>"),
        *([("UNKNOWN", "<p>How each trial treats the UNKNOWN class: the shares of UNKNOWN and of known val "
            "pixels it labels UNKNOWN, and for open-set models every rejection threshold.</p>" + _images([unknown]))]
          if unknown else []),
        ("Where the ensemble is most wrong", "<p>The val images with the lowest ensemble mIoU: image, ground "
         "truth, prediction, wrong pixels, and the confusions that cost most there.</p>" + _images([worst_figure])
         if worst_figure else "<p>Needs an ensemble whose members' val probabilities are cached (run "
         "ensemble_select.py).</p>"),
    ]
    data = {"trials": [t.trial_id for t in trials], "metric": trials[0].metric, "curves": curve_data,
            "progress": progress_data, "importances": scores, "slices": slice_data,
            "ensemble": bool(summary), "worst_images": worst, "unknown": unknown_data}
    write_atomically(directory / "report.json", json.dumps(data, indent=2, default=str))
    path = directory / "report.html"
    write_atomically(path, _page(experiment.name, sections))
    return path


def _images(names) -> str:
    return "".join(f'<img src="{html.escape(n)}" alt="{html.escape(n)}">' for n in names if n)


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>No trials.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _ensemble_text(summary: dict) -> str:
    weights = ", ".join(f"{m['trial_id']} ({_weight(m['weight'])})" for m in summary["members"]
                        if _weight(m["weight"]) != "0")
    return (f"<p>Backbone {html.escape(str(summary['backbone']))}: val mIoU {summary['val_miou']:.4f} "
            f"(best single {max(m['val_miou'] for m in summary['members']):.4f}); members {html.escape(weights)}; "
            f"{summary.get('ms_per_image', 0):.1f} ms per image.</p>")


def _weight(weight) -> str:
    if isinstance(weight, dict):
        return "per class" if any(weight.values()) else "0"
    return f"{weight:.2f}" if weight else "0"


def _page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(name)}</h2>{content}" for name, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px}img{max-width:100%;margin:.5em 0;display:block}"
            "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
            f"</style></head><body><h1>Search report: {html.escape(title)}</h1>{body}</body></html>")


def report_after_run(experiment: Path, ensemble_summary: Path | None = None) -> None:
    """For the CLIs: a run's results are already written, so a report that fails is a warning."""
    try:
        print(f"Report: {write_report(experiment, ensemble_summary)}", flush=True)
    except Exception as exc:  # noqa: BLE001 -- never lose a finished search to a figure
        print(f"warning: the report could not be written ({exc!r}); "
              f"python -m search.report {experiment} tries again", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--ensemble", type=Path, default=None,
                        help="an ensemble.json written elsewhere with ensemble_select.py --out")
    args = parser.parse_args(argv)
    if args.ensemble and not args.ensemble.is_file():
        raise UserError(f"--ensemble {args.ensemble} does not exist")
    print(f"Report: {write_report(args.experiment, args.ensemble)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
