"""One training epoch and one evaluation pass: the loops the trainable runs, free of Ray so that
benchmarks and tests call the same code."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .inference import normalize, predict_batch, to_labels
from .metrics import IGNORE_INDEX, confusion_matrix, mean_iou, pixel_accuracy


def train_epoch(model, loader, loss_fn, optimizer, device, normalization: dict) -> float:
    """Trains over loader's uint8 batches once; returns the mean training loss per image."""
    model.train()
    total, count = torch.zeros((), device=device), 0
    for images, masks in loader:
        images = normalize(images.to(device, non_blocking=True), normalization)
        loss = loss_fn(model(images), masks.to(device, non_blocking=True).long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(images)  # summed on the device: no GPU sync per step
        count += len(images)
    return total.item() / max(count, 1)


def evaluate(model, loader, num_classes: int, device, normalization: dict) -> dict:
    """val_miou, val_pixel_acc and val_loss (NLL of the probabilities) over loader."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    nll, count = torch.zeros((), device=device), 0
    for images, masks in loader:
        probs = predict_batch(model, images, device=device, normalization=normalization)
        masks = masks.to(device).long()
        conf += confusion_matrix(masks, to_labels(probs), num_classes)
        nll += F.nll_loss(probs.clamp_min(1e-8).log(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((masks != IGNORE_INDEX).sum())
    return {"val_miou": mean_iou(conf), "val_pixel_acc": pixel_accuracy(conf), "val_loss": nll.item() / max(count, 1)}
