"""The Ray Tune trainable: one trial = build a model from its config, train it epoch by epoch,
report val mIoU after each epoch (ASHA decides whether it goes on) and checkpoint the best weights.

Defined at module level with a stable name: Tune pickles it by reference for restores.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from ray import tune

from data_pipeline.dataset import SegmentationDataset, make_loader
from data_pipeline.imbalance import build_sampler, class_pixel_frequencies, class_weights
from data_pipeline.trial_data import DataSpec
from models.checkpoint import WEIGHTS_FILE, read_meta, save_checkpoint
from models.factory import NORMALIZATION, build_model
from models.losses import build_loss
from models.training import evaluate, train_epoch

from .space import trial_defaults

TRAIN_STATE_FILE = "train_state.pt"


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


def train_segmentation(config: dict) -> None:
    cfg = {**trial_defaults(), **config}
    cpus = _trial_cpus(cfg)
    torch.set_num_threads(cpus)
    torch.manual_seed(cfg.get("seed", 0))
    device = _device()

    resize = cfg["resize"]
    train_split, val_split = DataSpec.from_config(cfg).train_val(resize)
    num_classes = len(train_split.class_names)
    generator = torch.Generator().manual_seed(cfg.get("seed", 0))
    sampler = build_sampler(cfg["sampler"], train_split.masks, num_classes, generator)
    train_loader = make_loader(
        SegmentationDataset(train_split, cfg["augmentation"], train=True), cfg["batch_size"],
        workers=_loader_workers(cpus, device), pin_memory=device.type == "cuda",
        shuffle=sampler is None, sampler=sampler, drop_last=len(train_split) > cfg["batch_size"], generator=generator)
    val_loader = make_loader(SegmentationDataset(val_split, "none", train=False), max(cfg["batch_size"], 16))

    model = build_model(cfg["decoder"], cfg["backbone"], num_classes, cfg["encoder_weights"]).to(device)
    loss_fn = build_loss(cfg, _class_weights(cfg["class_weights"], train_split.masks, num_classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["max_epochs"])
    meta = {
        "decoder": cfg["decoder"], "backbone": cfg["backbone"], "encoder_weights": cfg["encoder_weights"],
        "num_classes": num_classes, "class_names": list(train_split.class_names),
        "input_size": [resize, resize], "normalization": NORMALIZATION,
        "val_images": list(val_split.file_names), "config": cfg,
    }

    start_epoch, best = 0, -math.inf
    restored = tune.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            start_epoch, best = _restore(directory, model, optimizer, scheduler, device)

    for epoch in range(start_epoch + 1, cfg["max_epochs"] + 1):
        started = time.perf_counter()
        train_loss = train_epoch(model, train_loader, loss_fn, optimizer, device, NORMALIZATION)
        scheduler.step()
        val = evaluate(model, val_loader, num_classes, device, NORMALIZATION)
        metrics = {**val, "train_loss": train_loss, "epoch": epoch,
                   "epoch_time_s": time.perf_counter() - started}
        if val["val_miou"] > best:
            best = val["val_miou"]
            metrics["best_val_miou"] = best
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(directory, model, {**meta, "epoch": epoch, "metrics": val})
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           Path(directory) / TRAIN_STATE_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        else:
            tune.report({**metrics, "best_val_miou": best})


def _class_weights(mode: str, masks, num_classes: int) -> torch.Tensor | None:
    if mode == "none":
        return None
    return torch.from_numpy(class_weights(class_pixel_frequencies(masks, num_classes), mode))


def _restore(directory: str, model, optimizer, scheduler, device) -> tuple[int, float]:
    """Loads weights and optimiser state of a checkpoint; returns (its epoch, its val mIoU)."""
    meta = read_meta(directory)
    model.load_state_dict(torch.load(Path(directory) / WEIGHTS_FILE, map_location=device, weights_only=True))
    state = torch.load(Path(directory) / TRAIN_STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return meta["epoch"], meta["metrics"]["val_miou"]
