"""Reading a user's YAML file (search spaces, class maps): safe_load only, every problem one line
naming the file."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import yaml

from errors import UserError

T = TypeVar("T")


def load_yaml(path: str | Path, what: str, parse: Callable[[object], T]) -> T:
    """parse(the file's content); a missing file, invalid YAML (python tags included) or a UserError
    from parse becomes a UserError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    try:
        return parse(raw)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
