"""Ensemble selection and submission writing speed, each against a naive baseline in the same run.

selection: greedy selection (models.ensemble.greedy_selection: running int16 sums of uint8
    probabilities compared class plane by class plane, incremental confusion matrices) vs a naive
    numpy version that re-sums the selected members (in float32) and recomputes the whole confusion
    matrix for every candidate; the same synthetic uint8 val probabilities, the same rounds, and the
    two must pick the same path.
writer: data_pipeline.submission.format_labels vs `' '.join(str(x) for x in row)` per label map.

    .venv/bin/python bench/ensemble.py [--images 250] [--classes 12] [--candidates 10] [--rounds 5]

Last line: JSON with selection_speedup and writer_speedup.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from data_pipeline.submission import format_labels
from models.ensemble import greedy_selection


def naive_miou(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    conf = np.bincount(labels.ravel().astype(np.int64) * num_classes + pred.ravel(),
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def naive_greedy(members: list[np.ndarray], labels: np.ndarray, num_classes: int, rounds: int) -> list[int]:
    singles = [naive_miou(labels, m.argmax(1), num_classes) for m in members]
    chosen = [int(np.argmax(singles))]
    for _ in range(rounds - 1):
        scores = []
        for candidate in range(len(members)):
            total = sum(members[i].astype(np.float32) for i in chosen + [candidate])
            scores.append(naive_miou(labels, total.argmax(1), num_classes))
        chosen.append(int(np.argmax(scores)))
    return chosen


def synthetic(images: int, classes: int, size: int, candidates: int, seed: int = 0):
    """Labels made of 16x16 blocks, and candidates that are noisy, partly right views of them, as uint8
    probabilities (x 255, the form ensemble_select.py caches and selects in)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, classes, (images, size // 16, size // 16))
    labels = coarse.repeat(16, 1).repeat(16, 2).astype(np.int64)
    members = []
    for k in range(candidates):
        logits = rng.standard_normal((images, classes, size, size), dtype=np.float32) * (1.0 + 0.1 * k)
        np.put_along_axis(logits, labels[:, None], np.take_along_axis(logits, labels[:, None], 1) + 1.5, 1)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        members.append(np.round(probs / probs.sum(1, keepdims=True) * 255).astype(np.uint8))
    return labels, members


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    labels, members = synthetic(args.images, args.classes, args.size, args.candidates)
    start = time.perf_counter()
    naive_path = naive_greedy(members, labels, args.classes, args.rounds)
    naive_s = time.perf_counter() - start
    torch_members = [torch.from_numpy(m) for m in members]
    start = time.perf_counter()
    selection = greedy_selection(torch_members, torch.from_numpy(labels), args.classes, max_rounds=args.rounds)
    project_s = time.perf_counter() - start
    assert [m for s in selection.path for m in s["members"]] == naive_path, "the two selections disagree"

    rows = [labels[i].astype(np.uint8) for i in range(min(20, args.images))]
    writer_naive_s = best_of(lambda: [" ".join(str(x) for x in row.ravel()) for row in rows], 3)
    writer_s = best_of(lambda: [format_labels(row) for row in rows], 3)

    print(f"selection, {args.candidates} candidates x {args.rounds} rounds on {args.images} images "
          f"{args.size}x{args.size}, {args.classes} classes: naive numpy {naive_s:.1f} s, project {project_s:.1f} s "
          f"({naive_s / project_s:.1f}x)")
    print(f"writer, {len(rows)} label maps: naive {writer_naive_s * 1e3:.0f} ms, project {writer_s * 1e3:.1f} ms "
          f"({writer_naive_s / writer_s:.1f}x)")
    print(json.dumps({
        "bench": "ensemble", "images": args.images, "classes": args.classes, "size": args.size,
        "candidates": args.candidates, "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "naive_selection_s": round(naive_s, 2), "selection_s": round(project_s, 2),
        "selection_speedup": round(naive_s / project_s, 2), "writer_naive_ms": round(writer_naive_s * 1e3, 2),
        "writer_ms": round(writer_s * 1e3, 2), "writer_speedup": round(writer_naive_s / writer_s, 2),
    }))


if __name__ == "__main__":
    main()
