"""The Ray Tune trainable: one trial = build a model from its config, train it epoch by epoch,
report val mIoU after each epoch (ASHA decides whether it goes on) and checkpoint the best weights.

Defined at module level with a stable name: Tune pickles it by reference for restores. Only
train_segmentation talks to Tune; build_trial / restore / run_epochs run without a Tune session
(tests call them with their own report function).

Training options (models.optim.TRAINING_PARAMS): optimizer, per-iteration lr schedule with warmup,
gradient clipping, AMP, channels_last, and SWA: with swa_epochs = N, the weights after each of the
last N epochs are averaged (torch.optim.swa_utils.AveragedModel, the trial's own lr schedule kept),
BatchNorm statistics are recomputed for the average over the training loader, and those epochs
evaluate and checkpoint the averaged model (a plain state_dict, like any other checkpoint).

Under a search time budget (launch.py --time-budget puts its deadline in DEADLINE_ENV before Ray
starts), each trial plans after every epoch how many more fit before the deadline, at the pace of its
epochs so far; when fewer than max_epochs fit, its lr schedule ends early (models.optim.LrCurve) so
that the weights it ends with are annealed, and it stops there instead of being cut off mid-schedule.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import ray
import torch.nn as nn
from ray import tune
from torch.optim.swa_utils import AveragedModel

from data_pipeline.classes import ClassMap, unknown_label
from data_pipeline.dataset import SegmentationDataset, make_loader
from data_pipeline.augment import Crop
from data_pipeline.imbalance import build_sampler, class_pixel_frequencies, class_rarity, class_weights
from data_pipeline.trial_data import DataSpec
from errors import UserError
from models.checkpoint import WEIGHTS_FILE, read_meta, save_checkpoint
from models.factory import build_model, input_normalization
from models.host_memory import reuse_freed_memory
from models.losses import build_loss
from models.metrics import METRIC_MODES
from models.open_set import UnknownScoring, open_set_loss
from models.optim import (build_optimizer, build_scaler, build_scheduler, end_schedule_early, resolve_amp,
                          resolve_channels_last, schedule_steps, setting)
from models.weights import DEFAULT_NORMALIZATION
from models.training import evaluate, evaluate_open_set, place_model, train_epoch, update_bn_statistics

from .space import trial_defaults

TRAIN_STATE_FILE = "train_state.pt"
DEADLINE_ENV = "SEGSEARCH_DEADLINE"  # unix time by which a budgeted search's trials finish
DEADLINE_MARGIN = 1.1  # an epoch is planned only if 1.1x the pace so far fits before the deadline
log = logging.getLogger(__name__)

# report(metrics, checkpoint directory or None): what a trial hands over after each epoch.
Report = Callable[[dict, "str | None"], None]


@dataclass
class Trial:
    """Everything one trial trains, evaluates and checkpoints, and where it stands."""
    cfg: dict
    device: torch.device
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    num_classes: int
    meta: dict  # model.json of its checkpoints, less epoch and metrics
    amp: torch.dtype | None
    channels_last: bool
    swa: AveragedModel | None  # the weight average, when swa_epochs > 0
    swa_epochs: int
    unknown: UnknownScoring | None  # how val treats the UNKNOWN class, when the label space has one
    setup_time_s: float = 0.0  # building the trial: data (decoded splits), model, loss, optimiser
    deadline: float | None = None  # unix time by which the trial finishes (a search time budget)
    epoch: int = 0  # epochs done
    last_epoch: int = 0  # the epoch it plans to end with: max_epochs, or fewer that fit before the deadline
    epoch_times: list[float] = field(default_factory=list)  # wall s of the epochs this run trained
    held: HeldCheckpoint | None = None  # the checkpoint to keep, copied to host memory
    written_at: float = field(default_factory=time.monotonic)  # when a checkpoint was last handed over
    best: float = math.nan  # best value so far of the ranking metric (cfg["metric"])
    best_val_miou: float = -math.inf  # reported too, whatever the ranking metric

    @property
    def metric(self) -> str:
        return self.cfg.get("metric", "val_miou")

    def improves(self, val: dict) -> bool:
        value = val[self.metric]
        if math.isnan(self.best):
            return True
        return value > self.best if METRIC_MODES[self.metric] == "max" else value < self.best

    @property
    def normalization(self) -> dict:
        return self.meta["normalization"]

    def swa_active(self, epoch: int) -> bool:
        return self.swa is not None and epoch > self.last_epoch - self.swa_epochs


@dataclass
class HeldCheckpoint:
    """A checkpoint held in host memory until the trial hands it over: the files save_trial_checkpoint
    writes, as tensors copied out of the live model and optimiser (into the previous copy's buffers,
    so holding a new one allocates nothing)."""
    weights: dict
    meta: dict
    train_state: dict
    written: bool = False


def train_segmentation(config: dict) -> None:
    trial = build_trial(config)
    restored = tune.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            restore(trial, directory)
    run_epochs(trial, _report_to_tune)


def _report_to_tune(metrics: dict, directory: str | None) -> None:
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)


def _trial_cpus(config: dict) -> int:
    try:
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    except Exception:  # outside a Tune session (direct calls in tests)
        cpus = config.get("cpus_per_trial", 1)
    return max(1, int(cpus))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _loader_workers(cpus: int, device: torch.device) -> int:
    """On a GPU, augmentation runs in cpus - 1 loader processes beside the training one. On the CPU
    the cores are the model's: slicing cached splits in-process costs little (bench/loader.py)."""
    return max(0, cpus - 1) if device.type == "cuda" else 0


