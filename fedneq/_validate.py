"""Small checks and helpers shared across fedneq, strategies and sims: one rule each.

* :func:`is_int`: a Python ``int`` or a numpy integer (anything
  :class:`numbers.Integral`), never a ``bool``.
* :func:`check_int`: ``ValueError("<name> must be an int >= <minimum>, got ...")``.
* :func:`check_positive`: a number's sign (its type is checked elsewhere).
* :func:`check_at_least`, :func:`check_in_range`: a number's bounds (its type is checked elsewhere).
* :func:`check_one_of`, :func:`check_subset`: a name, or names, among the allowed ones.
* :func:`check_tuple`: a non-empty tuple whose every item passes a test.
* :func:`did_you_mean`: the hint appended to an "unknown name" error.
* :func:`row_numel`, :func:`owner`: a tensor's row length, a state key's module.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "check_at_least",
    "check_in_range",
    "check_int",
    "check_one_of",
    "check_positive",
    "check_subset",
    "check_tuple",
    "did_you_mean",
    "is_int",
    "is_real",
    "owner",
    "row_numel",
]


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer: ``int`` or a numpy integer, not ``bool``."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (ints included), not ``bool``."""
    return isinstance(value, Real) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (:func:`is_int`) ``>= minimum``.

    ``optional=True`` also accepts ``None``.
    """
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        allowed = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    """Raise ``ValueError`` if ``value`` is negative, or zero unless ``zero_ok``."""
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} should be {bound}, got {value!r}")


def check_at_least(name: str, value: float, minimum: float, *, rule: str = "") -> None:
    """Raise ``ValueError("<name> should be >= <minimum>, got ...")`` if ``value < minimum``;
    ``rule`` says how ``minimum`` is derived (``">= <rule> = <minimum>"``)."""
    if value < minimum:
        bound = f"{rule} = {minimum}" if rule else f"{minimum}"
        raise ValueError(f"{name} should be >= {bound}, got {value!r}")


def check_in_range(name: str, value: float, low: float, high: float) -> None:
    """Raise ``ValueError("<name> should be in [<low>, <high>], got ...")`` outside the range."""
    if not low <= value <= high:
        raise ValueError(f"{name} should be in [{low}, {high}], got {value!r}")


def check_one_of(name: str, value: object, allowed: Collection[object]) -> None:
    """Raise ``ValueError("<name> should be one of <allowed>, got ...")`` unless ``value`` is
    in ``allowed`` (shown as given), with :func:`did_you_mean`'s hint."""
    if value not in allowed:
        raise ValueError(
            f"{name} should be one of {allowed}, got {value!r}" + did_you_mean(value, allowed)
        )


def check_subset(
    name: str, values: Sequence[object], allowed: Collection[object], *, empty_ok: bool = False
) -> None:
    """Raise ``ValueError("<name> should be a non-empty subset of <allowed>, got ...")`` unless
    every one of ``values`` is in ``allowed`` (shown as given), with :func:`did_you_mean`'s hint
    for the first that is not; ``empty_ok`` also accepts no values."""
    bad = [v for v in values if v not in allowed]
    if bad or not (values or empty_ok):
        kind = "a subset" if empty_ok else "a non-empty subset"
        raise ValueError(
            f"{name} should be {kind} of {allowed}, got {values!r}"
            + (did_you_mean(bad[0], allowed) if bad else "")
        )


def check_tuple(name: str, values: Sequence[object], ok: Callable[[object], bool], items: str) -> None:
    """Raise ``ValueError("<name> should be a non-empty tuple of <items>, got ...")`` unless
    ``values`` is non-empty and its every item passes ``ok``."""
    if not values or not all(ok(v) for v in values):
        raise ValueError(f"{name} should be a non-empty tuple of {items}, got {values!r}")


def did_you_mean(value: object, allowed: Iterable[object]) -> str:
    """`` (did you mean 'x'?)`` for a near miss of ``value`` among ``allowed``, else ``""``."""
    names = [str(a) for a in allowed]
    text = str(value)
    # an abbreviation ("fmnist" -> "fashion-mnist"): its letters in order in one name
    spelled_out = [n for n in names if len(text) > 2 and _in_order(text, n)]
    close = difflib.get_close_matches(text, spelled_out or names, n=1, cutoff=0.6 if not spelled_out else 0)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _in_order(short: str, name: str) -> bool:
    rest = iter(name)
    return all(char in rest for char in short)


def row_numel(t: torch.Tensor) -> int:
    """Entries of one row (``t[i]``) of ``t``; a 0-d tensor is one row of one."""
    return math.prod(t.shape[1:]) if t.dim() else 1


def owner(key: str) -> str:
    """The module that holds state entry ``key`` (``"a.b.weight"`` -> ``"a.b"``; top level ``""``)."""
    return key.rsplit(".", 1)[0] if "." in key else ""
