"""Search-space YAML: parsing, validation (before Ray starts) and the define-by-run sampler for Optuna.

A space file has three sections:

    experiment: {num_samples, max_epochs, scheduler (asha | fifo), grace_period, reduction_factor, seed,
                 trial_seeds (per_trial | shared), cpus_per_trial, gpus_per_trial, max_failures, metric, mode,
                 checkpoint, min_epochs}
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

import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from checks import number, one_of, reject_unknown_keys, typed_values
from data_pipeline.augment import POLICIES
from data_pipeline.classes import ClassMap
from data_pipeline.imbalance import CLASS_WEIGHT_MODES, SAMPLERS
from data_pipeline.trial_data import DataSpec
from errors import UserError
from models.factory import check_backbone, check_decoder, check_pair, check_weights
from models.losses import LOSS_PARAMS, LOSSES, parse_loss
from models.metrics import METRIC_MODES
from models.open_set import OPEN_SET_PARAMS
from models.optim import TRAINING_PARAMS
from yaml_file import load_yaml

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
NORMALIZATIONS = ("auto", "imagenet")


_positive = number(low=0, low_open=True, expected="a positive number")
_resize = number(low=32, integer=True, multiple_of=32, name="resize", expected="an integer multiple of 32",
                 note=" (encoders downsample by 32)")
_crop = number(low=32, integer=True, multiple_of=32, optional=True, name="crop",
               expected="null (whole images) or an integer multiple of 32")


def _optional_weights(value) -> None:
    if value is not None and not isinstance(value, str):
        raise UserError(f"encoder_weights must be null or a name such as imagenet, got {value!r}")


# Trial parameters the trainable understands, each with the check of one value and its default.
TRIAL_PARAMS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "decoder": (check_decoder, "Unet"),
    "backbone": (check_backbone, "resnet18"),
    "encoder_weights": (_optional_weights, None),
    "normalization": (one_of(NORMALIZATIONS), "auto"),  # auto: the encoder's own mean/std; imagenet
    **LOSS_PARAMS,
    "augmentation": (one_of(POLICIES), "flip"),
    "resize": (_resize, 128),
    "crop": (_crop, None),  # train on random crop x crop patches of the resized images; predict whole ones
    "crop_focus": (number(0, 1), 0.0),
    "crop_scale": (number(low=1, name="crop_scale", note=" (windows up to crop x crop_scale, resized to crop)"),
                   1.0),  # share of crops placed around a rare class's pixel
    "lr": (_positive, 1e-3),
    "weight_decay": (number(low=0, expected="a positive number or 0"), 1e-4),
    "batch_size": (number(low=1, integer=True, name="batch_size", expected="a positive integer"), 8),
    "class_weights": (one_of(CLASS_WEIGHT_MODES), "none"),
    "sampler": (one_of(SAMPLERS), "uniform"),
    "fold": (number(low=0, integer=True, name="fold", expected="a non-negative integer"), 0),  # data.split: kfold
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
    # per_trial: the study's trial n trains from seed + n (its initialisation, data order), so trials of
    # near-equal parameters are independent draws, not copies, and can be ensembled; shared: every
    # trial trains from seed (common random numbers: differences between trials are the parameters').
    trial_seeds: str = "per_trial"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 1.0  # used only when GPUs are given to the search
    max_failures: int = 1  # retries of a trial that raises before it is recorded as errored
    checkpoint: str = "best"  # the checkpoint each trial keeps: best (by metric) or last (its final weights)
    # The longest a trial holds a new checkpoint in memory before writing it (it always writes at the
    # scheduler's rungs and at its last epoch): what a crash can cost; 0 writes each one at once.
    checkpoint_interval_s: float = 300.0
    # Under a time budget no trial starts unless this many epochs fit before the deadline; 0: the larger
    # of ASHA's grace_period and a quarter of max_epochs (a shorter trial is no useful candidate).
    min_epochs: int = 0
    # The side of the val label maps every trial is scored on, its probabilities resized to them; 0: the
    # largest input size the space proposes. One truth for all trials: scored at its own input size, a
    # trial of small inputs is judged on coarser labels, where small objects shrink or vanish, and ranks
    # wrongly against trials of large inputs (for TPE, ASHA, the leaderboard and the ensemble's top-k).
    eval_size: int = 0

    @property
    def seed_per_trial(self) -> bool:
        return self.trial_seeds == "per_trial"

    @property
    def useful_epochs(self) -> int:
        return self.min_epochs or max(self.grace_period, math.ceil(self.max_epochs / 4))

    @property
    def rungs(self) -> tuple[int, ...]:
        """The epochs at which ASHA compares trials and may stop them (none under FIFO)."""
        if self.scheduler != "asha":
            return ()
        count = int(math.log(self.max_epochs / self.grace_period, self.reduction_factor) + 1e-9) + 1
        return tuple(self.grace_period * self.reduction_factor ** k for k in range(count))


SCHEDULERS = ("asha", "fifo")
CHECKPOINTS = ("best", "last")
TRIAL_SEEDS = ("per_trial", "shared")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "fixed" or one of DISTRIBUTIONS
    values: tuple  # fixed: (value,); choice: options; uniform/loguniform/int: (low, high)
    when: tuple[tuple[str, tuple], ...] = ()  # (other param, allowed values) pairs, all must hold

    def admits(self, value) -> bool:
        """Whether value is one this parameter can take (a choice, or within its range)."""
        if self.kind == "choice":  # YAML's true is not the choice 1, nor 1 the choice true
            return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in self.values)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        return self.values[0] <= value <= self.values[1]

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
    data: DataSpec = field(default_factory=lambda: DataSpec(root=""))  # its root and skipped images: at launch
    params: tuple[Param, ...] = ()
    first_trials: tuple[dict, ...] = ()  # values of searched parameters the first trials take, in order

    @property
    def class_map(self) -> ClassMap | None:
        """data.class_map and data.unknown, loaded; None = categories as they are."""
        return self.data.classes()


class SpaceSampler:
    """Define-by-run space for Ray Tune's OptunaSearch: suggests the searched parameters and returns
    the fixed ones (plus run settings) as constants. A module-level class so Tune can pickle it.
    With seed_per_trial, the constant `seed` is offset by the Optuna trial's number (first trials
    included), which the study's storage keeps across a resume."""

    def __init__(self, params: tuple[Param, ...], constants: dict, seed_per_trial: bool = False):
        self.params, self.constants, self.seed_per_trial = params, dict(constants), seed_per_trial

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
        if self.seed_per_trial:
            fixed["seed"] = fixed.get("seed", 0) + trial.number
        return fixed


