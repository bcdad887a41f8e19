"""The cost levers of a trial on a CPU: training images per second of the trainable's own loop
(models.training.train_epoch with models.optim's AdamW and schedule) for decoder x backbone x input
size x batch size x precision, on synthetic uint8 batches, one torch thread (a trial's default
cpus_per_trial). Precision: off = float32, auto = what a trial gets here (bf16 autocast on a CPU with
AMX tiles, models.optim.resolve_amp).

    .venv/bin/python bench/epoch_cost.py [--decoders Unet FPN] [--backbones resnet18 mobilenet_v2]
        [--sizes 64 96 128] [--batch-sizes 4 16] [--amp off auto] [--images 64] [--threads 1]

Each configuration trains one warm-up pass, then --images images timed. Last line: JSON, images/s
per configuration and each one's ratio to the first (by default Unet-resnet18, smallest size and batch,
float32).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from models.factory import build_model
from models.losses import build_loss
from models.optim import build_optimizer, build_scheduler, resolve_amp
from models.training import place_model, train_epoch
from models.weights import DEFAULT_NORMALIZATION


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", nargs="+", default=["Unet", "FPN"])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 96, 128])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--images", type=int, default=64, help="images trained per timed pass")
    parser.add_argument("--classes", type=int, default=13)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--amp", nargs="+", choices=["off", "auto"], default=["off"])
    return parser.parse_args()


def images_per_second(decoder: str, backbone: str, size: int, batch: int, amp: str, images: int,
                      classes: int) -> float:
    torch.manual_seed(0)
    model = place_model(build_model(decoder, backbone, classes), "cpu", channels_last=True)
    cfg = {"lr": 1e-3, "weight_decay": 1e-4, "max_epochs": 1}
    optimizer = build_optimizer(model, cfg)
    steps = max(1, images // batch)
    batches = [(torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8),
                torch.randint(0, classes, (batch, size, size), dtype=torch.uint8)) for _ in range(steps)]
    loss = build_loss({"loss": "ce"})
    scheduler = build_scheduler(optimizer, cfg, 2 * steps)
    dtype, _ = resolve_amp({"amp": amp}, "cpu")
    run = lambda: train_epoch(model, batches, loss, optimizer, "cpu", DEFAULT_NORMALIZATION, scheduler=scheduler,  # noqa: E731
                              amp=dtype, channels_last=True)
    run()  # warm-up: oneDNN primitives, allocator
    started = time.perf_counter()
    run()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = []
    grid = itertools.product(args.decoders, args.backbones, args.sizes, args.batch_sizes, args.amp)
    for decoder, backbone, size, batch, amp in grid:
        rate = images_per_second(decoder, backbone, size, batch, amp, args.images, args.classes)
        results.append({"decoder": decoder, "backbone": backbone, "size": size, "batch": batch, "amp": amp,
                        "images_per_s": round(rate, 1)})
        print(f"{decoder:>14} {backbone:>14} {size:4d} px batch {batch:3d} amp {amp:4}: {rate:6.1f} images/s",
              flush=True)
    base = results[0]["images_per_s"]
    for r in results:
        r["vs_first"] = round(r["images_per_s"] / base, 2)
    print(json.dumps({"threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
