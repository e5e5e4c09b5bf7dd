"""Budgeted neuron selection: the budget, the selection rules and the selectors.

Quélennec et al., "Towards On-device Learning on the Edge: Ways to Select
Neurons to Update under a Budget Constraint", WACVW 2024
(https://arxiv.org/abs/2312.05282), after NEq (Bragagnolo et al., NeurIPS 2022).

* A :class:`Budget` counts parameters of selected neurons
  (``NeuronMap.costs()``); a fractional budget is a fraction of
  ``NeuronMap.selectable_params``. The always-trained set and a static
  scheme's bias-only tensors are outside the budget.
* Rules rank neurons by score, descending, ties to the lower index.
  ``"prefix"`` (the paper's) takes the longest prefix of that order whose
  cumulative cost fits; ``"fill"`` skips a neuron that does not fit and keeps
  going. Neither ever exceeds the budget.
* Selectors (:func:`get_selector`) turn a velocity vector into a
  :class:`~fedneq.neurons.TrainMask`: ``"velocity"`` (score ``|v|``),
  ``"velocity-per-param"`` (``|v| / cost``), ``"random"`` (a seeded shuffle),
  ``"static"`` (a Sparse Update scheme, fixed), ``"full"`` (everything).
  Velocity selectors fall back to their initializer (``"random"`` or
  ``"static"``) when no velocity exists yet.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask
from fedneq.sparse_update import (
    StaticScheme,
    get_scheme,
    scheme_bias_tensors,
    scheme_mask,
    scheme_neuron_order,
    scheme_neurons,
)

__all__ = [
    "INITIALIZERS",
    "RULES",
    "Budget",
    "Selector",
    "get_selector",
    "list_selectors",
    "register_selector",
    "select_fill",
    "select_ordered",
    "select_prefix",
]

RULES = ("prefix", "fill")
INITIALIZERS = ("random", "static")


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """A parameter budget: absolute (``params``) or relative (``fraction``); exactly one set."""

    params: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.params is None) == (self.fraction is None):
            raise ValueError(
                f"Budget needs exactly one of params or fraction, got params={self.params!r}, "
                f"fraction={self.fraction!r}"
            )
        if self.params is not None:
            if isinstance(self.params, bool) or not isinstance(self.params, numbers.Integral):
                raise ValueError(f"Budget params must be an int >= 1, got {self.params!r}")
            if self.params <= 0:
                raise ValueError(f"Budget params must be >= 1, got {self.params}")
            object.__setattr__(self, "params", int(self.params))
        else:
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 < f <= 1.0:
                raise ValueError(f"Budget fraction must be in (0, 1], got {f!r}")
            object.__setattr__(self, "fraction", float(f))

    def resolve(self, total: int) -> int:
        """The budget in parameters, given ``total`` selectable parameters (fractions floor)."""
        if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total <= 0:
            raise ValueError(f"total selectable parameters must be an int >= 1, got {total!r}")
        if self.params is not None:
            if self.params > total:
                raise ValueError(
                    f"Budget params={self.params} exceeds the {total} selectable parameters; "
                    f"allowed: 1..{total}"
                )
            return self.params
        # Decimal-exact product, so that e.g. 0.29 * 100 gives 29, not 28.
        resolved = math.floor(Fraction(repr(self.fraction)) * total)
        if resolved <= 0:
            raise ValueError(
                f"Budget fraction={self.fraction} of {total} selectable parameters is 0 "
                f"parameters; allowed: a fraction in [1/{total}, 1]"
            )
        return resolved

    @classmethod
    def parse(cls, value: Budget | int | float | str) -> Budget:
        """Read a budget: int -> params, float in (0, 1] -> fraction, ``"5%"`` -> fraction.

        Strings also accept ``"1000"`` (params) and ``"0.3"`` (fraction).
        """
        if isinstance(value, Budget):
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                if text.endswith("%"):
                    return cls(fraction=float(Fraction(text[:-1].strip()) / 100))
                if text.lstrip("+").isdigit():
                    return cls(params=int(text))
                return cls(fraction=float(text))
            except ValueError as err:
                raise ValueError(
                    f"budget {value!r} is not an int (params), a float in (0, 1] or a "
                    f"percentage like '5%': {err}"
                ) from None
        if isinstance(value, bool):
            raise ValueError(f"budget must be an int, a float in (0, 1] or a str, got {value!r}")
        if isinstance(value, numbers.Integral):
            return cls(params=int(value))
        if isinstance(value, numbers.Real):
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(
                    f"a float budget is a fraction in (0, 1], got {value!r} "
                    "(pass an int for an absolute number of parameters)"
                )
            return cls(fraction=float(value))
        raise ValueError(
            f"budget must be a Budget, an int, a float in (0, 1] or a str, got {value!r}"
        )


# --------------------------------------------------------------------------- rules


def _check_costs(costs: torch.Tensor, n: int | None = None) -> None:
    if not isinstance(costs, torch.Tensor) or costs.dim() != 1 or costs.dtype != torch.int64:
        raise ValueError(
            f"costs must be a 1-D int64 tensor, got "
            f"{getattr(costs, 'dtype', type(costs).__name__)} of shape "
            f"{tuple(getattr(costs, 'shape', ()))}"
        )
    if n is not None and costs.numel() != n:
        raise ValueError(f"costs must have {n} entries (one per score), got {costs.numel()}")
    if bool((costs < 0).any()):
        raise ValueError(f"costs must be >= 0, got minimum {int(costs.min())}")


def _check_budget(budget: int) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 0:
        raise ValueError(f"budget must be an int >= 0 (parameters), got {budget!r}")


def select_ordered(
    order: torch.Tensor, costs: torch.Tensor, budget: int, rule: str = "prefix"
) -> torch.Tensor:
    """Apply ``rule`` to neurons taken in ``order``; only neurons in ``order`` can be selected.

    Parameters
    ----------
    order:
        (K,) int64 distinct neuron indices, best first (a permutation of a subset).
    costs:
        (N,) int64 cost of every neuron.
    budget:
        Parameters available (>= 0).
    rule:
        ``"prefix"`` (longest fitting prefix) or ``"fill"`` (skip what does not fit).

    Returns
    -------
    (N,) bool mask whose selected cost is at most ``budget``.
    """
    _check_costs(costs)
    _check_budget(budget)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    mask = torch.zeros(costs.numel(), dtype=torch.bool)
    ordered = costs[order]  # (K,)
    fits = torch.cumsum(ordered, 0) <= budget  # nondecreasing cumsum: True then False
    k = int(fits.sum())
    mask[order[:k]] = True
    if rule == "fill":
        remaining = budget - int(ordered[:k].sum())
        for index, cost in zip(order[k:].tolist(), ordered[k:].tolist(), strict=True):
            if cost <= remaining:
                mask[index] = True
                remaining -= cost
    return mask


def _ranked(scores: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Indices by score descending, ties to the lower index."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a 1-D floating tensor, got "
            f"{getattr(scores, 'dtype', type(scores).__name__)} of shape "
            f"{tuple(getattr(scores, 'shape', ()))}"
        )
    _check_costs(costs, scores.numel())
    if bool(torch.isnan(scores).any()):
        raise ValueError(
            f"scores contain {int(torch.isnan(scores).sum())} NaN value(s); "
            "allowed: finite or infinite floats"
        )
    return torch.sort(scores, descending=True, stable=True).indices


def select_prefix(scores: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """(N,) bool: the longest prefix of the score ranking whose cost fits ``budget``."""
    return select_ordered(_ranked(scores, costs), costs, budget, "prefix")


def select_fill(scores: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """(N,) bool: walk the score ranking, take every neuron that still fits ``budget``."""
    return select_ordered(_ranked(scores, costs), costs, budget, "fill")


# --------------------------------------------------------------------------- selectors


class Selector(ABC):
    """Turns a velocity vector (or none yet) into a :class:`TrainMask` within a budget.

    Subclasses implement :meth:`_select` (velocity already validated) and are
    registered with :func:`register_selector`; they are built by
    :func:`get_selector` with keyword arguments ``neuron_map``, ``model``,
    ``budget`` (a :class:`Budget`), ``rule``, ``initializer`` and ``scheme``
    (a :class:`StaticScheme` or ``None``), all validated.
    """

    name: ClassVar[str] = ""
    needs_velocity: ClassVar[bool] = False
    budget: int  # resolved budget in parameters

    def __init__(self, *, neuron_map: NeuronMap, rule: str, budget: int) -> None:
        self.neuron_map = neuron_map
        self.rule = rule
        self.budget = budget
        self._costs = neuron_map.costs()  # (N,)

    def select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        """The mask to train next.

        Parameters
        ----------
        velocity:
            ``(N,)`` real tensor over the neuron map, or ``None`` (no velocity yet).
        generator:
            Seeded ``torch.Generator``; the only source of randomness.
        """
        return self._select(None if velocity is None else self._check_velocity(velocity), generator)

    @abstractmethod
    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        """:meth:`select` with ``velocity`` already checked (CPU float64) or ``None``."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, budget={self.budget}, rule={self.rule!r})"
        )

    def _random(self, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"selector {self.name!r} needs a seeded torch.Generator, got {generator!r}"
            )
        order = torch.randperm(self._costs.numel(), generator=generator)
        return select_ordered(order, self._costs, self.budget, self.rule)

    def _check_velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        n = self.neuron_map.num_neurons
        if not isinstance(velocity, torch.Tensor) or tuple(velocity.shape) != (n,):
            raise ValueError(
                f"velocity must be a ({n},) tensor matching the neuron map, got "
                f"{tuple(getattr(velocity, 'shape', ()))} ({type(velocity).__name__})"
            )
        if velocity.is_complex() or velocity.dtype == torch.bool:
            raise ValueError(f"velocity must be a real tensor, got {velocity.dtype}")
        return velocity.detach().to("cpu", torch.float64)


