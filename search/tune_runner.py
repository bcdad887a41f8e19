"""Ray Tune wiring: start (or join) Ray, then run Optuna TPE (study kept in optuna.db) with ASHA or FIFO over a
validated SearchSpec, no trial started that a time budget leaves no room for (BudgetLimiter)."""
from __future__ import annotations

import logging
import math
import os
import socket
import statistics
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from driver_log import active_console
from errors import UserError

from .progress import ProgressTable
from .space import SearchSpec, SpaceSampler, eval_size
from .trainable import DEADLINE_ENV, DEADLINE_MARGIN, search_deadline, train_segmentation

DASHBOARD_HOST, DASHBOARD_PORT = "127.0.0.1", 8265
OPTUNA_FILE = "optuna.db"
log = logging.getLogger(__name__)


def start_ray(gpus: float, cpus: int | None = None, *, dashboard_host: str = DASHBOARD_HOST,
              address: str | None = None) -> str | None:
    """Starts a local Ray instance (dashboard on dashboard_host, 127.0.0.1 unless asked otherwise), or
    joins the cluster at address (auto, HOST:PORT or ray://...); returns the dashboard URL.

    Workers import the project as the installed package it is (`pip install -e .`; on a cluster, on
    every node) and inherit this environment at start, so wandb's mode and a time budget's deadline are
    set before ray.init (and passed as the job's runtime environment when joining a cluster).
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        _check_address(address)
        env = {k: os.environ[k] for k in ("WANDB_MODE", "WANDB_API_KEY", DEADLINE_ENV) if k in os.environ}
        try:
            context = ray.init(address=address, runtime_env={"env_vars": env}, configure_logging=True,
                               logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"--address {address}: cannot join the Ray cluster: {exc}") from None
        available = ray.cluster_resources().get("GPU", 0)
        if gpus > available:
            ray.shutdown()
            raise UserError(f"--gpus {gpus:g} asks for more GPUs than the cluster at {address} has ({available:g})")
        return getattr(context, "dashboard_url", None)
    # Ray starts its workers at niceness 15; a trial is then preempted by every wake-up of the driver
    # or Ray's daemons, and its other OpenMP threads wait at the next barrier, which made epochs inside
    # Tune slower than the same epochs in a plain process (bench/search_overhead.py).
    context = ray.init(num_cpus=cpus or os.cpu_count(), num_gpus=gpus, include_dashboard=True,
                       dashboard_host=dashboard_host, dashboard_port=_free_port(dashboard_host, DASHBOARD_PORT),
                       configure_logging=True, logging_level="WARNING", log_to_driver=True,
                       _system_config={"worker_niceness": 0})
    _make_private(auth_token_path())
    return getattr(context, "dashboard_url", None)


def auth_token_path() -> Path:
    """Where Ray keeps the token its dashboard and job API ask for (Ray 2.60 creates one on first start)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def _make_private(path: Path) -> None:
    """Ray writes its token with the default umask (often readable by every user of the machine); the
    token is what keeps the dashboard's code execution to its owner, so only the owner may read it."""
    if path.is_file() and path.stat().st_mode & 0o077:
        path.chmod(0o600)


def _check_address(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) with nothing behind it is an error now: ray.init would retry
    for minutes."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"--address {address}: nothing answers there ({exc.strerror or exc})") from None


def _free_port(host: str, preferred: int) -> int:
    """preferred if nothing listens there (another search may hold it), else a free port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError(f"no free port on {host}")


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default repeats the whole config in the name)."""
    return f"{trial.trainable_name}_{trial.trial_id}"


def trial_constants(spec: SearchSpec, data_root: Path, skip=()) -> dict:
    """Settings every trial needs that are not searched: its data (where it lives now, the images left
    out), how long to train, how it is scored."""
    data = replace(spec.data, root=str(data_root), skip=tuple(sorted(skip))).constants()
    e = spec.experiment
    return {**data, "max_epochs": e.max_epochs, "seed": e.seed, "metric": e.metric, "mode": e.mode,
            "checkpoint": e.checkpoint, "checkpoint_interval_s": e.checkpoint_interval_s, "rungs": list(e.rungs),
            "eval_size": eval_size(spec)}


def concurrency(e, cpus: float, gpus: float) -> int:
    """Trials that run at once with cpus and gpus in all (e: the space's ExperimentSettings)."""
    slots = cpus / e.cpus_per_trial
    if gpus > 0 and e.gpus_per_trial:
        slots = min(slots, gpus / e.gpus_per_trial)
    return max(1, math.floor(slots))


def trial_resources(e, gpus: float) -> dict:
    return {"cpu": e.cpus_per_trial, "gpu": e.gpus_per_trial if gpus > 0 else 0}


def scheduler(e):
    """ASHA stops weak trials at its rungs (grace_period * reduction_factor**k epochs); FIFO lets every
    trial train max_epochs."""
    if e.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=e.max_epochs, grace_period=e.grace_period,
                         reduction_factor=e.reduction_factor)


def wandb_callbacks(experiment: Path, enabled: bool) -> list:
    """One wandb run per trial (config and every epoch's metrics), written under the experiment folder.
    Offline or online as WANDB_MODE says (set before Ray starts)."""
    if not enabled:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    experiment.mkdir(parents=True, exist_ok=True)
    return [WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "segsearch"), group=experiment.name,
                                dir=str(experiment))]


def optuna_storage(experiment: Path):
    """The study in EXPERIMENT/optuna.db (SQLite): optuna-dashboard opens it, optuna.load_study reads it,
    and a resumed search goes on writing to it."""
    import optuna

    experiment.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{experiment / OPTUNA_FILE}")


