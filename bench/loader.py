"""Training-loader throughput: the cached pipeline against a naive per-item one, in the same run.

cached: data_pipeline.cache.load_split (decoded, rasterised and resized once into the node-local
    cache, memory-mapped) → SegmentationDataset (slice, augment, convert).
naive:  every __getitem__ reads the JPEG, rasterises every annotation (pycocotools), resizes, then
    applies the same augmentation and conversion.
Both deliver the same uint8 tensors (normalisation happens on the model's device, for both), with
the same policy, batch size and DataLoader workers. The figure of each is the last
epoch's samples/s (the cache is warm by then; its build time is reported separately).

    .venv/bin/python bench/loader.py --data ../shared/datasets/trashcan-mini --resize 256 --policy flip \
        --batch-size 16 --workers 2 --epochs 2

Last line: JSON with samples_per_s, naive_samples_per_s, speedup, cache_build_s.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.augment import build_transform
from data_pipeline.cache import load_split
from data_pipeline.coco import CocoSegmentation
from data_pipeline.dataset import SegmentationDataset, make_loader


class NaiveDataset(Dataset):
    """Reads and rasterises everything in __getitem__: what a first script does."""

    def __init__(self, root, ann_file: str, resize: int, policy: str):
        self.coco = CocoSegmentation(root, ann_file)
        self.resize = resize
        self.transform = build_transform(policy, train=True)

    def __len__(self) -> int:
        return len(self.coco.image_ids)

    def __getitem__(self, index: int):
        image_id = self.coco.image_ids[index]
        size = (self.resize, self.resize)
        image = cv2.resize(self.coco.read_image(image_id), size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(self.coco.label_map(image_id), size, interpolation=cv2.INTER_NEAREST)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(mask)


def samples_per_second(dataset: Dataset, batch_size: int, workers: int, epochs: int) -> list[float]:
    loader = make_loader(dataset, batch_size, workers=workers, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(0))
    rates = []
    for _ in range(epochs):
        started, count = time.perf_counter(), 0
        for images, masks in loader:
            count += len(images)
        rates.append(count / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ann", default="train.json")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--policy", default="flip", choices=["none", "flip", "strong", "elastic"],
                        help="a per-sample policy (the naive baseline has no partner samples to mix)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as cache:  # a cold cache, so the build is measured too
        os.environ["SEGSEARCH_CACHE"] = cache
        started = time.perf_counter()
        split = load_split(args.data, args.ann, args.resize)
        build_s = time.perf_counter() - started
        cached = samples_per_second(SegmentationDataset(split, args.policy, train=True),
                                    args.batch_size, args.workers, args.epochs)
    naive = samples_per_second(NaiveDataset(args.data, args.ann, args.resize, args.policy),
                               args.batch_size, args.workers, args.epochs)
    result = {"samples_per_s": round(cached[-1], 1), "naive_samples_per_s": round(naive[-1], 1),
              "speedup": round(cached[-1] / naive[-1], 2), "cache_build_s": round(build_s, 2),
              "images": len(split), "resize": args.resize, "policy": args.policy,
              "batch_size": args.batch_size, "workers": args.workers, "epochs": args.epochs,
              "cpus": os.cpu_count()}
    print(f"cached: {cached} samples/s per epoch; naive: {naive}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