def build_trial(config: dict, device: torch.device | None = None) -> Trial:
    """Data, model, loss, optimiser, schedule and training options of a trial config (defaults filled)."""
    started = time.perf_counter()
    cfg = {**trial_defaults(), **config}
    cpus = _trial_cpus(cfg)
    torch.set_num_threads(cpus)
    reuse_freed_memory()
    torch.manual_seed(cfg.get("seed", 0))
    device = device or _device()

    resize = cfg["resize"]
    data = DataSpec.from_config(cfg)
    train_split, val_split, mix = data.training_data(resize)
    eval_size = cfg.get("eval_size") or resize  # search.space.eval_size; a direct call: the trial's own size
    if eval_size != resize:  # scored on the experiment's val truth; evaluation resizes the probabilities to it
        val_split = replace(val_split, masks=data.val_split(eval_size).masks)
    num_classes = len(train_split.class_names)
    unknown = _unknown_label(cfg["unknown"], train_split.class_names, data)
    open_set = cfg["unknown"] == "open_set"
    generator = torch.Generator().manual_seed(cfg.get("seed", 0))
    sampler = build_sampler(cfg["sampler"], train_split.masks, num_classes, generator, mix)
    train_loader = make_loader(
        SegmentationDataset(train_split, cfg["augmentation"], train=True, crop=_crop(cfg, train_split, num_classes)),
        cfg["batch_size"],
        workers=_loader_workers(cpus, device), pin_memory=device.type == "cuda",
        shuffle=sampler is None, sampler=sampler, drop_last=len(train_split) > cfg["batch_size"], generator=generator)
    val_loader = make_loader(SegmentationDataset(val_split, "none", train=False), max(cfg["batch_size"], 16))

    amp, note = resolve_amp(cfg, device)
    if note:
        log.warning(note)  # once per trial, in its log
    channels_last = resolve_channels_last(cfg, device)
    model = place_model(build_model(cfg["decoder"], cfg["backbone"], num_classes, cfg["encoder_weights"],
                                    unknown_label=unknown if open_set else None), device, channels_last)
    weights = _class_weights(cfg["class_weights"], train_split.masks, num_classes)
    if open_set and weights is not None:  # the loss of the known pixels is over the known classes
        weights = torch.cat([weights[:unknown], weights[unknown + 1:]])
    loss_fn = build_loss(cfg, weights)
    if unknown is not None:
        loss_fn = open_set_loss(cfg["unknown"], loss_fn, unknown, model, cfg)
    loss_fn = loss_fn.to(device)
    scoring = UnknownScoring.of_trial(cfg, unknown)
    optimizer = build_optimizer(model, cfg)
    swa_epochs = min(setting(cfg, "swa_epochs"), cfg["max_epochs"])
    meta = {
        "decoder": cfg["decoder"], "backbone": cfg["backbone"], "encoder_weights": cfg["encoder_weights"],
        "num_classes": num_classes, "class_names": list(train_split.class_names),
        "input_size": [resize, resize], "normalization": _normalization(cfg),
        "val_images": list(val_split.file_names), "config": cfg,
    }
    if open_set:
        meta["open_set"] = {"unknown_label": unknown, "rule": scoring.rule, "reject_label": scoring.reject_label}
    return Trial(cfg=cfg, device=device, model=model, loss_fn=loss_fn, optimizer=optimizer,
                 scheduler=build_scheduler(optimizer, cfg, len(train_loader)), scaler=build_scaler(amp, device),
                 train_loader=train_loader, val_loader=val_loader, num_classes=num_classes, meta=meta,
                 amp=amp, channels_last=channels_last, swa=AveragedModel(model) if swa_epochs else None,
                 swa_epochs=swa_epochs, unknown=scoring, setup_time_s=time.perf_counter() - started,
                 deadline=search_deadline(), last_epoch=cfg["max_epochs"])