def load_space(path: str | Path) -> SearchSpec:
    """Reads and validates a space file; every problem is a UserError naming the file and key."""
    return load_yaml(path, "search space", lambda raw: _parse(raw, str(path)))


def _parse(raw, source: str) -> SearchSpec:
    if not isinstance(raw, dict):
        raise UserError("the file must be a mapping with 'experiment', 'data' and 'space' sections")
    reject_unknown_keys(raw, ("data", "experiment", "first_trials", "space"))
    experiment = ExperimentSettings(**typed_values(raw.get("experiment") or {}, ExperimentSettings(), "experiment"))
    data = DataSpec.from_section(raw.get("data"), Path(source).parent)
    _check_experiment(experiment)
    experiment = replace(experiment, mode=METRIC_MODES[experiment.metric])
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise UserError("'space' must be a non-empty mapping of trial parameters")
    reject_unknown_keys(space, sorted(TRIAL_PARAMS), "space.")
    params: list[Param] = []
    for name, spec in space.items():
        params.append(_parse_param(name, spec, {p.name for p in params}))
    _check_folds(params, data)
    _check_models(params)
    _check_crop(params)
    _check_unknown_treatment(params, data.classes())
    first = _parse_first_trials(raw.get("first_trials"), params)
    return SearchSpec(source, experiment, data, tuple(params), first)


