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
import torch.nn.functional as F
from ray import tune

from data_pipeline.dataset import SegmentationDataset, make_loader
from data_pipeline.imbalance import build_sampler, class_pixel_frequencies, class_weights
from data_pipeline.trial_data import DataSpec
from models.checkpoint import WEIGHTS_FILE, read_meta, save_checkpoint
from models.factory import NORMALIZATION, build_model
from models.inference import normalize, predict_batch, to_labels
from models.losses import build_loss
from models.metrics import IGNORE_INDEX, confusion_matrix, mean_iou, pixel_accuracy

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


def train_segmentation(config: dict) -> None:
    cfg = {**trial_defaults(), **config}
    torch.set_num_threads(_trial_cpus(cfg))
    torch.manual_seed(cfg.get("seed", 0))
    device = _device()

    resize = cfg["resize"]
    train_split, val_split = DataSpec.from_config(cfg).train_val(resize)
    num_classes = len(train_split.class_names)
    generator = torch.Generator().manual_seed(cfg.get("seed", 0))
    sampler = build_sampler(cfg["sampler"], train_split.masks, num_classes, generator)
    # Cached splits make in-process loading fast enough for CPU training (bench/loader.py).
    train_loader = make_loader(
        SegmentationDataset(train_split, cfg["augmentation"], train=True), cfg["batch_size"],
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
        train_loss = _train_epoch(model, train_loader, loss_fn, optimizer, device)
        scheduler.step()
        val = _evaluate(model, val_loader, num_classes, device)
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


def _train_epoch(model, loader, loss_fn, optimizer, device) -> float:
    model.train()
    total, count = 0.0, 0
    for images, masks in loader:
        images = normalize(images.to(device, non_blocking=True), NORMALIZATION)
        loss = loss_fn(model(images), masks.to(device, non_blocking=True).long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(images)
        count += len(images)
    return total / max(count, 1)


def _evaluate(model, loader, num_classes: int, device) -> dict:
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    nll, count = 0.0, 0
    for images, masks in loader:
        probs = predict_batch(model, images, device=device, normalization=NORMALIZATION)
        masks = masks.to(device).long()
        conf += confusion_matrix(masks, to_labels(probs), num_classes)
        nll += F.nll_loss(probs.clamp_min(1e-8).log(), masks, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((masks != IGNORE_INDEX).sum())
    return {"val_miou": mean_iou(conf), "val_pixel_acc": pixel_accuracy(conf), "val_loss": nll / max(count, 1)}

