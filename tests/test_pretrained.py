"""Pretrained encoders: the input normalisation each one expects (read from its pretrained config and
kept in the checkpoint), training settings for them (encoder lr, a frozen start), and the real
EfficientNet-Lite weights of the shared offline cache (skipped where ../shared is absent)."""
import json
import shutil

import pytest
import timm
import torch

from errors import UserError
from models.checkpoint import load_checkpoint
from models.factory import build_model, cached_weights, input_normalization
from models.optim import build_optimizer, build_scheduler, end_schedule_early, param_groups
from models.weights import DEFAULT_NORMALIZATION
from search.trainable import build_trial, restore, run_epochs

from .conftest import SMP_RESNET18_REVISION, put_in_hf_cache, run_cli, use_hub_cache

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline Hugging Face hub cache."""
    use_hub_cache(monkeypatch, tmp_path / "hub")
    return tmp_path / "hub"


def test_normalisation_comes_from_the_encoders_pretrained_config(hub):
    # timm keeps it in the model's pretrained_cfg: known without any file
    assert input_normalization("tu-tf_efficientnet_lite0", "imagenet") == {"mean": [0.5] * 3, "std": [0.5] * 3}
    cfg = timm.models.get_pretrained_cfg("test_resnet.r160_in1k")
    assert input_normalization("tu-test_resnet", "imagenet") == {"mean": list(cfg.mean), "std": list(cfg.std)}
    # smp-hub repos keep it in their config.json, beside the weights (smp's get_preprocessing_params)
    assert input_normalization("resnet18", "imagenet") == DEFAULT_NORMALIZATION  # no config.json cached
    config = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    put_in_hf_cache(hub, "smp-hub/resnet18.imagenet", "config.json", json.dumps(config).encode(), SMP_RESNET18_REVISION)
    assert input_normalization("ResNet18", "imagenet") == config
    # random init: the documented default
    assert input_normalization("tu-tf_efficientnet_lite0", None) == DEFAULT_NORMALIZATION
    with pytest.raises(UserError, match="has no encoder_weights 'in22k'"):
        input_normalization("tu-test_resnet", "in22k")


def _trial_config(sample_root, **overrides):
    return {"data_root": str(sample_root), "decoder": "FPN", "backbone": "tu-test_resnet", "encoder_weights": None,
            "resize": 64, "batch_size": 8, "lr": 1e-3, "max_epochs": 2, "augmentation": "none", **overrides}


def _keep_checkpoint(destination):
    """A report function that keeps the trial's latest checkpoint at destination."""
    def report(metrics, directory):
        if directory:
            shutil.copytree(directory, destination, dirs_exist_ok=True)
    return report


def test_a_trial_trains_evaluates_and_checkpoints_with_its_encoders_normalisation(sample_root, hub, tmp_path):
    pretrained = timm.create_model("test_resnet").state_dict()
    put_in_hf_cache(hub, "timm/test_resnet.r160_in1k", "model.safetensors", pretrained)
    trial = build_trial(_trial_config(sample_root, encoder_weights="imagenet"))
    expected = input_normalization("tu-test_resnet", "imagenet")
    assert expected != DEFAULT_NORMALIZATION and trial.normalization == expected
    run_epochs(trial, _keep_checkpoint(tmp_path / "ckpt"))
    _, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["normalization"] == expected
    imagenet = build_trial(_trial_config(sample_root, encoder_weights="imagenet", normalization="imagenet"))
    assert imagenet.normalization == DEFAULT_NORMALIZATION
    assert build_trial(_trial_config(sample_root)).normalization == DEFAULT_NORMALIZATION


def test_the_encoder_gets_its_own_lr_and_can_start_frozen():
    model = build_model("Unet", "resnet18", 3)
    cfg = {"lr": 1e-2, "weight_decay": 0.0, "max_epochs": 8, "encoder_lr_scale": 0.1, "freeze_encoder_epochs": 1}
    groups = param_groups(model, cfg)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), 1e-2]
    encoder = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups[0]["params"]} == encoder
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, {**cfg, "schedule": "constant"}, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [lr[0] for lr in lrs[:5]] == [0.0] * 5  # the first epoch: the encoder is frozen
    assert all(lr == [pytest.approx(1e-3), pytest.approx(1e-2)] for lr in lrs[5:])
    end_schedule_early(scheduler, total_steps=30)  # both groups' curves end there, not at 40
    assert [c.total_steps for c in scheduler.lr_lambdas] == [30, 30]


def test_a_frozen_encoder_does_not_move_and_a_restore_keeps_both_curves(sample_root, tmp_path):
    cfg = _trial_config(sample_root, backbone="resnet18", freeze_encoder_epochs=1, encoder_lr_scale=0.5,
                        max_epochs=2)
    trial = build_trial(cfg)
    before = [p.detach().clone() for p in trial.model.encoder.parameters()]
    trial.last_epoch = 1
    run_epochs(trial, _keep_checkpoint(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(before, trial.model.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, trial.model.decoder.parameters()))
    again = build_trial(cfg)
    restore(again, tmp_path / "ckpt")
    assert [c.frozen_steps for c in again.scheduler.lr_lambdas] == [len(again.train_loader), 0]
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * again.optimizer.param_groups[1]["lr"])


def test_the_shared_efficientnet_lite_weights_load_with_their_normalisation(shared_weights, sample_root):
    for backbone in ("tu-tf_efficientnet_lite0", "timm-tf_efficientnet_lite0"):
        found, hint = cached_weights(backbone, "imagenet")
        assert found is not None and found.is_file() and hint == ""
        assert input_normalization(backbone, "imagenet") == {"mean": [0.5] * 3, "std": [0.5] * 3}
    model = build_model("Unet", "tu-tf_efficientnet_lite0", 3, encoder_weights="imagenet")
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=True, features_only=True)
    stem = model.encoder.model.conv_stem.weight
    assert torch.equal(stem, reference.conv_stem.weight)
    trial = build_trial(_trial_config(sample_root, backbone="tu-tf_efficientnet_lite0", encoder_weights="imagenet",
                                      max_epochs=1))
    assert trial.meta["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_dry_run_says_which_pretrained_encoders_are_cached_and_launch_refuses_missing_ones(
        sample_root, hub, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("experiment: {num_samples: 1, max_epochs: 1}\n"
                     "space:\n  backbone: {choice: [resnet18, tu-test_resnet]}\n  encoder_weights: imagenet\n"
                     "  resize: 64\n")
    put_in_hf_cache(hub, "timm/test_resnet.r160_in1k", "model.safetensors", timm.create_model("test_resnet").state_dict())
    result = run_cli("launch.py", "--space", space, "--data", sample_root, "--dry-run", "--storage", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    cached = next(line for line in lines if line.strip().startswith("tu-test_resnet imagenet"))
    assert "cached (" in cached and "input mean" in cached
    missing = next(line for line in lines if line.strip().startswith("resnet18 imagenet"))
    assert "MISSING" in missing and "hf download smp-hub/resnet18.imagenet" in missing
    result = run_cli("launch.py", "--space", space, "--data", sample_root, "--no-wandb", "--storage", tmp_path)
    assert result.returncode == 2 and not list(tmp_path.glob("search-*"))
    assert result.stderr.startswith("error: space: backbone resnet18 with encoder_weights 'imagenet' needs "
                                    "smp-hub/resnet18.imagenet") and result.stderr.count("\n") == 1
