"""Optimisers, per-iteration lr schedules, AMP / channels_last resolution and the checks of the
training trial parameters (models.optim)."""
import math

import pytest
import torch
import torch.nn as nn

from errors import UserError
from models.factory import build_model
from models.optim import (TRAINING_PARAMS, build_optimizer, build_scaler, build_scheduler, cpu_has_fast_bf16,
                          resolve_amp, resolve_channels_last, setting)
from models.training import place_model
from search.space import load_space

LR = 0.1


def _lr_curve(cfg: dict, steps_per_epoch: int) -> list[float]:
    """The lr of every optimiser step of cfg's max_epochs, stepping the schedule as train_epoch does."""
    optimizer = build_optimizer(nn.Linear(2, 2), {"lr": LR, "weight_decay": 0.0, **cfg})
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg["max_epochs"] * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_without_warmup_starts_each_epoch_at_the_per_epoch_cosine_of_before():
    lrs = _lr_curve({"schedule": "cosine", "max_epochs": 4}, steps_per_epoch=2)
    # CosineAnnealingLR(T_max=4) stepped per epoch: 0.1 * (1 + cos(pi * e / 4)) / 2
    assert lrs[0::2] == pytest.approx([0.1, 0.0853553, 0.05, 0.0146447], abs=1e-7)
    assert lrs[1] == pytest.approx(0.05 * (1 + math.cos(math.pi / 8)))  # between epochs: smooth
    assert lrs == sorted(lrs, reverse=True)


def test_warmup_is_linear_per_iteration_then_cosine_over_the_rest():
    lrs = _lr_curve({"schedule": "cosine", "warmup_epochs": 1, "max_epochs": 4}, steps_per_epoch=3)
    assert lrs[:3] == pytest.approx([LR / 3, 2 * LR / 3, LR])  # (step + 1) / 3 warmup steps
    decay_steps = 9
    assert lrs[3:] == pytest.approx([LR * 0.5 * (1 + math.cos(math.pi * k / decay_steps)) for k in range(9)])
    assert lrs[3 + 3] == pytest.approx(LR * 0.75)  # a third of the way: (1 + cos(pi / 3)) / 2


def test_poly_decays_with_power_0_9_after_warmup():
    lrs = _lr_curve({"schedule": "poly", "warmup_epochs": 1, "max_epochs": 3}, steps_per_epoch=2)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1 * 0.75 ** 0.9, 0.1 * 0.5 ** 0.9, 0.1 * 0.25 ** 0.9])


def test_constant_keeps_the_lr_after_warmup_and_half_an_epoch_warmup_works():
    assert _lr_curve({"schedule": "constant", "max_epochs": 2}, steps_per_epoch=3) == pytest.approx([LR] * 6)
    lrs = _lr_curve({"schedule": "constant", "warmup_epochs": 0.5, "max_epochs": 2}, steps_per_epoch=4)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_a_restored_scheduler_continues_the_curve():
    cfg = {"schedule": "poly", "warmup_epochs": 1, "max_epochs": 4, "lr": LR, "weight_decay": 0.0}
    uninterrupted = _lr_curve(cfg, steps_per_epoch=3)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, 3)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, 3)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(uninterrupted[5])