_SELECTORS: dict[str, type[Selector]] = {}


def register_selector(name: str) -> Callable[[type[Selector]], type[Selector]]:
    """Class decorator: register a :class:`Selector` subclass under ``name``."""

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
    )


def _require_scheme(scheme: StaticScheme | None, what: str) -> StaticScheme:
    if scheme is None:
        raise ValueError(f"{what} needs scheme=<name or StaticScheme>, got scheme=None")
    return scheme


class _VelocitySelector(Selector):
    """Rank by a score of the velocity; before any velocity, use the initializer."""

    needs_velocity = True

    def __init__(
        self,
        *,
        neuron_map: NeuronMap,
        model: nn.Module,
        budget: Budget,
        rule: str,
        initializer: str,
        scheme: StaticScheme | None,
    ) -> None:
        super().__init__(
            neuron_map=neuron_map, rule=rule, budget=budget.resolve(neuron_map.selectable_params)
        )
        self.initializer = initializer
        self._initial: torch.Tensor | None = None
        if initializer == "static":
            scheme = _require_scheme(scheme, f"selector {self.name!r} with initializer='static'")
            index, norm = scheme_neurons(scheme, model, neuron_map)  # ascending index
            order = index[torch.sort(norm, descending=True, stable=True).indices]
            self._initial = select_ordered(order, self._costs, self.budget, rule)

    @abstractmethod
    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        """(N,) float64 score of every neuron; higher is trained first."""

    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        if velocity is None:
            neurons = self._random(generator) if self._initial is None else self._initial.clone()
        else:
            scores = self.scores(velocity)
            neurons = select_ordered(
                _ranked(scores, self._costs), self._costs, self.budget, self.rule
            )
        return self.neuron_map.train_mask(neurons)


