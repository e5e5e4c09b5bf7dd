"""The selector registry: ``@register_selector("name")``, :func:`get_selector`, :func:`list_selectors`.

Built-in selectors and users' own register the same way: decorate a
:class:`~fedneq.selection.base.Selector` subclass. ``fedneq.selection``
imports the modules of the built-ins, so they are registered whenever the
package is imported.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedneq.costs import CostProfile
from fedneq.neurons import NeuronMap
from fedneq.selection.base import INITIALIZERS, Selector
from fedneq.selection.budget import Budget
from fedneq.selection.memory_meter import memory_request
from fedneq.selection.rules import RULES
from fedneq.selection.sparse_update import StaticScheme, get_scheme

__all__ = ["get_selector", "list_selectors", "register_selector"]

_SELECTORS: dict[str, type[Selector]] = {}


def register_selector(name: str) -> Callable[[type[Selector]], type[Selector]]:
    """Class decorator: register a :class:`~fedneq.selection.base.Selector` subclass as ``name``.

    The class is then built by ``get_selector(name, ...)`` with the keyword
    arguments listed in :class:`~fedneq.selection.base.Selector`::

        @register_selector("my-selector")
        class MySelector(ScoredSelector):
            def scores(self, velocity):
                return velocity.abs().sqrt()

    Raises ``ValueError`` if ``name`` is already registered.
    """

    def wrap(cls: type[Selector]) -> type[Selector]:
        if name in _SELECTORS:
            raise ValueError(
                f"selector {name!r} is already registered ({_SELECTORS[name].__name__})"
            )
        cls.name = name
        _SELECTORS[name] = cls
        return cls

    return wrap


def list_selectors() -> list[str]:
    """Names of the registered selectors, sorted."""
    return sorted(_SELECTORS)


def _parse_scheme(scheme: str | StaticScheme | None) -> StaticScheme | None:
    if scheme is None or isinstance(scheme, StaticScheme):
        return scheme
    if isinstance(scheme, str):
        return get_scheme(scheme)
    raise ValueError(f"scheme must be a scheme name, a StaticScheme or None, got {scheme!r}")


def get_selector(
    name: str,
    *,
    neuron_map: NeuronMap,
    model: nn.Module,
    budget: Budget | int | float | str,
    rule: str = "prefix",
    initializer: str = "random",
    scheme: str | StaticScheme | None = None,
    memory_limit_bytes: int | None = None,
    cost_profile: CostProfile | None = None,
    batch_size: int = 32,
    optimizer: str = "sgd-momentum",
    dense_grads: bool = False,
) -> Selector:
    """Build the selector called ``name``.

    Parameters
    ----------
    name:
        One of :func:`list_selectors`.
    neuron_map, model:
        The model's neurons and the model (static schemes read its weights once, here).
    budget:
        Parameters of selected neurons: a :class:`Budget`, an int, a float in
        (0, 1] or ``"5%"``; fractions are of ``neuron_map.selectable_params``.
    rule:
        ``"prefix"`` (default, the paper's) or ``"fill"``.
    initializer:
        ``"random"`` (default) or ``"static"`` (needs ``scheme``): the mask of a
        velocity selector before any velocity exists.
    scheme:
        Sparse Update scheme (name or :class:`StaticScheme`) for ``"static"``.
    memory_limit_bytes:
        Training-memory limit (``None``: none). Every mask then also fits
        ``mask_cost(...).training_memory_bytes <= memory_limit_bytes``.
    cost_profile:
        :func:`~fedneq.costs.profile_model` of ``model``; required with a memory limit.
    batch_size, optimizer:
        Local training settings the memory is priced for (as in
        :func:`~fedneq.costs.mask_cost`): ``"sgd"``, ``"sgd-momentum"`` or ``"adamw"``.
    dense_grads:
        Price gradients and optimizer state of whole tensors (what PyTorch
        allocates; :class:`MemoryMeter`) instead of the trained rows only.

    Raises
    ------
    ValueError
        On a bad argument; if the memory limit is below what training needs
        before any neuron is selected (the message names that minimum); if
        ``"full"`` does not fit the memory limit.
    """
    if name not in _SELECTORS:
        raise ValueError(f"selector must be one of {list_selectors()}, got {name!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if initializer not in INITIALIZERS:
        raise ValueError(f"initializer must be one of {list(INITIALIZERS)}, got {initializer!r}")
    return _SELECTORS[name](
        neuron_map=neuron_map,
        model=model,
        budget=Budget.parse(budget),
        rule=rule,
        initializer=initializer,
        scheme=_parse_scheme(scheme),
        memory=memory_request(
            neuron_map, memory_limit_bytes, cost_profile, batch_size, optimizer, dense_grads
        ),
    )