def _normalization(cfg: dict) -> dict:
    """The encoder's own input statistics (auto), or the ImageNet pair whatever the encoder."""
    if cfg["normalization"] == "imagenet":
        return DEFAULT_NORMALIZATION
    return input_normalization(cfg["backbone"], cfg["encoder_weights"])


def _crop(cfg: dict, train_split, num_classes: int) -> Crop | None:
    """The training crop (trial parameters crop, crop_focus, crop_scale), checked against the decoded size."""
    if cfg["crop"] is None:
        return None
    if cfg["crop"] > cfg["resize"]:
        raise UserError(f"crop {cfg['crop']} is larger than resize {cfg['resize']}")
    focus = cfg["crop_focus"]
    return Crop(cfg["crop"], focus, class_rarity(train_split.masks, num_classes) if focus else None,
                max_scale=cfg["crop_scale"])


def search_deadline() -> float | None:
    """The unix time by which a budgeted search ends (launch.py --time-budget), None without a budget."""
    value = os.environ.get(DEADLINE_ENV)
    return float(value) if value else None


def _unknown_label(treatment: str, class_names, data: DataSpec) -> int | None:
    label = unknown_label(class_names, data.classes())
    if label is None and treatment != "keep":
        names = ", ".join((data.classes() or ClassMap()).unknown_names)
        raise UserError(f"unknown: {treatment} needs an UNKNOWN class (a category named {names}); "
                        f"the classes are {', '.join(class_names)}")
    return label


def run_epochs(trial: Trial, report: Report) -> None:
    """Trains the remaining epochs; after each, report(metrics, checkpoint directory or None): a
    checkpoint when the ranking metric improved, or after every epoch when the experiment keeps the
    last one (config `checkpoint: last`). The directory exists only during the call."""
    while trial.epoch < trial.last_epoch:
        epoch = trial.epoch + 1
        started = time.perf_counter()
        train_loss = train_epoch(trial.model, trial.train_loader, trial.loss_fn, trial.optimizer, trial.device,
                                 trial.normalization, scheduler=trial.scheduler, amp=trial.amp, scaler=trial.scaler,
                                 grad_clip=setting(trial.cfg, "grad_clip"), channels_last=trial.channels_last,
                                 frozen_norm=_frozen_norm(trial, trial.model))
        trained = time.perf_counter()
        scored = _average_weights(trial) if trial.swa_active(epoch) else trial.model
        val, curve = _evaluate(trial, scored)
        trial.epoch = epoch
        evaluated = time.perf_counter()
        trial.best_val_miou = max(trial.best_val_miou, val["val_miou"])
        improved = trial.improves(val)
        if improved:
            trial.best = val[trial.metric]
        if improved or trial.cfg.get("checkpoint") == "last":
            trial.held = hold_checkpoint(trial, scored, val, curve)
        trial.epoch_times.append(time.perf_counter() - started)
        plan_to_deadline(trial)  # before the report, so that it states the plan this epoch ends with
        metrics = {**val, "train_loss": train_loss, "epoch": epoch, "epoch_time_s": evaluated - started,
                   "train_time_s": trained - started, "eval_time_s": evaluated - trained,
                   "setup_time_s": trial.setup_time_s, "planned_epochs": trial.last_epoch,
                   f"best_{trial.metric}": trial.best, "best_val_miou": trial.best_val_miou, **_placement()}
        if trial.held is not None and not trial.held.written and _write_now(trial):
            with tempfile.TemporaryDirectory() as directory:
                write_held_checkpoint(trial.held, directory)
                report(metrics, directory)
            trial.held.written, trial.written_at = True, time.monotonic()
        else:
            report(metrics, None)


