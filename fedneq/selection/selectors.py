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
* A device may also have a training-memory limit (``memory_limit_bytes``).
  Every selector then keeps both limits: the rules walk the same order and a
  neuron fits only if the parameter budget *and* the exact training memory of
  the selection so far plus that neuron (:class:`MemoryMeter`, equal to
  :func:`~fedneq.costs.mask_cost`'s ``training_memory_bytes``) stay within
  limits. ``"velocity-per-param"`` then scores velocity per unit of combined
  cost, ``|v_i| / (c_i / B + m_i / (M - M_0))``: the share of the parameter
  budget ``B`` plus the share of the free memory ``M - M_0`` that the neuron
  takes alone (``m_i``: :meth:`MemoryMeter.neuron_bytes`, its gradient and
  optimizer state and the activations saved from its layer on).
"""

from __future__ import annotations

import bisect
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
from torch import nn

from fedneq.costs import OPTIMIZER_STATES, CostProfile
from fedneq.neurons import NeuronMap, TrainMask
from fedneq.selection.sparse_update import (
    StaticScheme,
    get_scheme,
    scheme_bias_tensors,
    scheme_mask,
    scheme_neuron_order,
    scheme_neurons,
    tail_scheme,
)

__all__ = [
    "INITIALIZERS",
    "RULES",
    "Budget",
    "MemoryLimit",
    "MemoryMeter",
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
    order: torch.Tensor,
    costs: torch.Tensor,
    budget: int,
    rule: str = "prefix",
    memory: MemoryLimit | None = None,
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
    memory:
        Optional training-memory limit: a neuron fits only if the selection's
        memory (:meth:`MemoryMeter.mask_bytes`) stays within it as well. A
        neuron whose memory alone (:meth:`MemoryMeter.alone_bytes`) exceeds
        the limit is dropped from ``order`` first: the prefix rule then stops
        only at a neuron the device could have held.

    Returns
    -------
    (N,) bool mask whose selected cost is at most ``budget`` (and whose memory
    is at most ``memory.limit_bytes``).
    """
    _check_costs(costs)
    _check_budget(budget)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if memory is not None and rule == "fill":
        return memory.meter.fill(order, costs, budget, memory.limit_bytes)
    mask = torch.zeros(costs.numel(), dtype=torch.bool)
    if memory is not None:  # a neuron the device cannot hold even alone is no candidate
        order = order[memory.meter.alone_bytes()[order] <= memory.limit_bytes]
    ordered = costs[order]  # (K,)
    fits = torch.cumsum(ordered, 0) <= budget  # nondecreasing cumsum: True then False
    if memory is not None:  # memory of a growing prefix never decreases either
        fits &= memory.meter.prefix_bytes(order) <= memory.limit_bytes
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


# --------------------------------------------------------------------------- memory

_NEVER = 2**62  # start order when nothing trains: no saved activation is that late


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _row_numel(t: torch.Tensor) -> int:
    return t[0].numel() if t.dim() else 1


class MemoryMeter:
    """Training memory of neuron selections, exactly as :func:`~fedneq.costs.mask_cost` prices it.

    ``training_memory_bytes`` of ``neuron_map.train_mask(neurons, extra)`` is
    weights + gradients and optimizer state of the trained parameters + the
    activations autograd saves. The first two are additive over neurons; the
    saved activations are not: they are every tensor kept by a module call at or
    after the *start* ``E`` (the execution order of the earliest trained
    module), plus a Linear's input when that Linear trains. The meter tabulates
    them once by start order, so any selection, every prefix of an order
    (:meth:`prefix_bytes`, vectorized) and a greedy walk (:meth:`fill`) are
    priced without calling :func:`~fedneq.costs.mask_cost`.

    Parameters
    ----------
    profile:
        :func:`~fedneq.costs.profile_model` of ``model``.
    model:
        The profiled model (parameter shapes).
    batch_size, optimizer, bytes_per_value:
        As in :func:`~fedneq.costs.mask_cost`.
    extra:
        Whole tensors trained with every selection besides the always-trained
        set (a static scheme's biases): part of the fixed cost.
    dense_grads:
        As in :func:`~fedneq.costs.mask_cost`: ``True`` charges a layer's
        whole tensors' gradient and optimizer state once, when its first
        neuron is selected (what PyTorch allocates); ``False`` (default)
        charges every selected neuron its own rows.
    """

    def __init__(
        self,
        profile: CostProfile,
        model: nn.Module,
        *,
        batch_size: int = 32,
        optimizer: str = "sgd-momentum",
        bytes_per_value: int = 4,
        extra: Iterable[str] = (),
        dense_grads: bool = False,
    ) -> None:
        if not isinstance(profile, CostProfile):
            raise ValueError(
                f"profile must be a CostProfile (fedneq.costs.profile_model), got {profile!r}"
            )
        for arg, value in (("batch_size", batch_size), ("bytes_per_value", bytes_per_value)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if optimizer not in OPTIMIZER_STATES:
            raise ValueError(
                f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}"
            )
        neuron_map = profile.neuron_map
        params = dict(model.named_parameters())
        state_keys = set(model.state_dict())
        base = frozenset(neuron_map.always_trained) | frozenset(extra)
        unknown = sorted(base - state_keys)
        if unknown:
            raise ValueError(f"extra names tensors {unknown} that the model does not have")
        self.profile = profile
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.base = base
        self.dense_grads = bool(dense_grads)
        per_param = bytes_per_value * (1 + OPTIMIZER_STATES[optimizer])

        # weights + gradient/optimizer state: a fixed part and a per-neuron part
        base_params = sum(params[k].numel() for k in base if k in params)
        self._static = bytes_per_value * neuron_map.total_params + per_param * base_params
        layer_bytes = [
            per_param * sum(_row_numel(params[t]) for t in lay.param_tensors if t not in base)
            for lay in neuron_map.layers
        ]
        self._layer_bytes = torch.tensor(layer_bytes, dtype=torch.int64)  # (L,) per neuron
        self._layer_open = torch.zeros(len(layer_bytes), dtype=torch.int64)  # (L,) once
        if self.dense_grads:  # the whole tensors once, nothing per neuron
            self._layer_open = torch.tensor(
                [
                    per_param * sum(params[t].numel() for t in lay.param_tensors if t not in base)
                    for lay in neuron_map.layers
                ],
                dtype=torch.int64,
            )
            self._layer_bytes = torch.zeros_like(self._layer_open)
        self._layer_of = neuron_map.layer_index()  # (N,)
        self._start = torch.tensor(  # (L,) execution order of each layer's earliest module
            [
                min(profile.order_of(_owner(t)) for t in lay.param_tensors)
                for lay in neuron_map.layers
            ],
            dtype=torch.int64,
        )
        base_modules = {_owner(k) for k in base if k in params}
        self._base_start = min((profile.order_of(m) for m in base_modules), default=_NEVER)

        # saved activations: bytes of each distinct tensor, the latest order at which a
        # module keeps it unconditionally, and the Linear modules that keep it if trained
        value: dict[int, int] = {}
        latest: dict[int, int] = {}
        keepers: dict[int, set[str]] = {}
        for act in profile.saved:
            copies = batch_size if act.batched else 1
            value[act.key] = copies * act.numel * (act.itemsize or bytes_per_value)
            if act.only_if_trained:
                keepers.setdefault(act.key, set()).add(act.module)
            else:
                latest[act.key] = max(latest.get(act.key, -1), act.order)
        pairs = sorted((latest[k], value[k]) for k in latest)
        self._order_list = [o for o, _ in pairs]  # ascending
        self._orders = torch.tensor(self._order_list, dtype=torch.int64)
        suffix = torch.tensor([v for _, v in pairs] + [0], dtype=torch.int64)
        self._suffix = suffix.flip(0).cumsum(0).flip(0)  # bytes kept from each order on
        # conditional tensors: (bytes, latest unconditional order, kept from the start?)
        self._cond: list[tuple[int, int, bool]] = []
        triggers: list[list[int]] = [[] for _ in neuron_map.layers]
        for key, modules in sorted(keepers.items()):
            c = len(self._cond)
            self._cond.append((value[key], latest.get(key, -1), bool(modules & base_modules)))
            for i, lay in enumerate(neuron_map.layers):
                if modules & {_owner(t) for t in lay.param_tensors}:
                    triggers[i].append(c)
        self._triggers = tuple(tuple(t) for t in triggers)
        self.fixed_bytes = self._static + self._saved(self._base_start, self._base_triggered())
        self._alone: torch.Tensor | None = None

    def _base_triggered(self) -> tuple[bool, ...]:
        return tuple(always for _, _, always in self._cond)

    def _saved(self, start: int, triggered: Sequence[bool]) -> int:
        """Saved-activation bytes for a start order and the conditional tensors triggered."""
        total = int(self._suffix[bisect.bisect_left(self._order_list, start)])
        return total + sum(
            nbytes
            for (nbytes, latest, _), on in zip(self._cond, triggered, strict=True)
            if on and latest < start
        )

    def alone_bytes(self) -> torch.Tensor:
        """(N,) int64 training memory of each neuron selected alone (cached)."""
        if self._alone is None:
            self._alone = self.neuron_bytes() + self.fixed_bytes
        return self._alone

    def neuron_bytes(self) -> torch.Tensor:
        """(N,) int64 bytes that selecting each neuron alone adds to :attr:`fixed_bytes`.

        Its gradient and optimizer state plus every activation saved from its
        layer on (the backward region it opens), which is what limits deep
        versus shallow neurons; unlike
        :func:`~fedneq.costs.neuron_memory_costs`, which charges only the
        layer's own input.
        """
        base = self._base_triggered()
        alone = []
        for i, start in enumerate(self._start.tolist()):
            triggered = [on or c in self._triggers[i] for c, on in enumerate(base)]
            saved = self._saved(min(start, self._base_start), triggered)
            own = int(self._layer_bytes[i]) + int(self._layer_open[i])
            alone.append(self._static + own + saved - self.fixed_bytes)
        return torch.tensor(alone, dtype=torch.int64)[self._layer_of]

    def mask_bytes(self, neurons: torch.Tensor) -> int:
        """``training_memory_bytes`` of ``train_mask(neurons, extra)``; ``neurons`` is (N,) bool."""
        n = self._layer_of.numel()
        if (
            not isinstance(neurons, torch.Tensor)
            or neurons.dtype != torch.bool
            or neurons.shape != (n,)
        ):
            raise ValueError(
                f"neurons must be a ({n},) bool tensor, got "
                f"{getattr(neurons, 'dtype', type(neurons).__name__)} of shape "
                f"{tuple(getattr(neurons, 'shape', ()))}"
            )
        layers = torch.unique(self._layer_of[neurons]).tolist()
        start = min([self._base_start, *(int(self._start[i]) for i in layers)])
        triggered = list(self._base_triggered())
        for i in layers:
            for c in self._triggers[i]:
                triggered[c] = True
        params = int(self._layer_bytes[self._layer_of[neurons]].sum())
        params += int(self._layer_open[layers].sum()) if layers else 0
        return self._static + params + self._saved(start, triggered)

    def prefix_bytes(self, order: torch.Tensor) -> torch.Tensor:
        """(K,) int64: training memory of ``order[:k + 1]`` for every ``k``."""
        layer = self._layer_of[order]  # (K,)
        params = torch.cumsum(self._layer_bytes[layer], 0)
        if self.dense_grads:  # a layer's whole tensors from its first neuron in the order on
            positions = torch.full_like(self._layer_open, layer.numel())  # (L,)
            positions.scatter_reduce_(0, layer, torch.arange(layer.numel()), reduce="amin")
            first = torch.arange(layer.numel()) == positions[layer]  # (K,)
            params = params + torch.cumsum(self._layer_open[layer] * first, 0)
        start = torch.cummin(self._start[layer], 0).values.clamp(max=self._base_start)
        index = torch.searchsorted(self._orders, start)
        saved = self._suffix[index]
        for c, (nbytes, latest, always) in enumerate(self._cond):
            if always:
                on = torch.ones_like(layer, dtype=torch.bool)
            else:
                hits = torch.tensor([c in t for t in self._triggers])[layer]  # (K,)
                on = torch.cummax(hits.to(torch.int64), 0).values.bool()
            saved = saved + nbytes * (on & (latest < start)).to(torch.int64)
        return self._static + params + saved

    def fill(
        self, order: torch.Tensor, costs: torch.Tensor, budget: int, limit_bytes: int
    ) -> torch.Tensor:
        """(N,) bool: walk ``order``, take every neuron that keeps both limits."""
        mask = torch.zeros(costs.numel(), dtype=torch.bool)
        start, triggered = self._base_start, self._base_triggered()
        spent, param_bytes = 0, 0
        saved_cache: dict[tuple[int, tuple[bool, ...]], int] = {}
        starts, layer_bytes = self._start.tolist(), self._layer_bytes.tolist()
        open_bytes, opened = self._layer_open.tolist(), set()
        layers = self._layer_of[order].tolist()
        for index, layer, cost in zip(order.tolist(), layers, costs[order].tolist(), strict=True):
            if spent + cost > budget:
                continue
            new_start = min(start, starts[layer])
            new_triggered = triggered
            if self._triggers[layer]:
                new_triggered = tuple(
                    on or c in self._triggers[layer] for c, on in enumerate(triggered)
                )
            key = (new_start, new_triggered)
            if key not in saved_cache:
                saved_cache[key] = self._saved(new_start, new_triggered)
            add = layer_bytes[layer] + (0 if layer in opened else open_bytes[layer])
            if self._static + param_bytes + add + saved_cache[key] > limit_bytes:
                continue
            mask[index] = True
            spent += cost
            param_bytes += add
            opened.add(layer)
            start, triggered = new_start, new_triggered
        return mask


@dataclass(frozen=True)
class MemoryLimit:
    """A training-memory limit in bytes and the :class:`MemoryMeter` that prices selections.

    Raises ``ValueError`` if the limit is below :attr:`MemoryMeter.fixed_bytes`
    (weights + the always-trained set + the tensors every selection trains).
    """

    meter: MemoryMeter
    limit_bytes: int

    def __post_init__(self) -> None:
        limit = self.limit_bytes
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
            raise ValueError(f"memory_limit_bytes must be an int >= 1, got {limit!r}")
        minimum = self.meter.fixed_bytes
        if limit < minimum:
            raise ValueError(
                f"memory_limit_bytes={limit} is below the {minimum} bytes training needs before "
                f"any neuron is selected (weights, the always-trained set and its saved "
                f"activations; batch_size={self.meter.batch_size}, "
                f"optimizer={self.meter.optimizer!r}); allowed: >= {minimum}"
            )


# --------------------------------------------------------------------------- selectors


class Selector(ABC):
    """Turns a velocity vector (or none yet) into a :class:`TrainMask` within a budget.

    Subclasses implement :meth:`_select` (velocity already validated) and are
    registered with :func:`register_selector`; they are built by
    :func:`get_selector` with keyword arguments ``neuron_map``, ``model``,
    ``budget`` (a :class:`Budget`), ``rule``, ``initializer``, ``scheme``
    (a :class:`StaticScheme` or ``None``) and ``memory`` (a
    :class:`_MemoryRequest` or ``None``), all validated.
    """

    name: ClassVar[str] = ""
    needs_velocity: ClassVar[bool] = False
    budget: int  # resolved budget in parameters
    memory: MemoryLimit | None  # training-memory limit, if the device has one

    def __init__(
        self, *, neuron_map: NeuronMap, rule: str, budget: int, memory: MemoryLimit | None = None
    ) -> None:
        self.neuron_map = neuron_map
        self.rule = rule
        self.budget = budget
        self.memory = memory
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
        limit = "" if self.memory is None else f", memory_limit_bytes={self.memory.limit_bytes}"
        return (
            f"{type(self).__name__}(name={self.name!r}, budget={self.budget}, "
            f"rule={self.rule!r}{limit})"
        )

    def _ordered(self, order: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """The rule on ``order`` within the budget (default: the selector's) and memory limit."""
        budget = self.budget if budget is None else budget
        return select_ordered(order, self._costs, budget, self.rule, self.memory)

    def _random(self, generator: torch.Generator) -> torch.Tensor:
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"selector {self.name!r} needs a seeded torch.Generator, got {generator!r}"
            )
        return self._ordered(torch.randperm(self._costs.numel(), generator=generator))

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


@dataclass(frozen=True)
class _MemoryRequest:
    """What :func:`get_selector` was asked for; each selector adds its own fixed tensors."""

    limit_bytes: int
    profile: CostProfile
    batch_size: int
    optimizer: str
    dense_grads: bool = False

    def limit(self, model: nn.Module, extra: Iterable[str] = ()) -> MemoryLimit:
        meter = MemoryMeter(
            self.profile,
            model,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            extra=extra,
            dense_grads=self.dense_grads,
        )
        return MemoryLimit(meter, self.limit_bytes)


def _memory_request(
    neuron_map: NeuronMap,
    memory_limit_bytes: int | None,
    cost_profile: CostProfile | None,
    batch_size: int,
    optimizer: str,
    dense_grads: bool = False,
) -> _MemoryRequest | None:
    if memory_limit_bytes is None:
        return None
    limit = memory_limit_bytes
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
        raise ValueError(f"memory_limit_bytes must be None or an int >= 1, got {limit!r}")
    if not isinstance(cost_profile, CostProfile):
        raise ValueError(
            "memory_limit_bytes needs cost_profile=fedneq.costs.profile_model(model, neuron_map, "
            f"input_shape), got cost_profile={cost_profile!r}"
        )
    if cost_profile.neuron_map != neuron_map:
        raise ValueError("cost_profile was built for a different neuron map than neuron_map")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    return _MemoryRequest(int(limit), cost_profile, batch_size, optimizer, bool(dense_grads))


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
        memory=_memory_request(
            neuron_map, memory_limit_bytes, cost_profile, batch_size, optimizer, dense_grads
        ),
    )


