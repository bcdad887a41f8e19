"""What the trashcan-mini benchmarks share: the project on the import path, and where the data lives."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TRASHCAN = ROOT.parent / "shared" / "datasets" / "trashcan-mini"


def check_data(path: Path) -> None:
    """Exits with a one-line error when the dataset folder is missing."""
    if not path.is_dir():
        sys.exit(f"error: dataset {path} not found (trashcan-mini lives in ../shared/datasets; pass --data)")
