"""Overhead of the project's training step over a plain PyTorch loop, measured in the same run.

project: models.training.train_epoch (the trainable's loop: uint8 batches normalised on the device,
         autocast, GradScaler, grad clipping hook, per-iteration lr schedule) with models.optim's
         optimiser and schedule, over N pre-made uint8 batches (on the host, pinned on CUDA, as a
         loader hands them over).
plain:   the obvious hand-written loop (zero_grad, forward, cross-entropy, backward, AdamW step) over
         the same batches already normalised as float on the device.

Same model (smp Unet-resnet18, random init), batches, loss (ce), optimiser (AdamW), precision and
memory format (--amp / --channels-last as the trial parameters resolve them on --device; the plain
loop then autocasts by hand). When those are not float32 / NCHW, the project step in float32 / NCHW
runs too, for `speedup_vs_fp32_nchw`. The steps alternate within each round, order reversed every
other round; `overhead` is the median over rounds of project/plain - 1 (each pair ran back to back,
so load from other processes on a shared machine hits both sides alike).

    python bench/train_step.py                     # CPU, 1 thread (a trial's default cpus_per_trial)
    python bench/train_step.py --device cuda --size 256 --batch-size 32 --batches 20 --rounds 9

Last line: JSON with the median step times, `overhead` (and two cross-checks) and
`speedup_vs_fp32_nchw`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn

from labels import IGNORE
from models.factory import build_model
from models.inference import normalize
from models.losses import build_loss
from models.optim import AMP_MODES, build_optimizer, build_scaler, build_scheduler, resolve_amp, resolve_channels_last
from models.training import place_model, train_epoch
from models.weights import DEFAULT_NORMALIZATION

LR, WEIGHT_DECAY = 1e-3, 1e-4


def make_batches(count: int, batch_size: int, size: int, num_classes: int, device: torch.device) -> list:
    """uint8 [B, S, S, 3] images and uint8 masks, as SegmentationDataset's loader delivers them."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, generator=generator)
        masks = torch.randint(0, num_classes, (batch_size, size, size), dtype=torch.uint8, generator=generator)
        if device.type == "cuda":
            images, masks = images.pin_memory(), masks.pin_memory()
        batches.append((images, masks))
    return batches


def fresh_model(num_classes: int, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    return place_model(build_model("Unet", "resnet18", num_classes), device, channels_last)


class ProjectStep:
    """train_epoch over the uint8 batches, with the trainable's optimiser, schedule and options."""

    def __init__(self, batches, num_classes, device, amp, channels_last):
        cfg = {"lr": LR, "weight_decay": WEIGHT_DECAY, "max_epochs": 1000}
        self.batches, self.device, self.amp, self.channels_last = batches, device, amp, channels_last
        self.model = fresh_model(num_classes, device, channels_last)
        self.loss_fn = build_loss({"loss": "ce"}).to(device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, len(batches))
        self.scaler = build_scaler(amp, device)

    def __call__(self) -> None:
        train_epoch(self.model, self.batches, self.loss_fn, self.optimizer, self.device, DEFAULT_NORMALIZATION,
                    scheduler=self.scheduler, amp=self.amp, scaler=self.scaler, channels_last=self.channels_last)


class PlainStep:
    """The hand-written loop over float batches already on the device."""

    def __init__(self, batches, num_classes, device, amp, channels_last):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batches = [(normalize(images.to(device), DEFAULT_NORMALIZATION).contiguous(memory_format=memory_format),
                         masks.to(device).long()) for images, masks in batches]
        self.device, self.amp = device, amp
        self.model = fresh_model(num_classes, device, channels_last)
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def __call__(self) -> None:
        self.model.train()
        for images, masks in self.batches:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.model(images)
            loss = self.loss_fn(logits.float(), masks)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        loss.item()  # one sync at the end, as train_epoch's


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(steps: dict, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step per round after one untimed round; order reversed every other round."""
    names = list(steps)
    for name in names:
        steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(steps[name], device))
    return times


def overheads(project: list[float], plain: list[float]) -> dict:
    """project/plain - 1 three ways: the median of the per-round ratios (each pair ran back to back),
    the ratio of the fastest runs (least disturbed by other processes), the ratio of the medians."""
    return {"overhead": round(statistics.median(a / b for a, b in zip(project, plain)) - 1, 4),
            "overhead_of_minima": round(min(project) / min(plain) - 1, 4),
            "overhead_of_medians": round(statistics.median(project) / statistics.median(plain) - 1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", choices=AMP_MODES, default="auto", help="as the trial parameter (auto: off on CPU)")
    parser.add_argument("--channels-last", choices=("auto", "true", "false"), default="auto")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on the CPU, as a trial with cpus_per_trial 1; torch's on CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    cfg = {"amp": args.amp, "channels_last": {"true": True, "false": False}.get(args.channels_last, "auto")}
    amp, note = resolve_amp(cfg, device)
    if note:
        print(note)
    channels_last = resolve_channels_last(cfg, device)

    batches = make_batches(args.batches, args.batch_size, args.size, args.classes, device)
    steps = {"project": ProjectStep(batches, args.classes, device, amp, channels_last),
             "plain": PlainStep(batches, args.classes, device, amp, channels_last)}
    if amp is not None or channels_last:
        steps["project_fp32_nchw"] = ProjectStep(batches, args.classes, device, None, False)
    times = measure(steps, args.rounds, device)
    for name, values in times.items():
        print(f"{name:18s} " + " ".join(f"{v:.3f}" for v in values) + " s")
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "model": "Unet-resnet18",
        "size": args.size, "batch_size": args.batch_size, "batches": args.batches, "rounds": args.rounds,
        "amp": str(amp).replace("torch.", "") if amp else "off", "channels_last": channels_last,
        **{f"{name}_step_ms": round(1000 * m / args.batches, 2) for name, m in median.items()},
        **overheads(times["project"], times["plain"]),
    }
    if "project_fp32_nchw" in times:
        result["speedup_vs_fp32_nchw"] = round(
            statistics.median(a / b for a, b in zip(times["project_fp32_nchw"], times["project"])), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
