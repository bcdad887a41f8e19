"""Ray Tune wiring: start (or join) Ray, then run Optuna TPE + ASHA over a validated SearchSpec."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from data_pipeline.trial_data import DataSpec

from .space import SearchSpec, SpaceSampler
from .trainable import train_segmentation

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_HOST, DASHBOARD_PORT = "127.0.0.1", 8265


def start_ray(gpus: float, cpus: int | None = None) -> str | None:
    """Starts a local Ray instance (dashboard on 127.0.0.1 only); returns the dashboard URL.

    Workers inherit this environment at start, so the project's import path and wandb's offline
    mode are set before ray.init.
    """
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    context = ray.init(num_cpus=cpus or os.cpu_count(), num_gpus=gpus, include_dashboard=True,
                       dashboard_host=DASHBOARD_HOST, dashboard_port=_free_port(DASHBOARD_HOST, DASHBOARD_PORT),
                       configure_logging=True, logging_level="WARNING", log_to_driver=True)
    return getattr(context, "dashboard_url", None)


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


def data_spec(spec: SearchSpec, data_root: Path, skip=()) -> DataSpec:
    d = spec.data
    return DataSpec(str(data_root), d.train, d.val, d.test, d.split, d.train_all, d.folds, split_seed=d.split_seed,
                    class_map=spec.class_map.to_dict() if spec.class_map else None, skip=tuple(sorted(skip)))


def trial_constants(spec: SearchSpec, data_root: Path, skip=()) -> dict:
    """Settings every trial needs that are not searched: its data, how long to train."""
    data = data_spec(spec, data_root, skip).to_config()
    del data["fold"]  # a trial parameter (searchable), not a constant
    e = spec.experiment
    return {**data, "max_epochs": e.max_epochs, "seed": e.seed, "metric": e.metric, "mode": e.mode}


def run_search(spec: SearchSpec, data_root: Path, *, storage: Path, name: str, gpus: float,
               num_samples: int | None = None, skip=()) -> Path:
    """Runs the search to completion in the running Ray instance; returns the experiment folder."""
    e = spec.experiment
    gpus_per_trial = e.gpus_per_trial if gpus > 0 else 0
    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / e.cpus_per_trial
    if gpus_per_trial:
        slots = min(slots, resources.get("GPU", 0) / gpus_per_trial)
    searcher = OptunaSearch(space=SpaceSampler(spec.params, trial_constants(spec, data_root, skip)),
                            metric=e.metric, mode=e.mode, seed=e.seed)
    tuner = tune.Tuner(
        tune.with_resources(train_segmentation, {"cpu": e.cpus_per_trial, "gpu": gpus_per_trial}),
        tune_config=tune.TuneConfig(
            metric=e.metric, mode=e.mode, num_samples=num_samples or e.num_samples, reuse_actors=True,
            trial_dirname_creator=trial_dirname,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=max(1, math.floor(slots))),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=e.max_epochs,
                                    grace_period=e.grace_period, reduction_factor=e.reduction_factor),
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), verbose=1,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=e.metric,
                                                    checkpoint_score_order=e.mode),
        ),
    )
    tuner.fit()
    return storage / name
