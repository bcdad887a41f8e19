"""Greedy ensemble selection speed on synthetic val probabilities of competition size.

Compares the class argmax used by the project (`max(dim=1).indices`) with `argmax(dim=1)` as the
baseline, in the same run, on the same data; then times a whole greedy selection.
Last line: JSON with the figures.

    .venv/bin/python bench/bench_selection.py [--images 64] [--members 5] [--rounds 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models.ensemble import greedy_selection  # noqa: E402
from models.inference import to_labels  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, args.classes, (args.images, args.size, args.size), generator=g)
    members = [torch.rand(args.images, args.classes, args.size, args.size, generator=g).half()
               for _ in range(args.members)]
    chunk = members[0][:8].float()

    argmax_s = best_of(lambda: chunk.argmax(dim=1))
    max_s = best_of(lambda: to_labels(chunk))
    assert torch.equal(chunk.argmax(dim=1), to_labels(chunk))
    start = time.perf_counter()
    greedy_selection(members, labels, args.classes, max_rounds=args.rounds)
    selection_s = time.perf_counter() - start
    evaluations = args.members * args.rounds
    print(f"class argmax on 8x{args.classes}x{args.size}x{args.size}: argmax {argmax_s * 1e3:.1f} ms, "
          f"max().indices {max_s * 1e3:.1f} ms ({argmax_s / max_s:.1f}x)")
    print(f"greedy selection: {args.members} members x {args.rounds} rounds on {args.images} images: "
          f"{selection_s:.1f} s ({selection_s / evaluations * 1e3:.0f} ms per candidate evaluation)")
    print(json.dumps({"bench": "selection", "threads": torch.get_num_threads(), "images": args.images,
                      "members": args.members, "rounds": args.rounds, "argmax_ms": round(argmax_s * 1e3, 2),
                      "max_indices_ms": round(max_s * 1e3, 2), "speedup": round(argmax_s / max_s, 2),
                      "selection_s": round(selection_s, 2)}))


if __name__ == "__main__":
    main()
