"""Optimisers, learning-rate schedules and training options of a trial.

Schedules step once per optimiser step (per iteration, inside models.training.train_epoch): a linear
warmup over `warmup_epochs`, then `cosine`, `poly` (power 0.9, as in DeepLab) or `constant` over the
remaining iterations of max_epochs. Per-iteration stepping makes short warmups (one epoch of a few
steps) smooth. Without warmup, cosine's lr at the start of epoch e is CosineAnnealingLR(T_max=
max_epochs)'s value for epoch e, decaying smoothly in between.

Parameter groups: a segmentation model's encoder and the rest (decoder, head) are two groups, so a
pretrained encoder can train at lr x `encoder_lr_scale` and sit frozen (lr 0) for its first
`freeze_encoder_epochs` while the randomly initialised decoder settles.

AMP: `auto` is bf16 autocast on a CUDA device that supports it, else fp16 with a GradScaler. On the
CPU, `auto` and `bf16` are bf16 autocast where the CPU runs bf16 convolutions in hardware (AMX tiles
or AVX512-BF16, through oneDNN); elsewhere bf16 is emulated and slower than float32, so `auto` stays
float32 and an explicit bf16/fp16 request trains in float32 with a note for the trial log. One
search space runs on every machine. bench/README.md has the measured speed-ups.

channels_last: `auto` is on for every device: oneDNN and cuDNN run channels-last convolutions
faster, and normalize's output is channels-last in memory already. `false` is NCHW throughout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from checks import number, one_of
from errors import UserError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")
ENCODER_NORMS = ("train", "frozen")
POLY_POWER = 0.9
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _channels_last(value) -> None:
    if value != "auto" and not isinstance(value, bool):
        raise UserError(f"channels_last must be auto, true or false, got {value!r}")


# Trial parameters of training, each with the check of one value and its default (search.space
# merges them into its TRIAL_PARAMS). lr and weight_decay are search.space's own.
TRAINING_PARAMS: dict = {
    "optimizer": (one_of(OPTIMIZERS), "adamw"),
    "momentum": (number(0, 1, high_open=True, name="momentum"), 0.9),  # sgd only (Nesterov when > 0)
    "schedule": (one_of(SCHEDULES), "cosine"),
    "warmup_epochs": (number(low=0, name="warmup_epochs", note=" (0 = no warmup)"), 0),
    # a pretrained encoder often wants a smaller lr than the decoder and head, which start from scratch
    "encoder_lr_scale": (number(0, 1, low_open=True, name="encoder_lr_scale", note=" (the encoder's lr = lr x scale)"),
                         1.0),
    "freeze_encoder_epochs": (number(low=0, name="freeze_encoder_epochs", note=" (its lr is 0 until then)"), 0),
    # frozen: the encoder's BatchNorm layers keep the running statistics they came with (pretrained ones)
    "encoder_norm": (one_of(ENCODER_NORMS), "train"),
    "grad_clip": (number(low=0, low_open=True, optional=True, name="grad_clip",
                         expected="null (no clipping) or a max gradient norm > 0"), None),
    "amp": (one_of(AMP_MODES), "auto"),
    "channels_last": (_channels_last, "auto"),
    "swa_epochs": (number(low=0, integer=True, name="swa_epochs", note=" (0 = no weight averaging)"), 0),
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

def param_groups(model: nn.Module, cfg: dict) -> list[dict]:
    """The optimiser's parameter groups: a segmentation model's encoder first, at lr x
    encoder_lr_scale, then everything else (decoder, head) at lr; a model without an `encoder` is
    one group. build_scheduler gives each group its own curve, in this order."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        return [{"params": list(model.parameters()), "lr": cfg["lr"]}]
    own = {id(p) for p in encoder.parameters()}
    return [{"params": list(encoder.parameters()), "lr": cfg["lr"] * setting(cfg, "encoder_lr_scale")},
            {"params": [p for p in model.parameters() if id(p) not in own], "lr": cfg["lr"]}]


