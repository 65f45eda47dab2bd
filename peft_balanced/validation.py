"""The one home of argument checks: each raises a ``ValueError`` naming the field, the value and what is valid.

Configs, specs, settings and the commands validate through these; checks tied to one format's shapes (e.g.
``quant.tile_int4.check_tile_shape``) stay beside that format.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def check_flag(name: str, value: object) -> bool:
    """Validate a boolean option (``"no"`` would otherwise read as ``True``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_number(name: str, value: object) -> None:
    """Raise a ``ValueError`` naming the field unless ``value`` is a finite int or float (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")


def check_positive_number(name: str, value: object) -> None:
    """Raise a ``ValueError`` naming the field unless ``value`` is a number > 0."""
    check_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def check_positive_int(name: str, factor: object) -> int:
    """Raise a ``ValueError`` naming the field unless ``factor`` is an ``int`` > 0 (``bool`` is rejected)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor <= 0:
        raise ValueError(f"{name} must be a positive integer, got {factor!r} ({type(factor).__name__}).")
    return factor


def check_count(name: str, value: object) -> None:
    """Raise a ``ValueError`` naming the field unless ``value`` is an integer >= 0 (``bool`` is rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")


def check_module_names(name: str, value: object) -> None:
    """Raise a ``ValueError`` naming the field unless ``value`` is ``None``, a string (regex or ``"all-linear"``)
    or a list / set of strings."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(item, str) for item in value):
        return
    raise ValueError(
        f"{name} must be None, a module-name regex (str), 'all-linear' or a list of module names (str), got {value!r}."
    )


def check_tile(tile: object) -> tuple[int, int]:
    """Validate ``tile = (l1, l2)``: two positive Python/NumPy integers (not bools). Returns ``(int(l1), int(l2))``."""
    try:
        items = list(tile)  # type: ignore[call-overload]
    except TypeError:
        items = None
    if items is None or len(items) != 2:
        raise ValueError(
            f"tile must be a pair (l1, l2) of positive ints (l1 input features x l2 output features), got {tile!r}"
        )
    out = []
    for label, value in zip(("l1 (input features)", "l2 (output features)"), items, strict=True):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"tile {label} must be a positive int, got {value!r} in tile={tile!r}")
        value = int(value.__index__())
        if value <= 0:
            raise ValueError(f"tile {label} must be a positive int, got {value} in tile={tile!r}")
        out.append(value)
    return out[0], out[1]


def check_skip_modules(skip_modules: object) -> list[str]:
    """Validate ``skip_modules``: ``None``, one module name or an iterable of names. Returns a list of names."""
    if skip_modules is None:
        return []
    if isinstance(skip_modules, str):
        return [skip_modules]
    try:
        names = list(skip_modules)  # type: ignore[call-overload]
    except TypeError:
        names = None
    if names is None or not all(isinstance(name, str) for name in names):
        raise ValueError(
            f"skip_modules must be None, a module name (str) or a list of module names (str), got {skip_modules!r}"
        )
    return names


def check_enum(enum: type[E], value: E | str, what: str) -> E:
    """``enum(value)``; a ``ValueError`` listing the valid values if ``value`` is not one of them."""
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(repr(member.value) for member in enum)
        raise ValueError(f"{what} must be one of {valid} (or a {enum.__name__}), got {value!r}") from None
