"""Server-side aggregation strategies: thin Flower subclasses over pure functions."""

from strategies.base import SparseStrategy
from strategies.registry import get_strategy, list_strategies, register_strategy

__all__ = ["SparseStrategy", "get_strategy", "list_strategies", "register_strategy"]
