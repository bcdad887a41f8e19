"""What the console shows while a search runs: a row per trial as it ends (its searched parameters,
epochs, best score, status) and a status line a minute, as a Ray Tune callback. Tune's own output,
Ray's and wandb's go to the experiment's driver.log (driver_log.output_to_log)."""
from __future__ import annotations

import math
import time

from ray.tune import Callback

from .experiment import trial_status

STATUS_EVERY_S = 60.0


def format_value(value) -> str:
    """A parameter value for a table cell: floats to 4 significant digits (the CSV keeps them exact)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


class ProgressTable(Callback):
    """Prints through console (a driver_log.Console) a header, then one row per ended trial."""

    def __init__(self, console, params: list[str], metric: str, total: int):
        self.console, self.params, self.metric, self.total = console, params, metric, total
        self.columns = ["trial", *params, "epochs", f"best_{metric}", "status", "time_s"]
        self.widths = [max(len(c), 10) for c in self.columns]
        self.best: dict[str, float] = {}
        self.ended: set[str] = set()
        self.started_at = self.last_status = time.monotonic()
        self._print("  ".join(c.ljust(w) for c, w in zip(self.columns, self.widths)))

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the experiment; the console (open streams) stays behind, and
        a restored table prints nothing."""
        return {**self.__dict__, "console": None}

    def _print(self, line: str) -> None:
        if self.console is not None:
            self.console.print(line)

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

