"""Search-space YAML: parsing, validation (before Ray starts) and the define-by-run sampler for Optuna.

A space file has three sections:

    experiment: {num_samples, max_epochs, scheduler (asha | fifo), grace_period, reduction_factor, seed,
                 cpus_per_trial, gpus_per_trial, max_failures, metric, mode}
    data:       train, val, test: annotation files relative to the data root
                split: given (train/val files) | kfold (fold `fold` of `folds` over train_all, split_seed)
                class_map: a class-map YAML (relative to this file), unknown: keep | background | ignore
                  (what the label space makes of UNKNOWN; space.unknown is how each trial trains on it)
                pseudo_labels: [files] written by ensemble_select.py --pseudo-labels, added to training
    space:      one entry per trial parameter:
                  lr: 0.001                                   fixed value
                  decoder: {choice: [Unet, FPN]}              categorical
                  lr: {loguniform: [1.0e-4, 3.0e-3]}          float, log scale
                  focal_gamma: {uniform: [0.5, 3.0], when: {loss: focal}}   conditional
                  batch_size: {int: [4, 16]}                  integer, inclusive
"""
from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from data_pipeline.augment import POLICIES
from data_pipeline.classes import UNKNOWN_POLICIES, ClassMap, class_map_for
from data_pipeline.imbalance import CLASS_WEIGHT_MODES, SAMPLERS
from data_pipeline.trial_data import SPLITS
from errors import UserError
from models.factory import check_backbone, check_decoder, check_pair, check_weights
from models.losses import LOSS_PARAMS, LOSSES, parse_loss
from models.metrics import METRIC_MODES
from models.open_set import OPEN_SET_PARAMS
from models.optim import TRAINING_PARAMS
from yaml_file import load_yaml

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


