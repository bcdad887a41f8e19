"""Training throughput with the cached loader, the naive per-item loader (bench/loader.py) and no
loader at all (one batch already on the device: the model's own ceiling), in the same run.

Runs models.training.train_epoch (the trainable's loop) for --steps steps after --warmup steps, for
each loader and each --workers value, on CUDA when present (else the CPU).

    python bench/train_throughput.py --data DIR --resize 256 --policy flip --batch-size 16 --workers 0 3 7

Last line: JSON with samples/s per (pipeline, workers), the no-loader ceiling, and
cached_vs_naive / cached_vs_ceiling ratios at the largest worker count.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time

import torch
from loader import NaiveDataset  # bench/loader.py

from data_pipeline.cache import load_split
from data_pipeline.dataset import SegmentationDataset, make_loader
from models.factory import build_model
from models.losses import build_loss
from models.training import train_epoch
from models.weights import DEFAULT_NORMALIZATION


def timed_steps(batches, steps: int, warmup: int, num_classes: int, device) -> float:
    """samples/s of `steps` training steps of a fresh Unet-resnet18 after `warmup` untimed ones."""
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss({"loss": "ce"}).to(device)
    batches = iter(batches)
    train_epoch(model, itertools.islice(batches, warmup), loss_fn, optimizer, device, DEFAULT_NORMALIZATION)
    if device.type == "cuda":
        torch.cuda.synchronize()
    counted = _Counter(itertools.islice(batches, steps))
    started = time.perf_counter()
    train_epoch(model, counted, loss_fn, optimizer, device, DEFAULT_NORMALIZATION)  # .item() at its end syncs
    return counted.samples / (time.perf_counter() - started)


class _Counter:
    def __init__(self, batches):
        self.batches, self.samples = batches, 0

    def __iter__(self):
        for images, masks in self.batches:
            self.samples += len(images)
            yield images, masks


def endless(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ann", default="train.json")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--policy", default="flip")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True

    os.environ["SEGSEARCH_CACHE"] = tempfile.mkdtemp(prefix="bench-cache-")
    split = load_split(args.data, args.ann, args.resize)
    num_classes = len(split.class_names)
    datasets = {"cached": SegmentationDataset(split, args.policy, train=True),
                "naive": NaiveDataset(args.data, args.ann, args.resize, args.policy)}
    results = {}
    for name, dataset in datasets.items():
        for workers in args.workers:
            loader = make_loader(dataset, args.batch_size, workers=workers, shuffle=True, drop_last=True,
                                 pin_memory=device.type == "cuda")
            rate = timed_steps(endless(loader), args.steps, args.warmup, num_classes, device)
            results[f"{name}_w{workers}"] = round(rate, 1)
            print(f"{name:6s} workers={workers}: {rate:8.1f} samples/s", flush=True)
    fixed = next(iter(make_loader(datasets["cached"], args.batch_size, shuffle=True, drop_last=True)))
    on_device = tuple(t.to(device) for t in fixed)
    ceiling = timed_steps(itertools.repeat(on_device), args.steps, args.warmup, num_classes, device)
    print(f"no loader (one batch on the device): {ceiling:8.1f} samples/s")
    top = max(args.workers)
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "cpus": os.cpu_count(), "resize": args.resize, "policy": args.policy,
                      "batch_size": args.batch_size, "steps": args.steps, **results, "ceiling": round(ceiling, 1),
                      "cached_vs_naive": round(results[f"cached_w{top}"] / results[f"naive_w{top}"], 2),
                      "cached_vs_ceiling": round(results[f"cached_w{top}"] / ceiling, 2)}))


if __name__ == "__main__":
    main()
