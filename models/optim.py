"""Optimisers, learning-rate schedules and training options of a trial.

Schedules step once per optimiser step (per iteration, inside models.training.train_epoch): a linear
warmup over `warmup_epochs`, then `cosine`, `poly` (power 0.9, as in DeepLab) or `constant` over the
remaining iterations of max_epochs. Per-iteration stepping makes short warmups (one epoch of a few
steps) smooth. Without warmup, cosine's lr at the start of epoch e is CosineAnnealingLR(T_max=
max_epochs)'s value for epoch e (the per-epoch schedule trials had before) and decays smoothly in
between.

AMP: `auto` is bf16 autocast on a CUDA device that supports it, else fp16 with a GradScaler, and off
on the CPU; an explicit bf16/fp16 request on the CPU runs without autocast (resolve_amp returns a
note for the trial log), so that one search space runs on CPU-only machines too.

channels_last: `auto` is on for every device. On the CPU (oneDNN) channels-last convolutions train
5-15% faster than NCHW here (bench/train_step.py --channels-last true: 1.12x for Unet-resnet18 at
128 px); the trials before these options already got most of that, since normalize's output is
channels-last in memory and convolutions follow their input's format. `false` is NCHW throughout.
"""
from __future__ import annotations

import math
from functools import partial

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
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1 - progress) ** POLY_POWER
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule over cfg['max_epochs'] epochs of steps_per_epoch steps (step it after
    every optimiser step). Its state_dict is the step count: a restored trial continues the curve."""
    steps_per_epoch = max(1, steps_per_epoch)
    factor = partial(lr_factor, schedule=setting(cfg, "schedule"),
                     warmup_steps=round(setting(cfg, "warmup_epochs") * steps_per_epoch),
                     total_steps=cfg["max_epochs"] * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- precision and memory format ---

def resolve_amp(cfg: dict, device: torch.device | str) -> tuple[torch.dtype | None, str | None]:
    """(autocast dtype or None for full precision, a note for the trial log or None)."""
    mode, device = setting(cfg, "amp"), torch.device(device)
    if mode == "off":
        return None, None
    if device.type != "cuda":
        note = None if mode == "auto" else f"amp: {mode} asked for, but there is no CUDA device; training in float32"
        return None, note
    if mode == "auto":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
    return AMP_DTYPES[mode], None


def build_scaler(amp_dtype: torch.dtype | None, device: torch.device | str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 has float32's range and needs none)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def resolve_channels_last(cfg: dict, device: torch.device | str) -> bool:
    """Whether model and input are channels-last in memory (auto: yes, on CUDA and on the CPU)."""
    value = setting(cfg, "channels_last")
    return True if value == "auto" else value