def _scheme_or_tail(
    scheme: StaticScheme | None, model: nn.Module, neuron_map: NeuronMap, budget: int
) -> StaticScheme:
    """The given scheme, or with none given the SU-style deepest-layers scheme (``tail_scheme``)."""
    return scheme if scheme is not None else tail_scheme(model, neuron_map, budget)


def _limit(
    memory: _MemoryRequest | None, model: nn.Module, extra: Iterable[str] = ()
) -> MemoryLimit | None:
    return None if memory is None else memory.limit(model, extra)


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
        memory: _MemoryRequest | None = None,
    ) -> None:
        super().__init__(
            neuron_map=neuron_map,
            rule=rule,
            budget=budget.resolve(neuron_map.selectable_params),
            memory=_limit(memory, model),
        )
        self.initializer = initializer
        self._initial: torch.Tensor | None = None
        if initializer == "static":
            scheme = _scheme_or_tail(scheme, model, neuron_map, self.budget)
            index, norm = scheme_neurons(scheme, model, neuron_map)  # ascending index
            self._initial = self._ordered(
                index[torch.sort(norm, descending=True, stable=True).indices]
            )

    @abstractmethod
    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        """(N,) float64 score of every neuron; higher is trained first."""

    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        if velocity is None:
            neurons = self._random(generator) if self._initial is None else self._initial.clone()
        else:
            neurons = self._ordered(_ranked(self.scores(velocity), self._costs))
        return self.neuron_map.train_mask(neurons)