def test_ending_a_schedule_early_decays_from_the_lr_reached_to_zero_and_survives_a_restore():
    cfg = {"schedule": "cosine", "max_epochs": 10, "lr": LR, "weight_decay": 0.0}
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, 2)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    reached = optimizer.param_groups[0]["lr"]
    curve = scheduler.lr_lambdas[0]
    curve.end_early(4, 20)  # not shorter: nothing changes
    assert curve.total_steps == 20 and curve.cut_step is None
    curve.end_early(4, 8)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([reached * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # annealed by the new end
    restored = build_scheduler(build_optimizer(nn.Linear(2, 2), cfg), cfg, 2)
    restored.load_state_dict(scheduler.state_dict())
    assert [restored.lr_lambdas[0](k) for k in range(10)] == [curve(k) for k in range(10)]


def test_sgd_and_adamw_get_the_trial_hyperparameters():
    model = nn.Linear(2, 2)
    sgd = build_optimizer(model, {"optimizer": "sgd", "momentum": 0.85, "lr": 0.02, "weight_decay": 1e-4})
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.02, 0.85, True, 1e-4)
    plain = build_optimizer(model, {"optimizer": "sgd", "momentum": 0, "lr": 0.02, "weight_decay": 0})
    assert plain.param_groups[0]["nesterov"] is False  # torch refuses Nesterov without momentum
    adamw = build_optimizer(model, {"lr": 3e-4, "weight_decay": 0.05})  # adamw is the default
    assert isinstance(adamw, torch.optim.AdamW)
    assert (adamw.param_groups[0]["lr"], adamw.param_groups[0]["weight_decay"]) == (3e-4, 0.05)
    assert sum(p.numel() for g in adamw.param_groups for p in g["params"]) == 6


def test_cpu_amp_is_bf16_where_the_cpu_has_amx_and_otherwise_float32_with_a_note():
    fast = cpu_has_fast_bf16()
    assert resolve_amp({}, "cpu") == ((torch.bfloat16, None) if fast else (None, None))
    assert resolve_amp({"amp": "off"}, "cpu") == (None, None)
    modes = ("fp16",) if fast else ("bf16", "fp16")
    for mode in modes:
        dtype, note = resolve_amp({"amp": mode}, "cpu")
        assert dtype is None and mode in note and "\n" not in note
    if fast:
        assert resolve_amp({"amp": "bf16"}, "cpu") == (torch.bfloat16, None)
    assert resolve_amp({"amp": "bf16"}, "cuda")[0] is torch.bfloat16  # no CUDA call for explicit modes
    assert resolve_amp({"amp": "fp16"}, "cuda")[0] is torch.float16
    assert resolve_amp({"amp": "off"}, "cuda") == (None, None)
    assert not build_scaler(None, "cpu").is_enabled() and not build_scaler(torch.bfloat16, "cpu").is_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_amp_on_cuda_prefers_bf16():
    dtype, _ = resolve_amp({}, "cuda")
    assert dtype is (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert build_scaler(torch.float16, "cuda").is_enabled()


def test_channels_last_is_on_unless_switched_off_and_place_model_converts_the_weights():
    assert resolve_channels_last({}, "cpu") is True and resolve_channels_last({}, "cuda") is True
    assert resolve_channels_last({"channels_last": False}, "cpu") is False
    assert resolve_channels_last({"channels_last": False}, "cuda") is False
    model = place_model(build_model("FPN", "resnet18", 3), "cpu", channels_last=True)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    model = place_model(model, "cpu", channels_last=False)
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name, value, words", [
    ("optimizer", "adam", "optimizer: unknown value 'adam'; choose one of adamw, sgd"),
    ("schedule", "step", "schedule: unknown value 'step'; choose one of cosine, poly, constant"),
    ("amp", True, "amp: unknown value True; choose one of auto, off, bf16, fp16"),
    ("momentum", 1.0, "momentum must be a number in [0, 1), got 1.0"),
    ("warmup_epochs", -1, "warmup_epochs must be a number >= 0"),
    ("grad_clip", 0, "grad_clip must be null (no clipping) or a max gradient norm > 0, got 0"),
    ("grad_clip", "big", "got 'big'"),
    ("channels_last", 1, "channels_last must be auto, true or false, got 1"),
    ("swa_epochs", 1.5, "swa_epochs must be an integer >= 0"),
    ("encoder_norm", "fixed", "unknown value 'fixed'; choose one of train, frozen"),
])
def test_bad_values_are_one_line_user_errors_naming_the_value(name, value, words):
    with pytest.raises(UserError) as error:
        setting({name: value}, name)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_defaults_pass_their_own_checks_and_good_values_pass():
    for name, (check, default) in TRAINING_PARAMS.items():
        check(default)
    for name, value in [("optimizer", "sgd"), ("momentum", 0.0), ("warmup_epochs", 2), ("warmup_epochs", 0.5),
                        ("grad_clip", 1.0), ("grad_clip", 5), ("amp", "fp16"), ("channels_last", True),
                        ("swa_epochs", 3), ("encoder_norm", "frozen")]:
        assert setting({name: value}, name) == value


def test_the_space_file_rejects_a_bad_training_value_before_ray_starts(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("space:\n  optimizer: {choice: [adamw, adam]}\n")
    with pytest.raises(UserError, match="space.optimizer.*unknown value 'adam'; choose one of adamw, sgd"):
        load_space(path)
    path.write_text("space:\n  optimizer: sgd\n  momentum: {uniform: [0.8, 0.99], when: {optimizer: sgd}}\n"
                    "  schedule: {choice: [cosine, poly]}\n  swa_epochs: 2\n  grad_clip: {choice: [null, 1.0]}\n")
    assert [p.name for p in load_space(path).params] == ["optimizer", "momentum", "schedule", "swa_epochs", "grad_clip"]
