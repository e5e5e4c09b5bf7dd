"""Which neurons a device trains: velocity (NEq), the budgeted selection rule and its
selectors, and the static Sparse Update schemes.

Importing the package registers the built-in selectors (each module below
decorates its classes with :func:`register_selector`):
:mod:`~fedneq.selection.velocity_selectors`,
:mod:`~fedneq.selection.baseline_selectors`,
:mod:`~fedneq.selection.memory_selectors`.
"""

from fedneq.selection import baseline_selectors, memory_selectors, velocity_selectors  # noqa: F401
from fedneq.selection.base import ScoredSelector, Selector
from fedneq.selection.budget import Budget
from fedneq.selection.memory_meter import (
    MemoryLimit,
    MemoryMeter,
    memory_bound,
    resolve_memory_limit,
)
from fedneq.selection.registry import get_selector, list_selectors, register_selector
from fedneq.selection.rules import select_fill, select_ordered, select_prefix

__all__ = [
    "Budget",
    "MemoryLimit",
    "MemoryMeter",
    "ScoredSelector",
    "Selector",
    "get_selector",
    "list_selectors",
    "memory_bound",
    "register_selector",
    "resolve_memory_limit",
    "select_fill",
    "select_ordered",
    "select_prefix",
]
