"""The competition submission: CSV `image_id,PredictionString`, one row per test image."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

HEADER = "image_id,PredictionString\n"


def write_submission(path: str | Path, rows: Iterable[tuple[str, np.ndarray]]) -> int:
    """Writes (file_name, label map) rows atomically (temp file, then rename); returns the row count.

    Each label map is flattened row-major into space-separated integers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", newline="") as out:
            out.write(HEADER)
            for file_name, labels in rows:
                if "," in file_name or "\n" in file_name:
                    raise ValueError(f"image file_name {file_name!r} cannot be written to a CSV cell")
                out.write(f"{file_name},{' '.join(map(str, np.asarray(labels).ravel().tolist()))}\n")
                count += 1
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def read_submission(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """(file_name, flat int label array) rows of a submission file."""
    rows = []
    with open(path) as f:
        if f.readline() != HEADER:
            raise ValueError(f"{path} does not start with the header {HEADER.strip()!r}")
        for line in f:
            name, labels = line.rstrip("\n").split(",", 1)
            rows.append((name, np.array(labels.split(), dtype=np.int64)))
    return rows