def _positive(value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise UserError(f"expected a positive number, got {value!r}")


def _one_of(options) -> Callable[[Any], None]:
    def check(value) -> None:
        if value not in options:
            raise UserError(f"unknown value {value!r}; choose one of {sorted(options)}")
    return check


def _resize(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 32 or value % 32:
        raise UserError(f"resize must be an integer multiple of 32 (encoders downsample by 32), got {value!r}")


def _batch_size(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"batch_size must be a positive integer, got {value!r}")


def _fold(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"fold must be a non-negative integer, got {value!r}")


def _optional_weights(value) -> None:
    if value is not None and not isinstance(value, str):
        raise UserError(f"encoder_weights must be null or a name such as imagenet, got {value!r}")


# Trial parameters the trainable understands, each with the check of one value and its default.
TRIAL_PARAMS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "decoder": (check_decoder, "Unet"),
    "backbone": (check_backbone, "resnet18"),
    "encoder_weights": (_optional_weights, None),
    **LOSS_PARAMS,
    "augmentation": (_one_of(POLICIES), "flip"),
    "resize": (_resize, 128),
    "lr": (_positive, 1e-3),
    "weight_decay": (lambda v: None if v == 0 else _positive(v), 1e-4),
    "batch_size": (_batch_size, 8),
    "class_weights": (_one_of(CLASS_WEIGHT_MODES), "none"),
    "sampler": (_one_of(SAMPLERS), "uniform"),
    "fold": (_fold, 0),  # used with data.split: kfold
    **TRAINING_PARAMS,
    **OPEN_SET_PARAMS,
}


@dataclass(frozen=True)
class ExperimentSettings:
    metric: str = "val_miou"  # ranks trials, drives ASHA and TPE, picks each trial's checkpoint
    mode: str = ""  # max or min; "" = the metric's own direction
    num_samples: int = 8
    max_epochs: int = 4
    scheduler: str = "asha"  # asha: stop weak trials at the rungs; fifo: every trial trains max_epochs
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 1.0  # used only when GPUs are given to the search
    max_failures: int = 1  # retries of a trial that raises before it is recorded as errored


SCHEDULERS = ("asha", "fifo")


@dataclass(frozen=True)
class DataSettings:
    train: str = "train.json"
    val: str = "val.json"
    test: str = "test.json"
    split: str = "given"
    train_all: str = "train_all.json"
    folds: int = 5
    split_seed: int = 0
    class_map: str = ""  # path of a class-map YAML, relative to the space file; "" = none
    unknown: str = ""  # keep | background | ignore; "" = as the class map says, else keep
    pseudo_labels: tuple = ()  # pseudo-label files (ensemble_select.py --pseudo-labels) added to training


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "fixed" or one of DISTRIBUTIONS
    values: tuple  # fixed: (value,); choice: options; uniform/loguniform/int: (low, high)
    when: tuple[tuple[str, tuple], ...] = ()  # (other param, allowed values) pairs, all must hold

    def active(self, chosen: dict) -> bool:
        return all(_parts(name, chosen.get(name)) & set(allowed) for name, allowed in self.when)


def _parts(name: str, value) -> set:
    """What a `when` condition on parameter `name` matches: a composite loss such as `focal+dice`
    matches `when: {loss: focal}`; any other value only itself."""
    if name == "loss" and value is not None:
        return {value, *(term for term, _ in parse_loss(value))}
    return {value}


@dataclass(frozen=True)
class SearchSpec:
    source: str
    experiment: ExperimentSettings = field(default_factory=ExperimentSettings)
    data: DataSettings = field(default_factory=DataSettings)
    params: tuple[Param, ...] = ()
    class_map: ClassMap | None = None  # data.class_map and data.unknown, loaded; None = categories as they are


class SpaceSampler:
    """Define-by-run space for Ray Tune's OptunaSearch: suggests the searched parameters and returns
    the fixed ones (plus run settings) as constants. A module-level class so Tune can pickle it."""

    def __init__(self, params: tuple[Param, ...], constants: dict):
        self.params, self.constants = params, dict(constants)

    def __call__(self, trial) -> dict:
        chosen: dict[str, Any] = {}
        fixed = dict(self.constants)
        for p in self.params:
            if not p.active(chosen):
                continue
            if p.kind == "fixed":
                chosen[p.name] = fixed[p.name] = p.values[0]
            elif p.kind == "choice":
                chosen[p.name] = trial.suggest_categorical(p.name, list(p.values))
            elif p.kind == "uniform":
                chosen[p.name] = trial.suggest_float(p.name, *p.values)
            elif p.kind == "loguniform":
                chosen[p.name] = trial.suggest_float(p.name, *p.values, log=True)
            else:
                chosen[p.name] = trial.suggest_int(p.name, *p.values)
        return fixed


def load_space(path: str | Path) -> SearchSpec:
    """Reads and validates a space file; every problem is a UserError naming the file and key."""
    return load_yaml(path, "search space", lambda raw: _parse(raw, str(path)))


def _parse(raw, source: str) -> SearchSpec:
    if not isinstance(raw, dict):
        raise UserError("the file must be a mapping with 'experiment', 'data' and 'space' sections")
    _reject_unknown(raw, {"experiment", "data", "space"}, "")
    experiment = _parse_settings(raw.get("experiment") or {}, ExperimentSettings, "experiment")
    data = _parse_settings(raw.get("data") or {}, DataSettings, "data")
    _check_experiment(experiment)
    experiment = replace(experiment, mode=METRIC_MODES[experiment.metric])
    class_map = _check_data(data, Path(source).parent)
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise UserError("'space' must be a non-empty mapping of trial parameters")
    _reject_unknown(space, set(TRIAL_PARAMS), "space.")
    params: list[Param] = []
    for name, spec in space.items():
        params.append(_parse_param(name, spec, {p.name for p in params}))
    _check_folds(params, data)
    _check_models(params)
    _check_unknown_treatment(params, class_map)
    return SearchSpec(source, experiment, data, tuple(params), class_map)


def _reject_unknown(mapping: dict, known: set, prefix: str) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(sorted(known))}"
            raise UserError(f"unknown key {prefix}{key}{hint}")


