"""Checks of the rules' ``[strategy] options``: a flag, a finite number.

Each returns the value as the rule keeps it and raises ``ValueError`` naming
the option, what it allows and the value it got.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["check_flag", "check_number"]


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