def _check_experiment(e: ExperimentSettings) -> None:
    for key in ("num_samples", "max_epochs", "grace_period", "cpus_per_trial"):
        if getattr(e, key) <= 0:
            raise UserError(f"experiment.{key} must be positive, got {getattr(e, key)!r}")
    if not 0 <= e.min_epochs <= e.max_epochs:
        raise UserError(f"experiment.min_epochs must be between 0 and max_epochs ({e.max_epochs}), got {e.min_epochs}")
    if e.grace_period > e.max_epochs:
        raise UserError(f"experiment.grace_period ({e.grace_period}) exceeds max_epochs ({e.max_epochs})")
    if e.checkpoint not in CHECKPOINTS:
        raise UserError(f"experiment.checkpoint must be one of {', '.join(CHECKPOINTS)}, got {e.checkpoint!r}")
    if e.trial_seeds not in TRIAL_SEEDS:
        raise UserError(f"experiment.trial_seeds must be one of {', '.join(TRIAL_SEEDS)}, got {e.trial_seeds!r}")
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
    if e.eval_size < 0:
        raise UserError(f"experiment.eval_size must be a size in pixels, or 0 for the largest resize, got {e.eval_size}")
    if not e.checkpoint_interval_s >= 0:
        raise UserError(f"experiment.checkpoint_interval_s must be >= 0 seconds, got {e.checkpoint_interval_s!r}")


def _check_folds(params: list[Param], d: DataSpec) -> None:
    fold = next((p for p in params if p.name == "fold"), None)
    if fold is None:
        return
    if d.split != "kfold":
        raise UserError("space.fold: folds exist only with data.split: kfold")
    if max(fold.values) >= d.folds:
        raise UserError(f"space.fold: folds are numbered 0..{d.folds - 1} (data.folds: {d.folds}), "
                        f"got {max(fold.values)}")


def _check_crop(params: list[Param]) -> None:
    """A training crop must fit in every resize the space can propose."""
    crops = [c for c in possible_values(params, "crop") if c is not None]
    if crops and max(crops) > min(possible_values(params, "resize")):
        raise UserError(f"space.crop: crop {max(crops)} is larger than resize {min(possible_values(params, 'resize'))}; "
                        "crops are cut from the resized images")


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


def eval_size(spec: SearchSpec) -> int:
    """The side of the val label maps trials are scored on (experiment.eval_size, 0: the largest resize)."""
    return spec.experiment.eval_size or max(possible_values(spec.params, "resize"))


def never_active(spec: SearchSpec) -> list[str]:
    """A warning per conditional parameter whose `when` no value of the parameters it names can meet
    (e.g. focal_gamma when loss is focal, in a space whose loss is always ce): it is never sampled."""
    warnings = []
    for p in spec.params:
        for name, allowed in p.when:
            other = next((q for q in spec.params if q.name == name), None)
            if other is not None and other.kind not in ("fixed", "choice"):
                continue  # a range: whether a value in it is allowed is not worth guessing
            values = possible_values(list(spec.params), name)
            if not any(_parts(name, v) & set(allowed) for v in values):
                warnings.append(f"{spec.source}: space.{p.name} is never sampled: its `when` needs {name} in "
                                f"{list(allowed)}, but {name} can only be {values}")
    return warnings


def pretrained_encoders(spec: SearchSpec) -> list[tuple[str, str]]:
    """Every (backbone, encoder_weights) pair with weights that the space can propose."""
    pairs = itertools.product(possible_values(list(spec.params), "backbone"),
                              possible_values(list(spec.params), "encoder_weights"))
    return [(backbone, weights) for backbone, weights in pairs if weights is not None]


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


def _parse_first_trials(raw, params: list[Param]) -> tuple[dict, ...]:
    """first_trials: a list of {searched parameter: value} the first trials take (Optuna evaluates
    them before it proposes; parameters left out are proposed as usual)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(t, dict) and t for t in raw):
        raise UserError(f"first_trials: expected a list of mappings such as {{lr: 0.001}}, got {raw!r}")
    searched = {p.name: p for p in params if p.kind != "fixed"}
    fixed = {p.name: p.values[0] for p in params if p.kind == "fixed"}
    for i, trial in enumerate(raw):
        reject_unknown_keys(trial, sorted(searched), f"first_trials[{i}].")
        for name, value in trial.items():
            if not searched[name].admits(value):
                raise UserError(f"first_trials[{i}].{name}: {value!r} is not among the space's values "
                                f"({searched[name].kind} {list(searched[name].values)})")
            if not searched[name].active({**fixed, **trial}):
                raise UserError(f"first_trials[{i}].{name}: not searched in this trial (its when: "
                                f"{dict(searched[name].when)} does not hold)")
    return tuple(dict(t) for t in raw)


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