@register_selector("velocity")
class VelocitySelector(_VelocitySelector):
    """Score ``|v_i|``: the neurons whose function still changes fastest."""

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        return velocity.abs()


@register_selector("velocity-per-param")
class VelocityPerParamSelector(_VelocitySelector):
    """Score ``|v_i| / c_i``: velocity per parameter of budget spent."""

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        return velocity.abs() / self._costs.to(torch.float64).clamp(min=1)


@register_selector("random")
class RandomSelector(Selector):
    """A seeded shuffle (``torch.randperm`` with the passed generator), then the rule."""

    def __init__(self, *, neuron_map: NeuronMap, budget: Budget, rule: str, **_: object) -> None:
        super().__init__(
            neuron_map=neuron_map, rule=rule, budget=budget.resolve(neuron_map.selectable_params)
        )

    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return self.neuron_map.train_mask(self._random(generator))


@register_selector("static")
class StaticSelector(Selector):
    """A Sparse Update scheme: one mask computed at construction, never changing.

    Its budget is the scheme's own neuron cost. A smaller explicit budget
    ranks the scheme's neurons by layer order, then weight-row norm, and
    applies the rule. The scheme's bias tensors are always included
    (bias-only, outside the budget).
    """

    def __init__(
        self,
        *,
        neuron_map: NeuronMap,
        model: nn.Module,
        budget: Budget,
        rule: str,
        scheme: StaticScheme | None,
        **_: object,
    ) -> None:
        scheme = _require_scheme(scheme, "selector 'static'")
        requested = budget.resolve(neuron_map.selectable_params)
        full = scheme_mask(scheme, model, neuron_map)
        own = int(neuron_map.costs()[full.neurons].sum())
        super().__init__(neuron_map=neuron_map, rule=rule, budget=min(requested, own))
        self.scheme = scheme
        if requested >= own:
            self._mask = full
        else:
            order = scheme_neuron_order(scheme, model, neuron_map)
            neurons = select_ordered(order, self._costs, self.budget, rule)
            self._mask = neuron_map.train_mask(neurons, scheme_bias_tensors(scheme, model))

    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return TrainMask(self._mask.neurons.clone(), self._mask.full_tensors)


@register_selector("full")
class FullSelector(Selector):
    """Every neuron; the budget is all selectable parameters (a requested one is only validated)."""

    def __init__(self, *, neuron_map: NeuronMap, budget: Budget, rule: str, **_: object) -> None:
        budget.resolve(neuron_map.selectable_params)  # validate the request
        super().__init__(neuron_map=neuron_map, rule=rule, budget=neuron_map.selectable_params)

    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return self.neuron_map.train_mask(torch.ones(self.neuron_map.num_neurons, dtype=torch.bool))
