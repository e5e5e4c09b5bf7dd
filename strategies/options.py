"""Checks of a strategy's options: a flag, a finite number, a fraction, an optional
bound, a count of nodes.

Each raises ``ValueError`` naming the option, what it allows and the value it
got; those that return give the value as the strategy keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["check_bound", "check_count", "check_flag", "check_fraction", "check_number"]


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a ``bool``; else ``ValueError("<name> must be true or false, ...")``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_number(name: str, value: object, ok: Callable[[float], bool], allowed: str) -> float:
    """``float(value)`` if it is a finite ``int`` or ``float`` (not ``bool``) that passes ``ok``;
    else ``ValueError("<name> must be <allowed>, ...")``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and ok(value)
    ):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError("<name> must be in [0, 1], ...")`` outside ``[0, 1]``."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_bound(name: str, value: object) -> float | None:
    """``None``, or ``float(value)`` if it is an ``int`` or ``float`` (not ``bool``) ``> 0``;
    else ``ValueError("<name> must be a number > 0 or None, ...")``."""
    if value is None:
        return None
    if not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
    return float(value)


def check_count(name: str, value: int) -> None:
    """Raise ``ValueError("<name> must be >= 0, ...")`` if ``value`` is negative."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