def run_search(spec: SearchSpec, data_root: Path, *, storage: Path, name: str, gpus: float,
               num_samples: int | None = None, skip=(), wandb: bool = False, time_budget_s: float | None = None) -> Path:
    """Runs the search in the running Ray instance, to completion or until time_budget_s seconds have
    passed (Tune then stops the running trials; their checkpoints stay); returns the experiment folder.
    Inside driver_log.output_to_log, a row per ended trial and a status line a minute go to its console."""
    e = spec.experiment
    resources = ray.cluster_resources()
    max_concurrent = concurrency(e, resources.get("CPU", 1), resources.get("GPU", 0) if gpus > 0 else 0)
    sampler = SpaceSampler(spec.params, trial_constants(spec, data_root, skip), e.seed_per_trial)
    searcher = OptunaSearch(space=sampler, metric=e.metric, mode=e.mode, seed=e.seed,
                            points_to_evaluate=list(spec.first_trials) or None,
                            study_name=name, storage=optuna_storage(storage / name))
    tuner = tune.Tuner(
        tune.with_resources(train_segmentation, trial_resources(e, gpus)),
        tune_config=tune.TuneConfig(
            metric=e.metric, mode=e.mode, num_samples=num_samples or e.num_samples, reuse_actors=True,
            trial_dirname_creator=trial_dirname,
            search_alg=BudgetLimiter(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent), e.useful_epochs),
            scheduler=scheduler(e), time_budget_s=time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), verbose=1,
            failure_config=tune.FailureConfig(max_failures=e.max_failures),
            checkpoint_config=_checkpoint_config(e),
            callbacks=[*wandb_callbacks(storage / name, wandb), _progress(spec, num_samples or e.num_samples)],
        ),
    )
    tuner.fit()
    return storage / name


class BudgetLimiter(Searcher):
    """Starts no trial that cannot train min_epochs epochs before the search's deadline (a time budget,
    search.trainable.search_deadline): one begun in the budget's last minutes would be cut after an
    epoch or two, a useless candidate, and would take CPU from the trials still running. A trial's
    cost is estimated from the trials so far (median set-up time, median epoch time after each one's
    first epoch); before any epoch has ended every trial may start. When none fits, the searcher is
    finished: the running trials go on to the deadline and the search ends with them, which is said
    once on the active console (driver_log.active_console) and in the log."""

    def __init__(self, searcher: Searcher, min_epochs: int):
        self.searcher, self.min_epochs = searcher, min_epochs
        self.stopped = False
        self.epoch_times: dict[str, list[float]] = {}
        self.setup_times: dict[str, float] = {}
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str):
        needed = self.seconds_needed()
        deadline = search_deadline()
        if needed is not None and deadline is not None and time.time() + needed > deadline:
            if not self.stopped:
                self.stopped = True
                self._say(f"time budget: {deadline - time.time():.0f} s left, a new trial needs about {needed:.0f} s "
                          f"for {self.min_epochs} epoch(s); no more trials start, the running ones end by the deadline")
            return Searcher.FINISHED
        return self.searcher.suggest(trial_id)

    @staticmethod
    def _say(message: str) -> None:
        console = active_console()
        if console is not None:
            console.print(message)
        else:
            log.warning(message)

    def seconds_needed(self) -> float | None:
        """What a new trial's set-up and min_epochs epochs take at the pace seen so far (with the trials'
        own margin), or None before any trial has finished an epoch."""
        paces = [t for times in self.epoch_times.values() for t in (times[1:] or times)]
        if not paces:
            return None
        setup = statistics.median(self.setup_times.values()) if self.setup_times else 0.0
        return setup + DEADLINE_MARGIN * self.min_epochs * statistics.median(paces)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if "epoch_time_s" in result:
            self.epoch_times.setdefault(trial_id, []).append(float(result["epoch_time_s"]))
            self.setup_times[trial_id] = float(result.get("setup_time_s", 0.0))
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args, **kwargs):
        return self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict:
        return {"min_epochs": self.min_epochs, "epoch_times": self.epoch_times, "setup_times": self.setup_times}

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(trial_id)


def _progress(spec: SearchSpec, total: int) -> ProgressTable:
    searched = [p.name for p in spec.params if p.kind != "fixed"]
    return ProgressTable(searched, spec.experiment.metric, total)


def _checkpoint_config(e) -> tune.CheckpointConfig:
    """One checkpoint per trial: the best by the ranking metric, or the latest (checkpoint: last).
    A trial may hand over its best checkpoint epochs after it was made (search.trainable._write_now),
    with a later epoch's metrics: it is ranked by best_<metric>, which is that checkpoint's score."""
    if e.checkpoint == "last":
        return tune.CheckpointConfig(num_to_keep=1)
    return tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=f"best_{e.metric}",
                                 checkpoint_score_order=e.mode)


def resume_search(experiment: Path, resources: dict) -> Path:
    """Continues an interrupted experiment: finished trials are kept, unfinished ones go on from their
    last checkpoint, errored ones stay errored, the Optuna searcher and num_samples come from its state."""
    if not tune.Tuner.can_restore(str(experiment)):
        raise UserError(f"{experiment} has no Ray Tune state to resume from")
    tuner = tune.Tuner.restore(str(experiment), tune.with_resources(train_segmentation, resources),
                               resume_unfinished=True, restart_errored=False)
    tuner.fit()
    return experiment
