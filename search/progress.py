"""What the console shows while a search runs: a row per trial as it ends (its searched parameters,
epochs, best score, status) and a status line a minute, as a Ray Tune callback. Tune's own output,
Ray's and wandb's go to the experiment's driver.log (driver_log.output_to_log)."""
from __future__ import annotations

import math
import time

from ray.tune import Callback

from driver_log import active_console

from .experiment import trial_status

STATUS_EVERY_S = 60.0


def format_value(value) -> str:
    """A parameter value for a table cell: floats to 4 significant digits (the CSV keeps them exact)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


class ProgressTable(Callback):
    """Prints on the active console (driver_log.active_console; nothing without one) a header, then one
    row per ended trial. Tune pickles its callbacks with the experiment: a resumed search prints the
    rows of the trials that end in it, under a header of its own."""

    def __init__(self, params: list[str], metric: str, total: int):
        self.params, self.metric, self.total = params, metric, total
        self.columns = ["trial", *params, "epochs", f"best_{metric}", "status", "time_s"]
        self.widths = [max(len(c), 10) for c in self.columns]
        self.best: dict[str, float] = {}
        self.ended: set[str] = set()
        self.header_shown = False
        self.started_at = self.last_status = time.monotonic()
        self._print()  # the header, as the search starts

    def __setstate__(self, state: dict) -> None:
        """A restored table starts its clock, and shows its header, with the resumed search."""
        self.__dict__.update(state, header_shown=False)
        self.started_at = self.last_status = time.monotonic()

    def _print(self, line: str | None = None) -> None:
        console = active_console()
        if console is None:
            return
        if not self.header_shown:
            console.print("  ".join(c.ljust(w) for c, w in zip(self.columns, self.widths)))
            self.header_shown = True
        if line is not None:
            console.print(line)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(f"best_{self.metric}")
        if value is not None:
            self.best[trial.trial_id] = float(value)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._row(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial, "ERROR")

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last_status < STATUS_EVERY_S:
            return
        self.last_status = now
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = max(self.best.items(), key=lambda kv: kv[1], default=None)
        leader = f"; best {self.metric} {best[1]:.4f} (trial {best[0]})" if best else ""
        self._print(f"[{(now - self.started_at) / 60:4.1f} min] {len(self.ended)} of {self.total} trials "
                           f"ended, {running} running{leader}")

    def _row(self, trial, tune_status: str) -> None:
        """tune_status: the status the trial is about to get (callbacks run before Tune sets it)."""
        if trial.trial_id in self.ended:
            return
        self.ended.add(trial.trial_id)
        result = trial.last_result or {}
        status = trial_status(tune_status, result, int(trial.config.get("max_epochs", 0)))
        best = self.best.get(trial.trial_id, math.nan)
        cells = [trial.trial_id, *(format_value(trial.config.get(p)) for p in self.params),
                 str(result.get("training_iteration", 0)), "" if math.isnan(best) else f"{best:.4f}", status,
                 f"{result.get('time_total_s', 0.0):.0f}"]
        self._print("  ".join(c.ljust(w) for c, w in zip(cells, self.widths)))

