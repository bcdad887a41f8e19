"""Checks of one user-given value, and did-you-mean hints: what every parser of user input (search
spaces, class maps, losses, training settings, model names) uses, so that a mistake reads the same
everywhere. A check raises UserError naming the value; the caller adds where it was (file, key).
"""
from __future__ import annotations

import difflib
import math
from numbers import Real
from typing import Any, Callable, Iterable

from errors import UserError

Check = Callable[[Any], None]


def is_number(value) -> bool:
    """A finite real number (bool is not one)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def did_you_mean(name, options: Iterable[str], *, count: int = 1, cutoff: float = 0.6, prefix: str = "",
                 quote: bool = True) -> str:
    """' (did you mean X?)' with the closest of options (up to count of them, each after prefix), or ''."""
    close = difflib.get_close_matches(str(name), list(options), n=count, cutoff=cutoff)
    if not close:
        return ""
    shown = [repr(prefix + c) if quote else prefix + c for c in close]
    return f" (did you mean {', '.join(shown)}?)"


def one_of(options) -> Check:
    """value must be one of options (True is not 1, unless a bool is an option)."""
    options = tuple(options)

    def check(value) -> None:
        is_bool_option = isinstance(value, bool) and any(isinstance(o, bool) for o in options)
        if (isinstance(value, bool) and not is_bool_option) or value not in options:
            raise UserError(f"unknown value {value!r}; choose one of {', '.join(map(str, options))}")
    return check


def reject_unknown_keys(mapping: dict, known: Iterable[str], prefix: str = "") -> None:
    """Every key of mapping must be known: the first that is not is a UserError with the closest key."""
    known = tuple(known)
    for key in mapping:
        if key not in known:
            hint = did_you_mean(key, known) or f"; known: {', '.join(known)}"
            raise UserError(f"unknown key {prefix}{key}{hint}")


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           integer: bool = False, multiple_of: int | None = None, optional: bool = False, name: str = "",
           expected: str = "", note: str = "") -> Check:
    """A check that value is a finite number (an int with integer, a multiple of multiple_of) within the
    bounds, or None with optional. Its message is '{name} must be {expected}{note}, got V' ('expected ..., got V' without a
    name); expected defaults to the bounds written out, e.g. 'a number in [0, 1)', 'an integer >= 0'."""
    expected = expected or _describe(low, high, low_open, high_open, integer, optional)

    def check(value) -> None:
        if optional and value is None:
            return
        if not _in_range(value, low, high, low_open, high_open, integer) or (multiple_of and value % multiple_of):
            subject = f"{name} must be" if name else "expected"
            raise UserError(f"{subject} {expected}{note}, got {value!r}")
    return check


def _in_range(value, low, high, low_open: bool, high_open: bool, integer: bool) -> bool:
    if not is_number(value) or (integer and not isinstance(value, int)):
        return False
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _describe(low, high, low_open: bool, high_open: bool, integer: bool, optional: bool) -> str:
    kind = ("null or " if optional else "") + ("an integer" if integer else "a number")
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def typed_values(raw, defaults, section: str, keys: Iterable[str] | None = None) -> dict:
    """The entries of a settings mapping (a YAML section), each checked against the type of the
    matching field of defaults (a dataclass instance): int where an int is, str where a str is (null
    keeps the default), a list of file names where a tuple is. keys: the fields the mapping may set
    (default: all). Returns {key: value} for the keys given."""
    if not isinstance(raw, dict):
        raise UserError(f"'{section}' must be a mapping")
    reject_unknown_keys(raw, sorted(keys or defaults.__dataclass_fields__), f"{section}.")
    values = {}
    for key, value in raw.items():
        expected = type(getattr(defaults, key))
        if value is None and expected is str:  # e.g. class_map: null
            value = getattr(defaults, key)
        if expected is tuple:  # a list of file names
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise UserError(f"{section}.{key}: expected a list of file names, got {value!r}")
            value = tuple(value)
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if isinstance(value, bool) or not ok:
            raise UserError(f"{section}.{key}: expected {expected.__name__}, got {value!r}")
        values[key] = value
    return values
