"""Server-side aggregation strategies: thin Flower subclasses over pure functions.

Every module of this package is imported here (:func:`import_strategies`),
so a built-in strategy is one file whose class carries
``@register_strategy("name")``; :func:`list_strategies` then names it.
"""

from .base import SparseStrategy
from .inputs import ServerInputs
from .registry import get_strategy, import_strategies, list_strategies, register_strategy

__all__ = [
    "ServerInputs", "SparseStrategy", "get_strategy", "list_strategies", "register_strategy",
]  # fmt: skip

import_strategies(__name__)