def _parse_settings(raw, cls, section: str):
    if not isinstance(raw, dict):
        raise UserError(f"'{section}' must be a mapping")
    defaults = cls()
    _reject_unknown(raw, set(defaults.__dataclass_fields__), f"{section}.")
    values = {}
    for key, value in raw.items():
        expected = type(getattr(defaults, key))
        if value is None and expected is str:  # e.g. class_map: null
            value = getattr(defaults, key)
        if expected is tuple:  # a list of file names
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise UserError(f"{section}.{key}: expected a list of file names, got {value!r}")
            value = tuple(value)
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if isinstance(value, bool) or not ok:
            raise UserError(f"{section}.{key}: expected {expected.__name__}, got {value!r}")
        values[key] = value
    return cls(**values)


def _check_experiment(e: ExperimentSettings) -> None:
    for key in ("num_samples", "max_epochs", "grace_period", "cpus_per_trial"):
        if getattr(e, key) <= 0:
            raise UserError(f"experiment.{key} must be positive, got {getattr(e, key)!r}")
    if e.grace_period > e.max_epochs:
        raise UserError(f"experiment.grace_period ({e.grace_period}) exceeds max_epochs ({e.max_epochs})")
    if e.scheduler not in SCHEDULERS:
        raise UserError(f"experiment.scheduler must be one of {', '.join(SCHEDULERS)}, got {e.scheduler!r}")
    if e.reduction_factor < 2:
        raise UserError(f"experiment.reduction_factor must be at least 2, got {e.reduction_factor}")
    if e.metric not in METRIC_MODES:
        raise UserError(f"experiment.metric must be one of {', '.join(METRIC_MODES)}, got {e.metric!r}")
    if e.mode and e.mode != METRIC_MODES[e.metric]:
        raise UserError(f"experiment.mode: {e.metric} is {'maximised' if METRIC_MODES[e.metric] == 'max' else 'minimised'}"
                        f", so mode must be {METRIC_MODES[e.metric]} (or left out), got {e.mode!r}")
    if e.gpus_per_trial < 0:
        raise UserError(f"experiment.gpus_per_trial must be >= 0, got {e.gpus_per_trial}")
    if e.max_failures < 0:
        raise UserError(f"experiment.max_failures must be >= 0, got {e.max_failures}")


def _check_data(d: DataSettings, space_dir: Path) -> ClassMap | None:
    if d.split not in SPLITS:
        raise UserError(f"data.split must be one of {', '.join(SPLITS)}, got {d.split!r}")
    if d.folds < 2:
        raise UserError(f"data.folds must be at least 2, got {d.folds}")
    if d.unknown and d.unknown not in UNKNOWN_POLICIES:
        raise UserError(f"data.unknown must be one of {', '.join(UNKNOWN_POLICIES)}, got {d.unknown!r}")
    path = (space_dir / d.class_map) if d.class_map else None
    if path is not None and not path.is_file():
        raise UserError(f"data.class_map: {path} does not exist")
    return class_map_for(path, d.unknown or None)


def _check_folds(params: list[Param], d: DataSettings) -> None:
    fold = next((p for p in params if p.name == "fold"), None)
    if fold is None:
        return
    if d.split != "kfold":
        raise UserError("space.fold: folds exist only with data.split: kfold")
    if max(fold.values) >= d.folds:
        raise UserError(f"space.fold: folds are numbered 0..{d.folds - 1} (data.folds: {d.folds}), "
                        f"got {max(fold.values)}")


def _check_unknown_treatment(params: list[Param], class_map: ClassMap | None) -> None:
    """Trials can treat UNKNOWN pixels their own way only where the masks keep them as a class."""
    policy = class_map.unknown_policy if class_map else "keep"
    treatments = set(possible_values(params, "unknown")) - {"keep"}
    if treatments and policy != "keep":
        raise UserError(f"space.unknown: {sorted(treatments)[0]} needs the UNKNOWN pixels kept as a class, but the "
                        f"data settings make them {policy} (data.unknown or the class map's unknown.policy)")


