"""Strategies by name: ``get_strategy("neuron-avg", neuron_map=..., table=...)``.

Built-ins and users' strategies alike register with the
:func:`register_strategy` decorator::

    @register_strategy("my-rule")
    class MyRule(SparseStrategy):
        def aggregate(self, global_state, updates, weights): ...

and select it as ``"my-rule"`` once its module is imported, or from a config
as ``"my_module:my-rule"`` / ``"my_module:MyRule"`` (the module is imported).
A built-in is one module of the ``strategies`` package: the package imports
every module it holds (:func:`import_strategies`), which runs their decorators.
A ``"module:Class"`` naming a Flower strategy (``"flwr.serverapp.strategy:FedAdam"``)
runs behind :mod:`strategies.flower_adapter`, its constructor's options as options.
A strategy's *options* are the keyword arguments of its own constructor(s),
not :class:`SparseStrategy`'s plumbing (``neuron_map``, ``table``, ...):
:func:`check_strategy` checks a config's name and options without building
anything.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fedneq._validate import did_you_mean

from .base import SparseStrategy
from .flower_adapter import flower_strategy, is_flower_strategy

__all__ = [
    "check_strategy", "get_strategy", "import_strategies", "list_strategies", "register_strategy",
    "strategy_options",
]  # fmt: skip

S = TypeVar("S", bound=type[SparseStrategy])

_REGISTRY: dict[str, type[SparseStrategy]] = {}  # filled by @register_strategy


def register_strategy(name: str) -> Callable[[S], S]:
    """Class decorator registering a :class:`SparseStrategy` subclass under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is empty or taken, or the class is not a SparseStrategy.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"strategy name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"strategy name {name!r} is already registered to {_REGISTRY[name].__name__}")

    def decorator(cls: S) -> S:
        if not (inspect.isclass(cls) and issubclass(cls, SparseStrategy)):
            raise ValueError(f"register_strategy({name!r}) needs a SparseStrategy subclass, got {cls!r}")
        if inspect.isabstract(cls):
            raise ValueError(f"{cls.__name__} is abstract: implement aggregate() before registering it")
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def import_strategies(package: str) -> list[str]:
    """Import every module of ``package``, running their :func:`register_strategy` decorators.

    The ``strategies`` package calls it on itself, so that a built-in
    strategy is one file; a user's package of strategies may do the same.
    Returns the imported module names, sorted.

    Raises
    ------
    ValueError
        If ``package`` is not an importable package.
    """
    module = importlib.import_module(package)
    if not hasattr(module, "__path__"):
        raise ValueError(f"import_strategies needs a package, got module {package!r}")
    names = sorted(f"{package}.{info.name}" for info in pkgutil.iter_modules(module.__path__))
    for name in names:
        importlib.import_module(name)
    return names


def _resolve(name: str) -> type[SparseStrategy]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(
            f"unknown strategy {name!r}; known: {list_strategies()} (or 'package.module:ClassName')"
            + did_you_mean(name, list_strategies())
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot load strategy {name!r}: {err}") from err
    if attr in _REGISTRY and not hasattr(module, attr):  # a name the module registered
        return _REGISTRY[attr]
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"cannot load strategy {name!r}: module {module_name!r} has no {attr!r}")
    if is_flower_strategy(cls):  # Flower's own (Message API): aggregates densified replies
        try:
            return flower_strategy(cls)
        except ValueError as err:
            raise ValueError(f"strategy {name!r}: {err}") from None
    if not (inspect.isclass(cls) and issubclass(cls, SparseStrategy)) or inspect.isabstract(cls):
        raise ValueError(
            f"strategy {name!r} is neither a concrete SparseStrategy subclass nor a Flower "
            f"strategy (a flwr.serverapp.strategy.Strategy subclass), got {cls!r}"
        )
    return cls


def _accepted_kwargs(cls: type) -> set[str]:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names.update(
            p.name for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        )
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


_PLUMBING = _accepted_kwargs(SparseStrategy)  # set by the server, not by a config


def strategy_options(name: str) -> list[str]:
    """The options (constructor keywords a config may set) of strategy ``name``, sorted."""
    return sorted(_accepted_kwargs(_resolve(name)) - _PLUMBING)


def check_strategy(name: str, options: Mapping[str, Any]) -> None:
    """Check a config's ``[strategy] name`` and ``options`` keys, building nothing.

    Raises
    ------
    ValueError
        One line naming the unknown strategy or options, what is allowed and a
        "did you mean" for a near miss.
    """
    accepted = strategy_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"it takes {accepted}" if accepted else "it takes no options"
        raise ValueError(
            f"[strategy] options {unknown} are not options of strategy {name!r}: {takes}"
            + did_you_mean(unknown[0], accepted)
        )


def get_strategy(name: str, **cfg: Any) -> SparseStrategy:
    """Build the strategy ``name`` with keyword arguments ``cfg``.

    ``name`` is a registered name, or ``"package.module:ClassName"`` for a
    :class:`SparseStrategy` subclass in an importable module (importing it
    also runs its ``@register_strategy`` decorators). ``cfg`` needs at least
    ``neuron_map`` and ``table``.

    Raises
    ------
    ValueError
        If ``name`` is unknown or ``cfg`` has keys the strategy does not take.
    """
    cls = _resolve(name)
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(cfg) - accepted)
    if unknown:
        raise ValueError(
            f"strategy {name!r} got unknown options {unknown}; its options: "
            f"{sorted(accepted - _PLUMBING)}" + did_you_mean(unknown[0], accepted - _PLUMBING)
        )
    return cls(**cfg)