def _frozen_norm(trial: Trial, model: nn.Module) -> nn.Module | None:
    """model's encoder, when the trial keeps the encoder's BatchNorm statistics (encoder_norm: frozen)."""
    return model.encoder if setting(trial.cfg, "encoder_norm") == "frozen" else None


def _write_now(trial: Trial) -> bool:
    """Whether the held checkpoint goes to Tune with this epoch's report: at the trial's last planned
    epoch and at the scheduler's rungs (where it may be stopped), and once checkpoint_interval_s has
    passed since the last one (0, or a config without rungs, as in direct calls: every time).
    Writing less often saves each checkpoint's two writes (here, and Tune's copy into the experiment)."""
    interval = trial.cfg.get("checkpoint_interval_s", 0.0)
    return (trial.epoch >= trial.last_epoch or trial.epoch in trial.cfg.get("rungs", ())
            or time.monotonic() - trial.written_at >= interval)


def plan_to_deadline(trial: Trial, now: float | None = None) -> None:
    """Plans the trial's last epoch to its deadline after every epoch: the epochs that fit (at 1.1x its
    recent pace: the mean of its last three epochs, the first one, which builds the trial, left out
    once there are others), at most max_epochs, and its lr decays to them. A plan made when epochs
    were slow is extended when they get faster."""
    if trial.deadline is None or not trial.epoch_times:
        return
    recent = (trial.epoch_times[1:] or trial.epoch_times)[-3:]
    pace = DEADLINE_MARGIN * sum(recent) / len(recent)
    fits = max(0, math.floor((trial.deadline - (time.time() if now is None else now)) / pace))
    last = min(trial.cfg["max_epochs"], trial.epoch + fits)
    if last != trial.last_epoch:
        end_schedule_early(trial.scheduler, trial.scheduler.last_epoch + (last - trial.epoch) * len(trial.train_loader))
        trial.last_epoch = last
        log.info("the search's time budget leaves this trial %d more epoch(s): it ends at epoch %d", fits, last)


def _evaluate(trial: Trial, model: nn.Module) -> tuple[dict, list[dict]]:
    """Val metrics, and for an open-set trial its open-set curve (else [])."""
    args = (model, trial.val_loader, trial.num_classes, trial.device, trial.normalization, trial.unknown)
    if trial.unknown is not None and trial.unknown.open_set:
        return evaluate_open_set(*args, amp=trial.amp)
    return evaluate(*args, amp=trial.amp), []


def _placement() -> dict:
    """Where Ray runs this trial: its GPU ids and its node (several nodes may share one IP)."""
    if not ray.is_initialized():
        return {"gpu_ids": [], "node_id": None}
    return {"gpu_ids": [str(i) for i in ray.get_gpu_ids()], "node_id": ray.get_runtime_context().get_node_id()}


def _average_weights(trial: Trial) -> nn.Module:
    """Adds this epoch's weights to the average, recomputes its BatchNorm statistics; the averaged model."""
    trial.swa.update_parameters(trial.model)
    update_bn_statistics(trial.swa, trial.train_loader, trial.device, trial.normalization, amp=trial.amp,
                         channels_last=trial.channels_last, frozen_norm=_frozen_norm(trial, trial.swa.module))
    return trial.swa.module