@register_selector("velocity")
class VelocitySelector(_VelocitySelector):
    """Score ``|v_i|``: the neurons whose function still changes fastest."""

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        return velocity.abs()


@register_selector("velocity-per-param")
class VelocityPerParamSelector(_VelocitySelector):
    """Score ``|v_i| / c_i``: velocity per parameter of budget spent.

    With a memory limit ``M``: ``|v_i| / (c_i / B + m_i / (M - M_0))``, velocity
    per unit of combined cost, where ``B`` is the budget, ``M_0`` the fixed
    memory (:attr:`MemoryMeter.fixed_bytes`) and ``m_i`` what the neuron alone
    adds to it (:meth:`MemoryMeter.neuron_bytes`). Without a limit this ranks
    like ``|v_i| / c_i``.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        cost = self._costs.to(torch.float64).clamp(min=1) / self.budget  # (N,) share of budget
        if self.memory is not None:
            meter = self.memory.meter
            free = max(self.memory.limit_bytes - meter.fixed_bytes, 1)
            cost = cost + meter.neuron_bytes().to(torch.float64) / free  # + share of free memory
        self._unit_cost = cost

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        return velocity.abs() / self._unit_cost


@register_selector("random")
class RandomSelector(Selector):
    """A seeded shuffle (``torch.randperm`` with the passed generator), then the rule."""

    def __init__(
        self,
        *,
        neuron_map: NeuronMap,
        model: nn.Module,
        budget: Budget,
        rule: str,
        memory: _MemoryRequest | None = None,
        **_: object,
    ) -> None:
        super().__init__(
            neuron_map=neuron_map,
            rule=rule,
            budget=budget.resolve(neuron_map.selectable_params),
            memory=_limit(memory, model),
        )

    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return self.neuron_map.train_mask(self._random(generator))


@register_selector("static")
class StaticSelector(Selector):
    """A Sparse Update scheme: one mask computed at construction, never changing.

    Its budget is the scheme's own neuron cost. A smaller explicit budget, or
    a memory limit the whole scheme does not fit, ranks the scheme's neurons
    by layer order, then weight-row norm, and applies the rule. The scheme's
    bias tensors are always included (bias-only, outside the budget; part of
    the fixed memory).
    """

    def __init__(
        self,
        *,
        neuron_map: NeuronMap,
        model: nn.Module,
        budget: Budget,
        rule: str,
        scheme: StaticScheme | None,
        memory: _MemoryRequest | None = None,
        **_: object,
    ) -> None:
        requested = budget.resolve(neuron_map.selectable_params)
        scheme = _scheme_or_tail(scheme, model, neuron_map, requested)
        full = scheme_mask(scheme, model, neuron_map)
        own = int(neuron_map.costs()[full.neurons].sum())
        biases = scheme_bias_tensors(scheme, model)
        super().__init__(
            neuron_map=neuron_map,
            rule=rule,
            budget=min(requested, own),
            memory=_limit(memory, model, biases),
        )
        self.scheme = scheme
        fits = self.memory is None or self.memory.meter.mask_bytes(full.neurons) <= (
            self.memory.limit_bytes
        )
        if requested >= own and fits:
            self._mask = full
        else:
            neurons = self._ordered(scheme_neuron_order(scheme, model, neuron_map))
            self._mask = neuron_map.train_mask(neurons, biases)

    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return TrainMask(self._mask.neurons.clone(), self._mask.full_tensors)


@register_selector("full")
class FullSelector(Selector):
    """Every neuron; the budget is all selectable parameters (a requested one is only validated).

    With a memory limit the whole model must fit it, or construction raises.
    """

    def __init__(
        self,
        *,
        neuron_map: NeuronMap,
        model: nn.Module,
        budget: Budget,
        rule: str,
        memory: _MemoryRequest | None = None,
        **_: object,
    ) -> None:
        budget.resolve(neuron_map.selectable_params)  # validate the request
        super().__init__(
            neuron_map=neuron_map,
            rule=rule,
            budget=neuron_map.selectable_params,
            memory=_limit(memory, model),
        )
        if self.memory is not None:
            needed = self.memory.meter.mask_bytes(~neuron_map.empty_mask())
            if needed > self.memory.limit_bytes:
                raise ValueError(
                    f"selector 'full' needs {needed} bytes of training memory, more than "
                    f"memory_limit_bytes={self.memory.limit_bytes}; allowed: >= {needed}, or a "
                    "selector that keeps the limit"
                )

    def _select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return self.neuron_map.train_mask(torch.ones(self.neuron_map.num_neurons, dtype=torch.bool))


# the memory-aware selectors live in their own module; importing it registers them
from fedneq.selection import memory as _memory_selectors  # noqa: E402, F401
