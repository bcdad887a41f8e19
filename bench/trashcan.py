"""What the trashcan-mini benchmarks share: where the project and the data live."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRASHCAN = ROOT.parent / "shared" / "datasets" / "trashcan-mini"


def check_data(path: Path) -> None:
    """Exits with a one-line error when the dataset folder is missing."""
    if not path.is_dir():
        sys.exit(f"error: dataset {path} not found (trashcan-mini lives in ../shared/datasets; pass --data)")
