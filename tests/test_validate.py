"""The shared argument checks of fedneq._validate: each names the argument, the value and what is allowed."""

from __future__ import annotations

import re

import pytest

from fedneq._validate import (
    check_at_least,
    check_in_range,
    check_one_of,
    check_subset,
    check_tuple,
)


def raises(message: str):
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


def test_bounds() -> None:
    check_at_least("nodes", 3, 3)
    with raises("nodes should be >= 3, got 2"):
        check_at_least("nodes", 2, 3)
    with raises("rounds should be >= 3 * kills + 3 = 9, got 8"):
        check_at_least("rounds", 8, 9, rule="3 * kills + 3")
    check_in_range("k", 1, 1, 5)
    check_in_range("k", 5, 1, 5)
    for bad in (0, 6):
        with raises(f"k should be in [1, 5], got {bad}"):
            check_in_range("k", bad, 1, 5)


def test_names_among_the_allowed_ones() -> None:
    check_one_of("loss", "ce", ("ce", "focal"))
    with raises("loss should be one of ('ce', 'focal'), got 'focla' (did you mean 'focal'?)"):
        check_one_of("loss", "focla", ("ce", "focal"))
    check_subset("tiers", ("a", "b"), ("a", "b", "c"))
    with raises("tiers should be a non-empty subset of ('a', 'b'), got ()"):
        check_subset("tiers", (), ("a", "b"))
    check_subset("methods", (), ["fedavg"], empty_ok=True)
    with raises("methods should be a subset of ['fedavg'], got ('fedavgg',) (did you mean 'fedavg'?)"):
        check_subset("methods", ("fedavgg",), ["fedavg"], empty_ok=True)


def test_tuples_of_valid_items() -> None:
    check_tuple("seeds", (0, 3), lambda s: isinstance(s, int) and s >= 0, "ints >= 0")
    for bad in ((), (0, -1), (0, 1.5)):
        with raises(f"seeds should be a non-empty tuple of ints >= 0, got {bad!r}"):
            check_tuple("seeds", bad, lambda s: isinstance(s, int) and s >= 0, "ints >= 0")
