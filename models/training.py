"""One training epoch and one evaluation pass: the loops the trainable runs, free of Ray so that
benchmarks and tests call the same code."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from labels import IGNORE

from .depthwise import float32_depthwise_backward
from .inference import normalize, predict_batch, to_labels
from .metrics import confusion_matrix, image_mious, iou_per_class, mean_iou, pixel_accuracy
from .open_set import UnknownScoring, flagged_as_unknown, known_class_head


def place_model(model: nn.Module, device, channels_last: bool = False) -> nn.Module:
    """Moves model to device, its 4-D weights channels-last in memory when asked (faster convolutions
    with cuDNN and oneDNN; train_epoch then hands the model channels-last input too). Its depthwise
    convolutions compute their gradients in float32 under CPU autocast (models.depthwise)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return float32_depthwise_backward(model.to(device=device, memory_format=memory_format))


def model_input(images: torch.Tensor, device, normalization: dict, channels_last: bool = False) -> torch.Tensor:
    """A loader's uint8 [B, H, W, 3] batch → normalised float [B, 3, H, W] on device, in the model's
    memory format (normalize yields channels-last strides already: a copy only for contiguous NCHW)."""
    images = normalize(images.to(device, non_blocking=True), normalization)
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def train_epoch(model, loader, loss_fn, optimizer, device, normalization: dict, *, scheduler=None,
                amp: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                grad_clip: float | None = None, channels_last: bool = False,
                frozen_norm: nn.Module | None = None) -> float:
    """Trains over loader's uint8 batches once; returns the mean training loss per image.

    scheduler: stepped after every optimiser step (models.optim.build_scheduler is per iteration).
    amp: autocast dtype of the forward pass (None: full precision); the loss is taken in float32.
    scaler: a GradScaler (fp16); grad_clip: max total gradient norm (None: no clipping), taken on
    unscaled gradients. channels_last: the input's memory format (place_model puts the model's).
    frozen_norm: a part of model (a pretrained encoder) whose BatchNorm layers normalise with the
    running statistics they have and do not update them; their scale and shift still train.
    """
    device = torch.device(device)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    model.train()
    if frozen_norm is not None:
        freeze_norm_statistics(frozen_norm)
    total, count = torch.zeros((), device=device), 0
    for images, masks in loader:
        images = model_input(images, device, normalization, channels_last)
        optimizer.zero_grad(set_to_none=True)  # before the forward pass: old gradients freed first
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(images)
        loss = loss_fn(logits.float(), masks.to(device, non_blocking=True).long())
        scaler.scale(loss).backward()
        _clip_gradients(model, optimizer, scaler, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach() * len(images)  # summed on the device: no GPU sync per step
        count += len(images)
    mean_loss = total.item() / max(count, 1)
    if not _all_finite(model.parameters()):
        raise TrainingDiverged(f"training diverged: the model's weights are no longer finite (mean loss of the "
                               f"epoch {mean_loss:g}); a lower lr, grad_clip or another loss may train")
    return mean_loss


class TrainingDiverged(RuntimeError):
    """The weights became nan or inf: every later epoch would train and score a broken model."""


def _all_finite(tensors) -> bool:
    # One host sync for all of them. A non-finite loss alone is not divergence: with fp16, GradScaler
    # skips the steps whose gradients overflowed and the weights stay as they were.
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def freeze_norm_statistics(module: nn.Module) -> None:
    """Puts module's BatchNorm layers in eval mode: batches are normalised with the running statistics,
    which stay as they are (MMSegmentation's norm_eval). A pretrained encoder then keeps the statistics
    of the data it was trained on instead of estimates from batches of a few images, which move with
    every batch's content."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def _clip_gradients(model, optimizer, scaler, max_norm: float | None) -> None:
    if max_norm is None:
        return
    scaler.unscale_(optimizer)  # a no-op for a disabled scaler
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # no host sync (error_if_nonfinite off)


def update_bn_statistics(model: nn.Module, loader, device, normalization: dict, *,
                         amp: torch.dtype | None = None, channels_last: bool = False,
                         frozen_norm: nn.Module | None = None) -> None:
    """Recomputes model's BatchNorm running statistics (a plain average over one pass) from loader's
    uint8 batches: torch's swa_utils.update_bn, fed normalised model input. frozen_norm: a part of
    model whose statistics stay as they are (train_epoch's frozen_norm)."""
    device = torch.device(device)
    frozen = list(frozen_norm.buffers()) if frozen_norm is not None else []
    kept = [buffer.clone() for buffer in frozen]
    inputs = (model_input(images, device, normalization, channels_last) for images, _ in loader)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        torch.optim.swa_utils.update_bn(inputs, model)
    for buffer, value in zip(frozen, kept):
        buffer.copy_(value)


def evaluate(model, loader, num_classes: int, device, normalization: dict,
             unknown: UnknownScoring | None = None, amp: torch.dtype | None = None) -> dict:
    """val_miou (dataset), val_image_miou (mean of per-image mIoU), val_pixel_acc, val_loss (NLL of
    the probabilities) and val_class_iou (IoU per label, None for a class absent from both the truth
    and the predictions) over loader.

    unknown: when the label space has an UNKNOWN class, also val_unknown_rejected and
    val_known_rejected (the shares of UNKNOWN and of known pixels the model flags as UNKNOWN); for an
    open-set model see evaluate_open_set. amp: the forward pass's autocast dtype (as in training)."""
    return _evaluate(model, loader, num_classes, device, normalization, unknown, amp)[0]


def evaluate_open_set(model, loader, num_classes: int, device, normalization: dict,
                      unknown: UnknownScoring, amp: torch.dtype | None = None) -> tuple[dict, list[dict]]:
    """evaluate() of an open-set model, whose pixels scoring below a threshold are rejected
    (models.open_set): every metric is taken at the threshold with the best val mIoU, reported as
    val_reject_threshold, with val_miou_no_reject beside it. Also returns the open-set curve (per
    candidate threshold: miou, unknown_rejected, known_rejected)."""
    return _evaluate(model, loader, num_classes, device, normalization, unknown, amp)


def _resized(plane: torch.Tensor, size) -> torch.Tensor:
    """[B, H, W] scores at size, bilinearly."""
    if plane.shape[-2:] == size:
        return plane
    return F.interpolate(plane[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _evaluate(model, loader, num_classes: int, device, normalization: dict, unknown: UnknownScoring | None,
              amp: torch.dtype | None):
    sweep = unknown.sweep(num_classes) if unknown and unknown.open_set else None
    head = known_class_head(model)
    if sweep is not None and unknown.rule == "magnitude":
        head.track_magnitude = True
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    nll, count = torch.zeros((), device=device), 0
    image_miou_sum, images_scored = torch.zeros((), dtype=torch.float64, device=device), 0
    kept = []  # open set: (labels, score bins) per batch, to take image mIoU at the chosen threshold
    for images, masks in loader:
        # At the size of the val label maps, which may be larger than the model's input.
        probs = predict_batch(model, images, tuple(masks.shape[-2:]), device=device, normalization=normalization,
                              amp=amp)
        masks, labels = masks.to(device).long(), to_labels(probs)
        scored = masks if sweep is None else torch.where(masks == unknown.unknown_label, IGNORE, masks)
        nll += F.nll_loss(probs.clamp_min(1e-8).log(), scored, ignore_index=IGNORE, reduction="sum")
        count += int((scored != IGNORE).sum())
        if sweep is not None:
            scores = (probs.max(dim=1).values if unknown.rule == "softmax"
                      else _resized(head.magnitude, masks.shape[-2:]))
            kept.append((labels.to(torch.uint8), sweep.add(masks, labels, scores).to(torch.uint8)))
            continue
        conf += confusion_matrix(masks, labels, num_classes)
        per_image = image_mious(masks, labels, num_classes)
        image_miou_sum += per_image.nansum()
        images_scored += int((~per_image.isnan()).sum())
    metrics, curve = {}, []
    if sweep is not None:
        best = sweep.best()
        conf = sweep.confusions()[best]
        for (labels, bins), (_, masks) in zip(kept, loader):
            per_image = image_mious(masks.to(device).long(), sweep.labels_at(labels, bins, best), num_classes)
            image_miou_sum += per_image.nansum()
            images_scored += int((~per_image.isnan()).sum())
        curve = sweep.curve()
        metrics = {"val_reject_threshold": curve[best]["threshold"], "val_miou_no_reject": curve[0]["miou"],
                   "val_unknown_rejected": curve[best]["unknown_rejected"],
                   "val_known_rejected": curve[best]["known_rejected"]}
    elif unknown is not None:
        flagged = flagged_as_unknown(conf, unknown.unknown_label)
        metrics = dict(zip(("val_unknown_rejected", "val_known_rejected"), flagged))
    class_iou = [None if math.isnan(v) else float(v) for v in iou_per_class(conf.cpu())]  # None: class absent
    return {"val_miou": mean_iou(conf), "val_image_miou": image_miou_sum.item() / max(images_scored, 1),
            "val_pixel_acc": pixel_accuracy(conf), "val_loss": nll.item() / max(count, 1), **metrics,
            "val_class_iou": class_iou}, curve
