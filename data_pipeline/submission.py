"""The competition submission: CSV `image_id,PredictionString`, one row per test image."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from atomic_file import atomic_path

HEADER = "image_id,PredictionString\n"



def _digit_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each label 0..255: its decimal digits and a space in 4 bytes (one uint32), and which of
    those 4 bytes to keep. Formatting a label map is then two gathers and one compress."""
    digits = np.zeros((256, 4), np.uint8)
    keep = np.zeros((256, 4), bool)
    for value in range(256):
        text = f"{value} ".encode()
        digits[value, :len(text) - 1], digits[value, 3] = np.frombuffer(text[:-1], np.uint8), ord(" ")
        keep[value, :len(text) - 1] = keep[value, 3] = True
    return digits.view(np.uint32).ravel(), keep.view(np.uint32).ravel()


_DIGITS, _KEEP = _digit_tables()


def format_labels(labels: np.ndarray) -> bytes:
    """Space-separated decimal labels, row-major: the PredictionString of one label map (0..255)."""
    flat = np.asarray(labels).ravel()
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise ValueError(f"labels must lie in 0..255, got {flat.min()}..{flat.max()}")
    flat = flat.astype(np.intp, copy=False)
    codes = np.take(_DIGITS, flat).view(np.uint8)
    return np.compress(np.take(_KEEP, flat).view(np.bool_), codes)[:-1].tobytes()


def write_submission(path: str | Path, rows: Iterable[tuple[str, np.ndarray]]) -> int:
    """Writes (file_name, label map) rows atomically (temp file, then rename); returns the row count.

    Each label map is flattened row-major into space-separated integers.
    """
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(HEADER.encode())
        for file_name, labels in rows:
            if "," in file_name or "\n" in file_name:
                raise ValueError(f"image file_name {file_name!r} cannot be written to a CSV cell")
            out.write(file_name.encode() + b"," + format_labels(labels) + b"\n")
            count += 1
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