def possible_values(params: list[Param], name: str) -> list:
    """Every value a parameter can take (its default when the space leaves it out); ranges give
    their bounds."""
    param = next((p for p in params if p.name == name), None)
    return list(param.values) if param else [TRIAL_PARAMS[name][1]]


def _check_models(params: list[Param]) -> None:
    """Every decoder x backbone pair the space can propose must be buildable at its smallest input
    size (built on the meta device: no weights), and every weights name must exist for its backbone."""
    size = min(possible_values(params, "resize"))
    backbones = possible_values(params, "backbone")
    try:
        for decoder, backbone in itertools.product(possible_values(params, "decoder"), backbones):
            check_pair(decoder, backbone, size)
        for backbone, weights in itertools.product(backbones, possible_values(params, "encoder_weights")):
            check_weights(backbone, weights)
    except UserError as exc:
        raise UserError(f"space: {exc}") from None


def _parse_param(name: str, spec, earlier: set[str]) -> Param:
    key = f"space.{name}"
    check = TRIAL_PARAMS[name][0]
    if not isinstance(spec, dict) or (name == "loss" and set(spec) <= set(LOSSES)):
        _checked(check, spec, key)  # a plain value, or a weighted loss such as {ce: 0.5, dice: 0.5}
        return Param(name, "fixed", (spec,))
    when = _parse_when(spec.get("when"), earlier, key)
    kinds = [k for k in spec if k != "when"]
    if len(kinds) != 1 or kinds[0] not in (*DISTRIBUTIONS, "value"):
        raise UserError(f"{key}: give exactly one of {', '.join(DISTRIBUTIONS)} or value (and optionally when), "
                        f"got {sorted(spec)}")
    kind, values = kinds[0], spec[kinds[0]]
    if kind == "value":
        _checked(check, values, f"{key}.value")
        return Param(name, "fixed", (values,), when)
    if not isinstance(values, list) or not values:
        raise UserError(f"{key}.{kind}: expected a non-empty list, got {values!r}")
    if kind == "choice":
        for v in values:
            if v is not None and not isinstance(v, (str, int, float, bool)):
                raise UserError(f"{key}.choice: options must be plain values, got {v!r}")
            _checked(check, v, f"{key}.choice")
        return Param(name, kind, tuple(values), when)
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
            or not values[0] < values[1]:
        raise UserError(f"{key}.{kind}: expected [low, high] numbers with low < high, got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise UserError(f"{key}.loguniform: bounds must be positive, got {values!r}")
    if kind == "int":
        if not all(isinstance(v, int) for v in values):
            raise UserError(f"{key}.int: bounds must be integers, got {values!r}")
    for v in values:
        _checked(check, v, f"{key}.{kind}")
    return Param(name, kind, (values[0], values[1]) if kind == "int" else (float(values[0]), float(values[1])), when)


def _checked(check, value, key: str) -> None:
    try:
        check(value)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None


def _parse_when(raw, earlier: set[str], key: str) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{key}.when: expected a mapping such as {{loss: focal}}, got {raw!r}")
    conditions = []
    for other, allowed in raw.items():
        if other not in earlier:
            raise UserError(f"{key}.when: {other!r} must be a parameter defined above {key.split('.')[-1]!r}")
        conditions.append((other, tuple(allowed) if isinstance(allowed, list) else (allowed,)))
    return tuple(conditions)


def trial_defaults() -> dict:
    return {name: default for name, (_, default) in TRIAL_PARAMS.items()}


def describe(spec: SearchSpec) -> list[str]:
    """One human-readable line per parameter, for --dry-run style summaries and logs."""
    lines = []
    for p in spec.params:
        cond = "" if not p.when else "  when " + ", ".join(f"{k} in {list(v)}" for k, v in p.when)
        shown = p.values[0] if p.kind == "fixed" else list(p.values)
        lines.append(f"{p.name}: {p.kind} {shown}{cond}")
    return lines


