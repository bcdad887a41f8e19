"""Optimisers, learning-rate schedules and training options of a trial.

Schedules step once per optimiser step (per iteration, inside models.training.train_epoch): a linear
warmup over `warmup_epochs`, then `cosine`, `poly` (power 0.9, as in DeepLab) or `constant` over the
remaining iterations of max_epochs. Per-iteration stepping makes short warmups (one epoch of a few
steps) smooth. Without warmup, cosine's lr at the start of epoch e is CosineAnnealingLR(T_max=
max_epochs)'s value for epoch e (the per-epoch schedule trials had before) and decays smoothly in
between.

AMP: `auto` is bf16 autocast on a CUDA device that supports it, else fp16 with a GradScaler. On the
CPU, `auto` and `bf16` are bf16 autocast where the CPU has AMX tiles (oneDNN runs bf16 convolutions on
them: 2.0-2.4x the images/s of float32 for Unet-resnet18, 1.8x for FPN-resnet18, bench/epoch_cost.py
--amp); elsewhere bf16 is emulated and slower than float32, so `auto` stays float32 and an explicit
bf16/fp16 request trains in float32 with a note for the trial log. One search space runs on every
machine.

channels_last: `auto` is on for every device. On the CPU (oneDNN) channels-last convolutions train
5-15% faster than NCHW here (bench/train_step.py --channels-last true: 1.12x for Unet-resnet18 at
128 px); the trials before these options already got most of that, since normalize's output is
channels-last in memory and convolutions follow their input's format. `false` is NCHW throughout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from errors import UserError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")
POLY_POWER = 0.9
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --- checks of one trial-parameter value (search.space prefixes the key, e.g. "space.optimizer: ") ---

def _one_of(options):
    def check(value) -> None:
        if isinstance(value, bool) or value not in options:
            raise UserError(f"unknown value {value!r}; choose one of {', '.join(map(str, options))}")
    return check


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _momentum(value) -> None:
    if not _is_number(value) or not 0 <= value < 1:
        raise UserError(f"momentum must be a number in [0, 1), got {value!r}")


def _warmup_epochs(value) -> None:
    if not _is_number(value) or value < 0:
        raise UserError(f"warmup_epochs must be a number >= 0 (0 = no warmup), got {value!r}")


def _grad_clip(value) -> None:
    if value is not None and (not _is_number(value) or value <= 0):
        raise UserError(f"grad_clip must be null (no clipping) or a max gradient norm > 0, got {value!r}")


def _channels_last(value) -> None:
    if value != "auto" and not isinstance(value, bool):
        raise UserError(f"channels_last must be auto, true or false, got {value!r}")


def _swa_epochs(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"swa_epochs must be an integer >= 0 (0 = no weight averaging), got {value!r}")


# Trial parameters of training, each with the check of one value and its default (search.space
# merges them into its TRIAL_PARAMS). lr and weight_decay are search.space's own.
TRAINING_PARAMS: dict = {
    "optimizer": (_one_of(OPTIMIZERS), "adamw"),
    "momentum": (_momentum, 0.9),  # sgd only (Nesterov when > 0)
    "schedule": (_one_of(SCHEDULES), "cosine"),
    "warmup_epochs": (_warmup_epochs, 0),
    "grad_clip": (_grad_clip, None),
    "amp": (_one_of(AMP_MODES), "auto"),
    "channels_last": (_channels_last, "auto"),
    "swa_epochs": (_swa_epochs, 0),
}


def setting(cfg: dict, name: str):
    """cfg[name], checked (a one-line UserError naming the parameter), or its default when absent."""
    check, default = TRAINING_PARAMS[name]
    value = cfg.get(name, default)
    try:
        check(value)
    except UserError as exc:
        raise UserError(f"{name}: {exc}") from None
    return value


# --- optimiser and schedule ---

def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, Nesterov) over all parameters with cfg's lr and weight_decay. AdamW is
    fused on CUDA: one kernel per step, and a GradScaler then skips steps without a host sync."""
    params = list(model.parameters())
    if setting(cfg, "optimizer") == "sgd":
        momentum = setting(cfg, "momentum")
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=momentum, nesterov=momentum > 0,
                               weight_decay=cfg["weight_decay"])
    fused = True if params and params[0].is_cuda else None
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=fused)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The lr multiplier of optimiser step `step` (0-based): (step + 1) / warmup_steps while warming
    up, then the schedule's decay over the remaining steps (progress 0 → 1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return _decay(schedule, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def _decay(schedule: str, progress: float) -> float:
    progress = min(1.0, progress)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1 - progress) ** POLY_POWER
    return 1.0


class LrCurve:
    """The lr multiplier of each optimiser step (a LambdaLR's lr_lambda). An object, not a function:
    LambdaLR's state_dict keeps its attributes, so a restored trial continues a shortened curve too.

    end_early(step, total_steps): from `step` on, the schedule's shape decays from the multiplier it
    has reached to its end over the fewer steps left (the trial cannot train the whole schedule: a
    time budget ends first). Without this, a trial cut off mid-schedule keeps weights trained at a
    high lr; annealed ones are better at any length ("Budgeted training", Li et al., ICLR 2020).
    """

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int):
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps
        self.cut_step, self.cut_factor = None, 1.0  # where end_early took over, and the multiplier there

    def __call__(self, step: int) -> float:
        if self.cut_step is None or step < self.cut_step:
            return lr_factor(step, schedule=self.schedule, warmup_steps=self.warmup_steps,
                             total_steps=self.total_steps)
        progress = (step - self.cut_step) / max(1, self.total_steps - self.cut_step)
        return self.cut_factor * _decay(self.schedule, progress)

    def end_early(self, step: int, total_steps: int) -> None:
        if total_steps >= self.total_steps:
            return
        self.cut_factor, self.cut_step = self(step), step
        self.total_steps = max(total_steps, step + 1)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule over cfg['max_epochs'] epochs of steps_per_epoch steps (step it after
    every optimiser step). Its state_dict is the step count and the curve (LrCurve): a restored trial
    continues the curve."""
    steps_per_epoch = max(1, steps_per_epoch)
    curve = LrCurve(setting(cfg, "schedule"), warmup_steps=round(setting(cfg, "warmup_epochs") * steps_per_epoch),
                    total_steps=cfg["max_epochs"] * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, curve)


# --- precision and memory format ---

def resolve_amp(cfg: dict, device: torch.device | str) -> tuple[torch.dtype | None, str | None]:
    """(autocast dtype or None for full precision, a note for the trial log or None)."""
    mode, device = setting(cfg, "amp"), torch.device(device)
    if mode == "off":
        return None, None
    if device.type != "cuda":
        if mode in ("auto", "bf16") and cpu_has_fast_bf16():
            return torch.bfloat16, None
        notes = {"bf16": "amp: bf16 asked for, but this CPU has no AMX tiles; training in float32",
                 "fp16": "amp: fp16 runs on CUDA devices only; training in float32"}
        return None, notes.get(mode)
    if mode == "auto":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
    return AMP_DTYPES[mode], None


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions in hardware (AMX tiles, with oneDNN's bf16 support)."""
    return bool(torch.cpu._is_amx_tile_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_scaler(amp_dtype: torch.dtype | None, device: torch.device | str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 has float32's range and needs none)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def resolve_channels_last(cfg: dict, device: torch.device | str) -> bool:
    """Whether model and input are channels-last in memory (auto: yes, on CUDA and on the CPU)."""
    value = setting(cfg, "channels_last")
    return True if value == "auto" else value
