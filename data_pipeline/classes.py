"""Which label each COCO category gets: an optional class map and the UNKNOWN policy.

Without a class map the contract is unchanged: label 0 is `Background`, the categories follow in
id order as labels 1..K, and label 255 is ignored by every loss and by the metric. A class map
(YAML) renames, merges or drops source categories by name, so that external data (e.g. TACO's 60
categories) can be brought into the task's taxonomy:

    classes: [General trash, Paper, Plastic]  # optional: the target classes, labels 1..K in this order
    map:                                      # source category name (exact) -> target class
      Cigarette: General trash                # rename; several sources on one target merge them
      Bottle cap: Plastic
      Rope: Background                        # fold into background (label 0)
      Unlabeled litter: null                  # ignore (label 255: no loss, not in the metric)
    unmapped: keep                            # categories not in map: keep | background | ignore | error
    unknown:                                  # or just `unknown: ignore`
      policy: keep                            # keep | background | ignore
      names: [unknown]                        # matched case-insensitively (UNKNOWN, Unknown, ...)

- `unmapped: keep` (default) keeps a category under its own name; with `classes` given, that name
  must be one of them.
- Without `classes`, targets take labels in the order of their first appearance over the
  categories sorted by id; with `classes`, every listed class has its label even when a file has
  no category for it, so files with different category subsets still agree on the labels.
- The UNKNOWN policy applies to categories whose name is in `unknown.names`. `background` and
  `ignore` win over `map` and `unmapped`; `keep` follows `map` when the category has an entry
  there and otherwise keeps its own name (whatever `unmapped` says). Files spelling it
  differently (`unknown`, `UNKNOWN`) keep different names; map both to one target to merge them.
- Category names are the identity of a class: one annotation file must not repeat a name. Any
  spelling of `Background` (as a target or a kept name) is label 0.

Trial configs travel to Ray workers as plain data: `ClassMap.to_dict()` / `ClassMap.from_dict()`
round-trip the same structure as the file, and `ClassMap.key()` is a digest of the content for
cache keys.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from checks import did_you_mean, reject_unknown_keys
from errors import UserError
from labels import IGNORE
from yaml_file import load_yaml

BACKGROUND = "Background"
MAX_CLASSES = IGNORE  # labels 0..254, Background included, fit below the ignore label

UNMAPPED_POLICIES = ("keep", "background", "ignore", "error")
UNKNOWN_POLICIES = ("keep", "background", "ignore")
DEFAULT_UNKNOWN_NAMES = ("unknown",)
FILE_KEYS = ("classes", "map", "unmapped", "unknown")
UNKNOWN_KEYS = ("policy", "names")


@dataclass(frozen=True)
class ClassMap:
    """A validated class map; `ClassMap()` is the identity (today's classes, UNKNOWN kept)."""

    map: tuple[tuple[str, str | None], ...] = ()  # (source name, target or None = ignore), sorted
    classes: tuple[str, ...] | None = None
    unmapped: str = "keep"
    unknown_policy: str = "keep"
    unknown_names: tuple[str, ...] = DEFAULT_UNKNOWN_NAMES  # lower case, sorted

    def __post_init__(self):
        self._normalise()
        _check_choice("unmapped", self.unmapped, UNMAPPED_POLICIES)
        _check_choice("unknown.policy", self.unknown_policy, UNKNOWN_POLICIES)
        if self.classes is not None:
            _check_classes(self.classes)
            for source, target in self.map:
                _check_target_listed(f"map.{source}", target, self.classes)

    def _normalise(self) -> None:
        """One spelling per content, so that equal class maps compare equal and share a key()."""
        pairs = self.map.items() if isinstance(self.map, Mapping) else self.map
        object.__setattr__(self, "map", tuple(sorted((source, _canonical(target)) for source, target in pairs)))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "unknown_names", tuple(sorted({n.casefold() for n in self.unknown_names})))

    @classmethod
    def load(cls, path: str | Path, unknown: str | None = None) -> ClassMap:
        """Reads a class-map file; `unknown` (a policy) overrides the file's `unknown.policy`."""
        return load_yaml(path, "class map", cls.from_dict).with_unknown(unknown)

    @classmethod
    def from_dict(cls, raw) -> ClassMap:
        """The class map of a mapping in the file format (as read from YAML or made by to_dict)."""
        if not isinstance(raw, dict):
            raise UserError(f"a class map must be a mapping with keys {', '.join(FILE_KEYS)}")
        reject_unknown_keys(raw, FILE_KEYS, "")
        policy, names = _parse_unknown(raw.get("unknown"))
        return cls(map=_parse_map(raw.get("map")), classes=_parse_classes(raw.get("classes")),
                   unmapped=raw.get("unmapped", "keep"), unknown_policy=policy, unknown_names=names)

    def to_dict(self) -> dict:
        """Plain data in the file format; from_dict(to_dict()) == self."""
        return {"classes": None if self.classes is None else list(self.classes),
                "map": dict(self.map), "unmapped": self.unmapped,
                "unknown": {"policy": self.unknown_policy, "names": list(self.unknown_names)}}

    def key(self) -> str:
        """A short digest of the content: equal class maps have equal keys."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_unknown(self, policy: str | None) -> ClassMap:
        """This class map with another UNKNOWN policy (None keeps the current one)."""
        if policy is None:
            return self
        _check_choice("unknown policy", policy, UNKNOWN_POLICIES)
        return replace(self, unknown_policy=policy)

    def target(self, name: str) -> str | None:
        """The target class of a source category name: a class name, BACKGROUND, or None (ignore)."""
        is_unknown = name.casefold() in self.unknown_names
        if is_unknown and self.unknown_policy != "keep":
            return _policy_target(self.unknown_policy)
        targets = dict(self.map)
        if name in targets:
            return targets[name]
        if is_unknown or self.unmapped == "keep":
            return self._own_name(name, "unknown: keep" if is_unknown else "unmapped: keep")
        if self.unmapped == "error":
            raise UserError(f"category {name!r} is not in the class map (unmapped: error)"
                            f"{did_you_mean(name, [source for source, _ in self.map])}")
        return _policy_target(self.unmapped)

    def _own_name(self, name: str, reason: str) -> str:
        """A category kept under its own name, which `classes` (when given) must list."""
        if self.classes is not None and _canonical(name) not in (BACKGROUND, *self.classes):
            raise UserError(f"category {name!r} keeps its name ({reason}) but is not in the class map's "
                            f"classes{did_you_mean(name, self.classes)}")
        return _canonical(name)


def class_map_file(path, key: str, space_dir: Path) -> Path | None:
    """The class-map file a space's `key` names (relative to the space file's folder), or None."""
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        raise UserError(f"{key}: expected the path of a class-map file, got {path!r}")
    file = space_dir / path
    if not file.is_file():
        raise UserError(f"{key}: {file} does not exist")
    return file


def class_map_for(path: str | Path | None, unknown: str | None = None) -> ClassMap | None:
    """The class map of the data settings: the file at `path` (if any) with the `unknown` policy;
    None when that leaves the categories as they are (so caches of the plain data are shared)."""
    class_map = ClassMap().with_unknown(unknown) if path is None else ClassMap.load(path, unknown)
    return None if class_map == ClassMap() else class_map


def unknown_label(class_names, class_map: ClassMap | None) -> int | None:
    """The label of the UNKNOWN class among class_names (the first whose name is one of the class
    map's unknown names), or None when the label space has none."""
    names = (class_map or ClassMap()).unknown_names
    return next((i for i, name in enumerate(class_names) if name.casefold() in names), None)


@dataclass(frozen=True)
class ResolvedClasses:
    """The classes of one annotation file under a class map."""

    class_names: tuple[str, ...]  # Background first; index = label
    label_of: dict[int, int]  # category id -> label 0..K, or IGNORE

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve(categories: list[dict], class_map: ClassMap | None, source: str) -> ResolvedClasses:
    """The labels of a COCO `categories` list; errors name `source` (the annotation file)."""
    class_map = class_map or ClassMap()
    ordered = sorted(categories, key=lambda category: category["id"])
    _check_unique_names(ordered, source)
    try:
        targets = {category["id"]: class_map.target(category["name"]) for category in ordered}
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    names = _label_order(targets.values(), class_map.classes)
    if len(names) + 1 > MAX_CLASSES:
        raise UserError(f"{source}: {len(names) + 1} classes do not fit in labels 0..{MAX_CLASSES - 1}; "
                        "merge or drop some with a class map")
    label = {name: i for i, name in enumerate((BACKGROUND, *names))}
    label_of = {cid: IGNORE if target is None else label[target] for cid, target in targets.items()}
    return ResolvedClasses((BACKGROUND, *names), label_of)


def _label_order(targets, classes: tuple[str, ...] | None) -> tuple[str, ...]:
    """Target classes for labels 1..K: `classes` when given, else in order of first appearance."""
    if classes is not None:
        return classes
    seen = dict.fromkeys(t for t in targets if t is not None and t != BACKGROUND)
    return tuple(seen)


def _check_unique_names(categories: list[dict], source: str) -> None:
    first_id: dict[str, int] = {}
    for category in categories:
        name = category.get("name")
        if not isinstance(name, str):
            raise UserError(f"{source}: category {category['id']} has no name (got {name!r})")
        if name in first_id:
            raise UserError(f"{source}: category name {name!r} is used by ids {first_id[name]} and "
                            f"{category['id']}; names identify classes, so they must be unique")
        first_id[name] = category["id"]


def _canonical(target: str | None) -> str | None:
    """Any spelling of background is the one Background class (label 0)."""
    if target is not None and target.casefold() == BACKGROUND.casefold():
        return BACKGROUND
    return target


def _policy_target(policy: str) -> str | None:
    return BACKGROUND if policy == "background" else None


def _parse_map(raw) -> tuple[tuple[str, str | None], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise UserError(f"map: expected a mapping of source category name -> target class, got {raw!r}")
    for source, target in raw.items():
        if not isinstance(source, str) or not source:
            raise UserError(f"map: source names must be non-empty strings, got {source!r} (quote it)")
        if target is not None and (not isinstance(target, str) or not target):
            raise UserError(f"map.{source}: the target must be a class name, Background or null, "
                            f"got {target!r} (quote it)")
    return tuple(raw.items())


def _parse_classes(raw) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise UserError(f"classes: expected a list of class names, got {raw!r}")
    return tuple(raw)


def _parse_unknown(raw) -> tuple[str, tuple[str, ...]]:
    """`unknown: ignore` or `unknown: {policy: ignore, names: [...]}` -> (policy, names)."""
    if raw is None:
        return "keep", DEFAULT_UNKNOWN_NAMES
    if isinstance(raw, str):
        return raw, DEFAULT_UNKNOWN_NAMES
    if not isinstance(raw, dict):
        raise UserError(f"unknown: expected a policy ({' | '.join(UNKNOWN_POLICIES)}) or a mapping "
                        f"with {' and '.join(UNKNOWN_KEYS)}, got {raw!r}")
    reject_unknown_keys(raw, UNKNOWN_KEYS, "unknown.")
    names = raw.get("names", list(DEFAULT_UNKNOWN_NAMES))
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"unknown.names: expected a non-empty list of category names, got {names!r}")
    return raw.get("policy", "keep"), tuple(names)


def _check_classes(classes) -> None:
    if not classes:
        raise UserError("classes: expected a non-empty list of class names (or leave it out)")
    for name in classes:
        if not isinstance(name, str) or not name:
            raise UserError(f"classes: class names must be non-empty strings, got {name!r} (quote it)")
        if _canonical(name) == BACKGROUND:
            raise UserError(f"classes: leave out {name!r}; Background is always label 0")
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        raise UserError(f"classes: {repeated[0]!r} is listed more than once")
    if len(classes) + 1 > MAX_CLASSES:
        raise UserError(f"classes: {len(classes)} classes and Background do not fit in labels "
                        f"0..{MAX_CLASSES - 1}")


def _check_target_listed(key: str, target: str | None, classes: tuple[str, ...]) -> None:
    if target is None or _canonical(target) == BACKGROUND or target in classes:
        return
    raise UserError(f"{key}: target {target!r} is not in classes{did_you_mean(target, classes)}")


def _check_choice(key: str, value, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"{key}: {value!r} is not one of {', '.join(options)}")
