"""Which images a trial trains, validates and is tested on: the data settings every trial carries.

`DataSpec` travels inside each trial's config as plain values (trials may run on other nodes), and
is rebuilt from it by the trainable, by ensemble selection and by scoring, so they all see the same
split, class map and skipped images.

Splits are either the given train/val files or fold `fold` of a deterministic stratified k-fold over
`train_all` (data_pipeline.splits), stratified on the classes of each image's annotations at full
resolution, so that every resize of a search sees the same folds.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

from checks import reject_unknown_keys, typed_values
from errors import UserError
from labels import BACKGROUND, IGNORE

from .cache import file_digest, load_split
from .classes import UNKNOWN_POLICIES, ClassMap, class_map_file, class_map_for
from .coco import CocoSegmentation
from .dataset import Split
from .extra_data import ExtraSource, SourceMix, check_shares
from .pseudo_labels import pseudo_class_map
from .splits import kfold_indices

SPLITS = ("given", "kfold")


@dataclass(frozen=True)
class DataSpec:
    root: str
    train: str = "train.json"
    val: str = "val.json"
    test: str = "test.json"
    split: str = "given"  # given | kfold
    train_all: str = "train_all.json"
    folds: int = 5
    fold: int = 0
    split_seed: int = 0
    class_map: dict | None = None  # ClassMap.to_dict(); None = categories as they are
    skip: tuple[str, ...] = ()  # file_names left out everywhere (launch.py --skip-bad)
    pseudo_labels: tuple[str, ...] = ()  # ensemble_select.py --pseudo-labels files, added to the training images
    extra: tuple[dict, ...] = ()  # ExtraSource.to_dict() of each external dataset, added to the training images

    # Trial-config key of each field (the first four keep the names trials always had).
    CONFIG_KEYS = {"root": "data_root", "train": "train_ann", "val": "val_ann", "test": "test_ann",
                   "train_all": "train_all_ann", "skip": "skip_images", "pseudo_labels": "pseudo_label_anns",
                   "extra": "extra_data"}
    LISTS = ("skip", "pseudo_labels", "extra")
    TRIAL_PARAM = "fold"  # searched per trial (search.space), so not one of the constants of to_config
    # What a search space's data: section sets, besides class_map (a class-map file), unknown and extra.
    SECTION_KEYS = ("train", "val", "test", "split", "train_all", "folds", "split_seed", "pseudo_labels")

    @classmethod
    def from_section(cls, raw, space_dir: Path) -> "DataSpec":
        """The data: section of a search space (root and skipped images are set at launch): its
        class_map file, relative to space_dir, is loaded with the `unknown` policy."""
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise UserError("'data' must be a mapping")
        reject_unknown_keys(raw, sorted((*cls.SECTION_KEYS, "class_map", "unknown", "extra")), "data.")
        files = {key: raw[key] for key in ("class_map", "unknown") if raw.get(key) is not None}
        for key, value in files.items():
            if not isinstance(value, str):
                raise UserError(f"data.{key}: expected str, got {value!r}")
        values = typed_values({k: v for k, v in raw.items() if k in cls.SECTION_KEYS}, cls(root=""), "data")
        class_map = _section_class_map(files.get("class_map"), files.get("unknown"), space_dir)
        spec = cls(root="", **values, class_map=class_map.to_dict() if class_map else None,
                   extra=_section_extra(raw.get("extra"), space_dir))
        if spec.split not in SPLITS:
            raise UserError(f"data.split must be one of {', '.join(SPLITS)}, got {spec.split!r}")
        if spec.folds < 2:
            raise UserError(f"data.folds must be at least 2, got {spec.folds}")
        return spec

    @classmethod
    def from_config(cls, config: dict, root: str | Path | None = None) -> "DataSpec":
        """The spec of a trial config; root overrides where the data lives (another machine)."""
        values = {f.name: config[key] for f in fields(cls)
                  if (key := cls.CONFIG_KEYS.get(f.name, f.name)) in config}
        if root is not None:
            values["root"] = str(root)
        for name in cls.LISTS:
            values[name] = tuple(values.get(name, ()))
        return cls(**values)

    def to_config(self) -> dict:
        """This spec as trial-config entries (from_config reads them back)."""
        return {self.CONFIG_KEYS.get(k, k): (list(v) if k in self.LISTS else v) for k, v in asdict(self).items()}

    def constants(self) -> dict:
        """to_config less the fold, a trial parameter that a search may vary."""
        return {k: v for k, v in self.to_config().items() if k != self.TRIAL_PARAM}

    def classes(self) -> ClassMap | None:
        return ClassMap.from_dict(self.class_map) if self.class_map else None

    def sources(self) -> tuple[ExtraSource, ...]:
        """The external datasets whose images join the training split."""
        return tuple(ExtraSource.from_dict(raw) for raw in self.extra)

    def skipping_extra(self, skipped: list[list[str]]) -> "DataSpec":
        """This spec with the given images of each external dataset left out (--skip-bad)."""
        return replace(self, extra=tuple(s.skipping(names).to_dict() for s, names in zip(self.sources(), skipped)))

    def load(self, ann_file: str, resize: int, with_masks: bool = True) -> Split:
        return load_split(self.root, ann_file, resize, class_map=self.classes(), skip=frozenset(self.skip),
                          with_masks=with_masks)

    def train_val(self, resize: int) -> tuple[Split, Split]:
        """(training split: the task's, pseudo-labelled and external images; val split)."""
        train, val, _ = self.training_data(resize)
        return train, val

    def training_data(self, resize: int) -> tuple[Split, Split, SourceMix | None]:
        """train_val and, when an external dataset has a share, where each training sample comes from."""
        own, val = self._own_train_val(resize)
        extra = [source.load(resize, own.class_names) for source in self.sources()]
        shares = [None] + [source.share for source in self.sources()]
        mix = SourceMix.of([len(own)] + [len(e) for e in extra], shares) \
            if any(share is not None for share in shares) else None
        return (own.concat(*extra) if extra else own), val, mix

    def _own_train_val(self, resize: int) -> tuple[Split, Split]:
        if self.split == "given":
            train, val = self.load(self.train, resize), self.load(self.val, resize)
            if train.class_names != val.class_names:
                raise ValueError(f"{self.train} and {self.val} have different classes")
        else:
            everything = self.load(self.train_all, resize)
            train_idx, val_idx = self.fold_indices()
            train, val = everything.take(train_idx), everything.take(val_idx)
        return self._with_pseudo_labels(train, resize), val

    def _with_pseudo_labels(self, train: Split, resize: int) -> Split:
        if not self.pseudo_labels:
            return train
        class_map = pseudo_class_map(train.class_names)
        extra = [load_split(self.root, ann, resize, class_map=class_map, skip=frozenset(self.skip))
                 for ann in self.pseudo_labels]
        return train.concat(*extra)

    def val_split(self, resize: int, with_masks: bool = True) -> Split:
        if self.split == "given":
            return self.load(self.val, resize, with_masks)
        return self.load(self.train_all, resize, with_masks).take(self.fold_indices()[1])

    def val_fingerprint(self) -> str:
        """A digest of everything the val set depends on (annotations, split, classes, skipped images)."""
        ann = self.val if self.split == "given" else self.train_all
        # the same data elsewhere has the same val set; pseudo-labels and external data add training images only
        settings = {k: v for k, v in asdict(self).items() if k not in ("root", "pseudo_labels", "extra")}
        parts = [file_digest(Path(self.root) / ann), settings]
        return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def fold_indices(self):
        """(train, val) image indices of this fold within train_all."""
        digest = file_digest(Path(self.root) / self.train_all)
        return _fold_indices(self.root, self.train_all, digest, self.classes(), frozenset(self.skip),
                             self.folds, self.fold, self.split_seed)


def _section_extra(raw, space_dir: Path) -> tuple[dict, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise UserError(f"data.extra: expected a list of external datasets (root, annotations, class_map, "
                        f"share), got {raw!r}")
    sources = tuple(ExtraSource.from_entry(entry, i, space_dir) for i, entry in enumerate(raw))
    check_shares(sources)
    return tuple(source.to_dict() for source in sources)


def _section_class_map(path: str | None, unknown: str | None, space_dir: Path) -> ClassMap | None:
    if unknown and unknown not in UNKNOWN_POLICIES:
        raise UserError(f"data.unknown must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}")
    return class_map_for(class_map_file(path, "data.class_map", space_dir), unknown or None)


@lru_cache(maxsize=8)
def _fold_indices(root: str, ann_file: str, digest: str, class_map: ClassMap | None, skip: frozenset, folds: int,
                  fold: int, seed: int):
    del digest  # in the cache key only: a changed train_all file gets its folds computed again
    coco = CocoSegmentation(root, ann_file, class_map=class_map, skip=skip)
    return kfold_indices(image_classes(coco), folds, fold, seed)


def image_classes(coco: CocoSegmentation) -> list[frozenset[int]]:
    """The labels (not background, not ignored) of each image's annotations, in image order."""
    label_of = coco.classes.label_of
    by_image: dict[int, set[int]] = {image_id: set() for image_id in coco.image_ids}
    for ann in coco.coco.dataset.get("annotations", []):
        if ann["image_id"] in by_image:
            by_image[ann["image_id"]].add(label_of[ann["category_id"]])
    return [frozenset(by_image[i] - {BACKGROUND, IGNORE}) for i in coco.image_ids]
