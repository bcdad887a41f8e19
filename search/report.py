"""report.html for an experiment: what the search tried, what mattered, what the ensemble does.

    python -m search.report EXPERIMENT      # also written at the end of launch.py and ensemble_select.py

Writes EXPERIMENT/report/report.html with PNG figures beside it (search.figures, offline) and
report.json, the numbers behind every figure (search.artifacts):
- learning curves: the ranking metric per epoch of every trial, trials stopped early by ASHA marked;
  and the best value so far against wall time;
- what mattered: Optuna's parameter importances over the trials (a study rebuilt from their
  configs and best values), and the best value of each trial sliced by decoder, backbone, loss,
  focal gamma, augmentation, resize and crop;
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
from pathlib import Path

from atomic_file import write_atomically
from errors import UserError, exit_cli

from . import artifacts, figures
from .experiment import is_experiment, leaderboard_rows, read_trials, varying_columns

REPORT_DIR = "report"


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
    summary = artifacts.read_summary(ensemble_summary or experiment / "ensemble" / "ensemble.json")
    data = _report_data(experiment, trials, summary)
    rows = leaderboard_rows(trials, experiment)
    extra = f" (and external training data {html.escape(rows[0]['extra_data'])})" if rows and rows[0]["extra_data"] else ""
    where = (f"<p>Space {html.escape(rows[0]['space'])}, data {html.escape(rows[0]['dataset'])}{extra}, started "
             f"{html.escape(rows[0]['started'])}; every column in leaderboard.csv.</p>" if rows and rows[0]["space"] else "")
    sections = [("Trials", where + _table(rows, varying_columns(rows))), *_sections(data, summary, directory)]
    numbers = {**{k: v for k, v in data.items() if k != "worst_arrays"},
               "unknown": {k: data["unknown"][k] for k in ("trials", "curves")} if data["unknown"] else {}}
    write_atomically(directory / "report.json", json.dumps(numbers, indent=2, default=str))
    path = directory / "report.html"
    write_atomically(path, _page(experiment.name, sections))
    return path


def _report_data(experiment: Path, trials, summary: dict | None) -> dict:
    """The numbers behind every figure (report.json, less the worst images' arrays)."""
    runs = artifacts.histories(experiment)
    has_cache = summary and all(Path(m.get("val_cache", "")).is_file() for m in summary["members"])
    worst = artifacts.worst_images(summary) if has_cache else None
    return {"trials": [t.trial_id for t in trials], "metric": trials[0].metric,
            "curves": artifacts.curves(trials, runs), "progress": artifacts.progress(trials, runs),
            "importances": artifacts.importances(trials), "slices": artifacts.slice_groups(trials),
            "labels": artifacts.trial_labels(trials), "scored_trials": sum(1 for t in trials if not math.isnan(t.best)),
            "ensemble": bool(summary), "worst_images": worst["worst"] if worst else [], "worst_arrays": worst,
            "unknown": artifacts.unknown_data(trials, summary) or {}}


def _sections(data: dict, summary: dict | None, directory: Path) -> list[tuple[str, str]]:
    """The page's sections after the trials table: (title, HTML with its figures)."""
    metric = data["metric"]
    curves = [figures.learning_curves(data["curves"], metric, data["labels"], directory),
              figures.progress(data["progress"], metric, directory)]
    trials, few = data["scored_trials"], artifacts.IMPORTANCE_TRIALS
    mattered = [figures.importances(data["importances"], trials, few, directory),
                figures.slices(data["slices"], metric, directory)]
    caveat = (f"<p>Importances from {trials} trials are a rough ranking: Optuna's evaluator needs many more trials "
              f"than parameters ({few} or more here) before its order means much; read them with the slices.</p>"
              if data["importances"] and trials < few else "")
    sections = [
        ("Learning curves", _images(curves)),
        ("What mattered", caveat + _images(mattered) or "<p>Too few trials or nothing varied: no importances.</p>"),
        ("Ensemble", _ensemble_text(summary) + _images(figures.ensemble(summary, directory)) if summary
         else "<p>No ensemble yet: run ensemble_select.py.</p>"),
    ]
    if data["unknown"]:
        sections.append(("UNKNOWN", "<p>How each trial treats the UNKNOWN class: the shares of UNKNOWN and of known "
                         "val pixels it labels UNKNOWN, and for open-set models every rejection threshold.</p>"
                         + _images([figures.unknown(data["unknown"], directory)])))
    worst = data["worst_arrays"]
    sections.append(("Where the ensemble is most wrong", "<p>The val images with the lowest ensemble mIoU: image, "
                     "ground truth, prediction, wrong pixels, and the confusions that cost most there.</p>"
                     + _images([figures.worst_images(worst, directory)]) if worst else
                     "<p>Needs an ensemble whose members' val probabilities are cached (run ensemble_select.py).</p>"))
    return sections


def _images(names) -> str:
    return "".join(f'<img src="{html.escape(n)}" alt="{html.escape(n)}">' for n in names if n)


def _table(rows: list[dict], columns: list[str]) -> str:
    if not rows:
        return "<p>No trials.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _ensemble_text(summary: dict) -> str:
    weights = ", ".join(f"{m['trial_id']} ({_weight(m['weight'])})" for m in summary["members"]
                        if _weight(m["weight"]) != "0")
    return (f"<p>Backbone {html.escape(str(summary['backbone']))}: val mIoU {summary['val_miou']:.4f} "
            f"(best single {max(m['val_miou'] for m in summary['members']):.4f}); members {html.escape(weights)}; "
            f"{summary.get('ms_per_image', 0):.1f} ms per image."
            + (f" Selection started from the {html.escape(selection['start'])}; it stopped because "
               f"{html.escape(selection['stopped'])}." if (selection := summary.get("selection")) else "") + "</p>")


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


def report_after_run(experiment: Path, ensemble_summary: Path | None = None) -> str:
    """For the CLIs, whose results are written already: the line to print, 'Report: PATH', or a
    warning when the report cannot be drawn (a figure never loses a finished search)."""
    try:
        return f"Report: {write_report(experiment, ensemble_summary)}"
    except Exception as exc:  # noqa: BLE001 -- never lose a finished search to a figure
        return (f"warning: the report could not be written ({exc!r}); "
                f"python -m search.report {experiment} tries again")


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
    exit_cli(main)