def _checkpoint_parts(trial: Trial, scored: nn.Module, val: dict, curve: list[dict] | None) -> tuple[dict, dict, dict]:
    """(weights, meta, train state) of a checkpoint now, the tensors the live ones. weights: those
    that scored val (the averaged ones in SWA epochs, without AveragedModel's `module.` prefix); meta:
    model.json (an open-set model's holds its rejection threshold and open-set curve on val); train
    state: what a restore needs to go on training."""
    meta = {**trial.meta, "epoch": trial.epoch, "metrics": val, "best_val_miou": trial.best_val_miou,
            "best": trial.best}
    if "open_set" in meta:
        meta["open_set"] = {**meta["open_set"], "threshold": val["val_reject_threshold"], "curve": curve or []}
    state = {"optimizer": trial.optimizer.state_dict(), "scheduler": trial.scheduler.state_dict(),
             "scaler": trial.scaler.state_dict()}
    if scored is not trial.model:
        meta["averaged_epochs"] = int(trial.swa.n_averaged)
        state["model"], state["swa"] = trial.model.state_dict(), trial.swa.state_dict()
    return scored.state_dict(), meta, state


def save_trial_checkpoint(trial: Trial, scored: nn.Module, val: dict, directory: str | Path,
                          curve: list[dict] | None = None) -> None:
    """model.pt, model.json and train_state.pt of the trial now (_checkpoint_parts) in directory."""
    write_held_checkpoint(HeldCheckpoint(*_checkpoint_parts(trial, scored, val, curve)), directory)


def hold_checkpoint(trial: Trial, scored: nn.Module, val: dict, curve: list[dict] | None = None) -> HeldCheckpoint:
    """The trial's checkpoint now, copied to host memory (into the buffers of the one it held before)."""
    weights, meta, state = _checkpoint_parts(trial, scored, val, curve)
    previous = trial.held or HeldCheckpoint({}, {}, {})
    return HeldCheckpoint(_host_copy(weights, previous.weights), meta, _host_copy(state, previous.train_state))


def write_held_checkpoint(held: HeldCheckpoint, directory: str | Path) -> None:
    """The checkpoint's files in directory: model.pt and model.json (models.checkpoint), train_state.pt."""
    save_checkpoint(directory, held.weights, held.meta)
    torch.save(held.train_state, Path(directory) / TRAIN_STATE_FILE)


def _host_copy(value, into=None):
    """value with every tensor copied to the CPU: into into's tensor at the same place where it has
    the same shape and dtype (no new memory), else into a new one; other values as they are."""
    if isinstance(value, torch.Tensor):
        if isinstance(into, torch.Tensor) and into.shape == value.shape and into.dtype == value.dtype:
            return into.copy_(value.detach())
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        into = into if isinstance(into, dict) else {}
        return {k: _host_copy(v, into.get(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        into = into if isinstance(into, (list, tuple)) and len(into) == len(value) else [None] * len(value)
        return type(value)(_host_copy(v, i) for v, i in zip(value, into))
    return value


def restore(trial: Trial, directory: str | Path) -> None:
    """Loads a checkpoint's weights and training state into trial: training goes on after its epoch,
    with the same lr schedule position, loss scale and (in SWA epochs) weight average."""
    meta = read_meta(directory)
    state = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location=trial.device, weights_only=True)
    weights = state["model"] if "model" in state else \
        torch.load(Path(directory) / WEIGHTS_FILE, map_location=trial.device, weights_only=True)
    trial.model.load_state_dict(weights)
    trial.optimizer.load_state_dict(state["optimizer"])
    trial.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        trial.scaler.load_state_dict(state["scaler"])
    if "swa" in state and trial.swa is not None:
        trial.swa.load_state_dict(state["swa"])
    trial.epoch, trial.best = meta["epoch"], meta.get("best", meta["metrics"][trial.metric])
    steps = schedule_steps(trial.scheduler)  # fewer than max_epochs' if a deadline shortened it
    trial.last_epoch = min(trial.cfg["max_epochs"], math.ceil(steps / max(1, len(trial.train_loader))))
    trial.best_val_miou = meta.get("best_val_miou", meta["metrics"]["val_miou"])


def _class_weights(mode: str, masks, num_classes: int) -> torch.Tensor | None:
    if mode == "none":
        return None
    return torch.from_numpy(class_weights(class_pixel_frequencies(masks, num_classes), mode))
