"""Class probabilities at a target resolution: one code path for training, ensembles and tests."""
from __future__ import annotations

import functools
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


TTA_MODES = ("none", "flip", "flip+scales")
TTA_SCALES = (0.75, 1.25)  # besides 1.0, for flip+scales


def _views(tta: str) -> list[tuple[float, bool]]:
    """(scale, horizontal flip) pairs that a TTA mode averages over."""
    if tta not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {tta!r}; choose one of {', '.join(TTA_MODES)}")
    views = [(1.0, False)] + ([(1.0, True)] if tta != "none" else [])
    if tta == "flip+scales":
        views += [(scale, flip) for scale in TTA_SCALES for flip in (False, True)]
    return views


def normalize(images: torch.Tensor, normalization: dict) -> torch.Tensor:
    """uint8 [B, H, W, 3] images, as data loaders deliver them, → float32 [B, 3, H, W] model input.

    Loaders hand over the stored uint8 pixels and the conversion happens here, on the model's device:
    a quarter of the bytes to move between loader workers and to the GPU, and no per-sample
    transposition (the result is channels-last in memory, which convolutions take as it is).
    """
    mean, std = _pixel_statistics(tuple(normalization["mean"]), tuple(normalization["std"]), images.device)
    return ((images.float() - mean) / std).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _pixel_statistics(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std in pixel units on device, made once: a tensor built from a list on a GPU is a
    blocking host-to-device copy, which would stall every training step."""
    return torch.tensor(mean, device=device) * 255, torch.tensor(std, device=device) * 255


@torch.no_grad()
def predict_batch(model: nn.Module, images: torch.Tensor, out_size: tuple[int, int] | None = None,
                  device: str | torch.device = "cpu", tta: str = "none", normalization: dict | None = None,
                  amp: torch.dtype | None = None) -> torch.Tensor:
    """Softmax probabilities [B, C, H, W] (float32, on device) for a batch of images: uint8 [B, H, W, 3]
    ones (from a loader) are normalised with normalization ({"mean", "std"}) first, float [B, 3, H, W]
    ones are taken as model input.

    Logits are resized bilinearly to out_size (default: the input size) before the softmax:
    resizing probabilities and then taking the argmax beats resizing labels. With TTA the
    probabilities of flipped and rescaled views (sides kept multiples of 32) are averaged. amp: the
    autocast dtype of the model's forward pass (None: full precision); the softmax is in float32.
    """
    model.eval()
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        if normalization is None:
            raise ValueError("uint8 images need the model's normalization")
        images = normalize(images, normalization)
    out_size = tuple(out_size or images.shape[-2:])
    views = _views(tta)
    total = None
    for scale, flip in views:
        view = images
        if scale != 1.0:
            size = [max(32, round(side * scale / 32) * 32) for side in images.shape[-2:]]
            view = F.interpolate(view, size=size, mode="bilinear", align_corners=False)
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            logits = model(view.flip(-1) if flip else view).float()
        logits = logits.flip(-1) if flip else logits
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        total = probs if total is None else total + probs
    return total / len(views)


def to_labels(probs: torch.Tensor) -> torch.Tensor:
    """Argmax over the class dimension of [B, C, H, W]; first class wins ties.

    `max(dim=1).indices` gives the same answer as `argmax(dim=1)`, several times faster on the CPU.
    """
    return probs.max(dim=1).indices


def predict_probs(model: nn.Module, batches: Iterable, out_size: tuple[int, int] | None = None,
                  device: str | torch.device = "cpu", tta: str = "none", normalization: dict | None = None,
                  amp: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """predict_batch over batches; a batch is an image tensor or an (images, ...) tuple."""
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield predict_batch(model, images, out_size, device, tta, normalization, amp)
