"""External datasets in training: other COCO folders, each brought into the task's classes by its own
class map, whose images join the training split only (never val or test).

A search space lists them under `data.extra`:

    data:
      extra:
        - root: /data/taco                # absolute, or relative to the space file
          annotations: annotations.json   # inside root
          class_map: taco_to_trash.yaml   # relative to the space file; without one, categories as they are
          share: 0.3                      # optional: this source's share of each epoch's samples

Each source is read like the main data (data_pipeline.coco: its own root, the same path rules; the
decoded-split cache keyed by its own root, file, resize and class map) and its labels are renumbered
by class name into the task's labels, so its class map only has to produce names the task has: a
name the task lacks is an error, not a new class. Sources with a share get that fraction of each
epoch's samples; the task's own images and the sources without one share the rest in proportion to
their sizes (`SourceMix`, which the training sampler applies).

`ExtraSource` travels in trial configs as plain data (to_dict / from_dict), like the class map.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from checks import reject_unknown_keys
from errors import UserError
from labels import IGNORE

from .cache import load_split
from .classes import ClassMap, class_map_file
from .dataset import Split

ENTRY_KEYS = ("root", "annotations", "class_map", "share")


@dataclass(frozen=True)
class ExtraSource:
    root: str  # absolute
    annotations: str  # inside root
    class_map: dict | None = None  # ClassMap.to_dict(); None = categories as they are
    share: float | None = None  # of each epoch's samples; None = in proportion to its size
    skip: tuple[str, ...] = ()  # its images left out (launch.py --skip-bad)

    @classmethod
    def from_entry(cls, raw, index: int, space_dir: Path) -> ExtraSource:
        """One entry of a space's data.extra list; paths relative to space_dir."""
        key = f"data.extra[{index}]"
        if not isinstance(raw, dict):
            raise UserError(f"{key}: expected a mapping with {', '.join(ENTRY_KEYS)}, got {raw!r}")
        reject_unknown_keys(raw, ENTRY_KEYS, f"{key}.")
        for name in ("root", "annotations"):
            if not isinstance(raw.get(name), str) or not raw[name]:
                raise UserError(f"{key}.{name}: expected a path, got {raw.get(name)!r}")
        root = (space_dir / raw["root"]).resolve()
        if not root.is_dir():
            raise UserError(f"{key}.root: {root} does not exist or is not a folder")
        file = class_map_file(raw.get("class_map"), f"{key}.class_map", space_dir)
        class_map = ClassMap.load(file) if file else None
        return cls(str(root), raw["annotations"], class_map.to_dict() if class_map else None,
                   _share(raw.get("share"), key))

    @classmethod
    def from_dict(cls, raw: dict) -> ExtraSource:
        return cls(**{**raw, "skip": tuple(raw.get("skip", ()))})

    def to_dict(self) -> dict:
        return {**asdict(self), "skip": list(self.skip)}

    @property
    def name(self) -> str:
        """How messages and records name the source: its annotation file's path."""
        return str(Path(self.root) / self.annotations)

    def classes(self) -> ClassMap | None:
        return ClassMap.from_dict(self.class_map) if self.class_map else None

    def skipping(self, names) -> ExtraSource:
        return replace(self, skip=tuple(sorted(names)))

    def load(self, resize: int, class_names: tuple[str, ...]) -> Split:
        """Its images and label maps at resize, labelled as the task's class_names are."""
        split = load_split(self.root, self.annotations, resize, class_map=self.classes(), skip=frozenset(self.skip))
        lookup = task_labels(split.class_names, class_names, self.name)
        return Split(split.images, lookup[split.masks], split.file_names, tuple(class_names))


def task_labels(source_names, task_names, source: str) -> np.ndarray:
    """uint8 [256]: a source's label -> the task's label of the same class name (IGNORE stays IGNORE)."""
    missing = [name for name in source_names if name not in task_names]
    if missing:
        raise UserError(f"{source}: class {missing[0]!r} (after its class map) is not one of the task's classes "
                        f"({', '.join(task_names)}); map it to one of them, Background or null")
    lookup = np.full(256, IGNORE, np.uint8)
    lookup[:len(source_names)] = [task_names.index(name) for name in source_names]
    return lookup


@dataclass(frozen=True)
class SourceMix:
    """Where each training sample comes from (index into the sources: 0 = the task's own images) and
    the share of each epoch's samples each source gets."""
    source_of: np.ndarray  # int [N]
    shares: np.ndarray  # float [number of sources], summing to 1

    @classmethod
    def of(cls, sizes: list[int], shares: list[float | None]) -> SourceMix:
        """Sources with a share keep it; the others split the rest in proportion to their sizes."""
        given = sum(s for s in shares if s is not None)
        unshared = sum(n for n, s in zip(sizes, shares) if s is None)
        resolved = [s if s is not None else (1 - given) * n / unshared for n, s in zip(sizes, shares)]
        return cls(np.repeat(np.arange(len(sizes)), sizes), np.asarray(resolved, dtype=np.float64))

    def apply(self, weights: np.ndarray) -> np.ndarray:
        """Per-sample weights (e.g. the rare-class sampler's) rescaled so each source's sum to its share."""
        weights = np.asarray(weights, dtype=np.float64).copy()
        for source, share in enumerate(self.shares):
            mine = self.source_of == source
            total = weights[mine].sum()
            if total > 0:
                weights[mine] *= share / total
        return weights


def check_shares(sources: tuple[ExtraSource, ...]) -> None:
    """The task's own images keep part of every epoch."""
    given = sum(s.share for s in sources if s.share is not None)
    if given >= 1:
        raise UserError(f"data.extra: the shares add up to {given:g}; they must stay below 1 so that the "
                        f"task's own images keep part of each epoch")


def _share(value, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value < 1:
        raise UserError(f"{key}.share: expected a fraction between 0 and 1 (exclusive), got {value!r}")
    return float(value)