def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, Nesterov) over param_groups with cfg's lr and weight_decay. AdamW is
    fused on CUDA: one kernel per step, and a GradScaler then skips steps without a host sync."""
    groups = param_groups(model, cfg)
    if setting(cfg, "optimizer") == "sgd":
        momentum = setting(cfg, "momentum")
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=momentum, nesterov=momentum > 0,
                               weight_decay=cfg["weight_decay"])
    fused = True if groups[0]["params"] and groups[0]["params"][0].is_cuda else None
    return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=fused)


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
    A shortened curve can be planned again, to a later end up to the full schedule's (epochs turned
    out faster than first measured): it decays from where it is then, so the lr never jumps.

    frozen_steps: 0 for the steps before it (a frozen encoder), then the curve as it is there.
    """

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int, frozen_steps: int = 0):
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps
        self.full_steps = total_steps  # the schedule's own length, which end_early never passes
        self.frozen_steps = frozen_steps
        self.cut_step, self.cut_factor = None, 1.0  # where end_early took over, and the multiplier there

    def __call__(self, step: int) -> float:
        if step < self.frozen_steps:
            return 0.0
        if self.cut_step is None or step < self.cut_step:
            return lr_factor(step, schedule=self.schedule, warmup_steps=self.warmup_steps,
                             total_steps=self.total_steps)
        progress = (step - self.cut_step) / max(1, self.total_steps - self.cut_step)
        return self.cut_factor * _decay(self.schedule, progress)

    def end_early(self, step: int, total_steps: int) -> None:
        total_steps = min(total_steps, self.full_steps)
        if total_steps == self.total_steps or (self.cut_step is None and total_steps > self.total_steps):
            return
        self.cut_factor, self.cut_step = self(step), step
        self.total_steps = max(total_steps, step + 1)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule over cfg['max_epochs'] epochs of steps_per_epoch steps (step it after
    every optimiser step): one LrCurve per parameter group (param_groups), the encoder's held at 0
    for freeze_encoder_epochs. Its state_dict is the step count and the curves: a restored trial
    continues them."""
    steps_per_epoch = max(1, steps_per_epoch)
    shape = {"schedule": setting(cfg, "schedule"), "total_steps": cfg["max_epochs"] * steps_per_epoch,
             "warmup_steps": round(setting(cfg, "warmup_epochs") * steps_per_epoch)}
    frozen = round(setting(cfg, "freeze_encoder_epochs") * steps_per_epoch)
    curves = [LrCurve(**shape, frozen_steps=frozen if i == 0 and len(optimizer.param_groups) > 1 else 0)
              for i in range(len(optimizer.param_groups))]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, curves)


def end_schedule_early(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Every group's curve ends at total_steps (at most its full length) from the current step on
    (LrCurve.end_early)."""
    step = scheduler.last_epoch  # LambdaLR counts optimiser steps in last_epoch
    for curve in scheduler.lr_lambdas:
        curve.end_early(step, total_steps)


def schedule_steps(scheduler: torch.optim.lr_scheduler.LambdaLR) -> int:
    """The steps the schedule lasts (fewer than max_epochs' when end_schedule_early shortened it)."""
    return scheduler.lr_lambdas[0].total_steps


# --- precision and memory format ---

def resolve_amp(cfg: dict, device: torch.device | str) -> tuple[torch.dtype | None, str | None]:
    """(autocast dtype or None for full precision, a note for the trial log or None)."""
    mode, device = setting(cfg, "amp"), torch.device(device)
    if mode == "off":
        return None, None
    if device.type != "cuda":
        if mode in ("auto", "bf16") and cpu_has_fast_bf16():
            return torch.bfloat16, None
        notes = {"bf16": "amp: bf16 asked for, but this CPU has neither AMX tiles nor AVX512-BF16; "
                         "training in float32",
                 "fp16": "amp: fp16 runs on CUDA devices only; training in float32"}
        return None, notes.get(mode)
    if mode == "auto":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), None
    return AMP_DTYPES[mode], None


def inference_amp(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of inference outside a trial (ensembles): what `amp: auto` trains with."""
    return resolve_amp({"amp": "auto"}, device)[0]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions in hardware (AMX tiles or AVX512-BF16 instructions, with
    oneDNN's bf16 support)."""
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_scaler(amp_dtype: torch.dtype | None, device: torch.device | str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 has float32's range and needs none)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def resolve_channels_last(cfg: dict, device: torch.device | str) -> bool:
    """Whether model and input are channels-last in memory (auto: yes, on CUDA and on the CPU)."""
    value = setting(cfg, "channels_last")
    return True if value == "auto" else value
