"""Training memory of a neuron selection, and a device's memory limit.

:class:`MemoryMeter` prices any selection exactly as
:func:`~fedneq.costs.mask_cost`'s ``training_memory_bytes`` does, without
calling it: weights, the gradients and optimizer state of the trained rows,
and the activations autograd saves (which are not additive over neurons: the
earliest trained layer decides what is kept). :class:`MemoryLimit` pairs a
meter with a limit in bytes; :class:`MemoryRequest` is a limit asked of
:func:`~fedneq.selection.registry.get_selector` before the selector adds its
own fixed tensors. :func:`resolve_memory_limit` turns a device's
``memory_fraction`` into bytes; :func:`memory_bound` says which limit binds.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedneq._validate import check_int, is_int, is_real, owner, row_numel
from fedneq.costs import OPTIMIZER_STATES, CostProfile
from fedneq.neurons import NeuronMap

__all__ = [
    "MemoryLimit",
    "MemoryMeter",
    "MemoryRequest",
    "limit_for",
    "memory_bound",
    "memory_request",
    "resolve_memory_limit",
]

_NEVER = 2**62  # start order when nothing trains: no saved activation is that late


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

    Attributes
    ----------
    fixed_bytes:
        Memory before any neuron is selected (weights, the always-trained set
        and ``extra``, their saved activations).
    layer_of:
        (N,) int64 neuron -> index of its layer in ``neuron_map.layers``.
    layer_start:
        (L,) int64 execution order of each layer's earliest module.
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
        check_int("batch_size", batch_size, 1)
        check_int("bytes_per_value", bytes_per_value, 1)
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
            per_param * sum(row_numel(params[t]) for t in lay.param_tensors if t not in base)
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
        self.layer_of = neuron_map.layer_index()  # (N,)
        self.layer_start = torch.tensor(  # (L,) execution order of each layer's earliest module
            [
                min(profile.order_of(owner(t)) for t in lay.param_tensors)
                for lay in neuron_map.layers
            ],
            dtype=torch.int64,
        )
        base_modules = {owner(k) for k in base if k in params}
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
                if modules & {owner(t) for t in lay.param_tensors}:
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
        for i, start in enumerate(self.layer_start.tolist()):
            triggered = [on or c in self._triggers[i] for c, on in enumerate(base)]
            saved = self._saved(min(start, self._base_start), triggered)
            own = int(self._layer_bytes[i]) + int(self._layer_open[i])
            alone.append(self._static + own + saved - self.fixed_bytes)
        return torch.tensor(alone, dtype=torch.int64)[self.layer_of]

    def mask_bytes(self, neurons: torch.Tensor) -> int:
        """``training_memory_bytes`` of ``train_mask(neurons, extra)``; ``neurons`` is (N,) bool."""
        n = self.layer_of.numel()
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
        layers = torch.unique(self.layer_of[neurons]).tolist()
        start = min([self._base_start, *(int(self.layer_start[i]) for i in layers)])
        triggered = list(self._base_triggered())
        for i in layers:
            for c in self._triggers[i]:
                triggered[c] = True
        params = int(self._layer_bytes[self.layer_of[neurons]].sum())
        params += int(self._layer_open[layers].sum()) if layers else 0
        return self._static + params + self._saved(start, triggered)

    def prefix_bytes(self, order: torch.Tensor) -> torch.Tensor:
        """(K,) int64: training memory of ``order[:k + 1]`` for every ``k``."""
        layer = self.layer_of[order]  # (K,)
        params = torch.cumsum(self._layer_bytes[layer], 0)
        if self.dense_grads:  # a layer's whole tensors from its first neuron in the order on
            positions = torch.full_like(self._layer_open, layer.numel())  # (L,)
            positions.scatter_reduce_(0, layer, torch.arange(layer.numel()), reduce="amin")
            first = torch.arange(layer.numel()) == positions[layer]  # (K,)
            params = params + torch.cumsum(self._layer_open[layer] * first, 0)
        start = torch.cummin(self.layer_start[layer], 0).values.clamp(max=self._base_start)
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
        starts, layer_bytes = self.layer_start.tolist(), self._layer_bytes.tolist()
        open_bytes, opened = self._layer_open.tolist(), set()
        layers = self.layer_of[order].tolist()
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
        if not is_int(limit) or limit < 1:
            raise ValueError(f"memory_limit_bytes must be an int >= 1, got {limit!r}")
        minimum = self.meter.fixed_bytes
        if limit < minimum:
            raise ValueError(
                f"memory_limit_bytes={limit} is below the {minimum} bytes training needs before "
                f"any neuron is selected (weights, the always-trained set and its saved "
                f"activations; batch_size={self.meter.batch_size}, "
                f"optimizer={self.meter.optimizer!r}); allowed: >= {minimum}"
            )


@dataclass(frozen=True)
class MemoryRequest:
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


def memory_request(
    neuron_map: NeuronMap,
    memory_limit_bytes: int | None,
    cost_profile: CostProfile | None,
    batch_size: int,
    optimizer: str,
    dense_grads: bool = False,
) -> MemoryRequest | None:
    """The memory limit :func:`~fedneq.selection.registry.get_selector` was asked for, checked
    (``None``: no limit)."""
    if memory_limit_bytes is None:
        return None
    limit = memory_limit_bytes
    if not is_int(limit) or limit < 1:
        raise ValueError(f"memory_limit_bytes must be None or an int >= 1, got {limit!r}")
    if not isinstance(cost_profile, CostProfile):
        raise ValueError(
            "memory_limit_bytes needs cost_profile=fedneq.costs.profile_model(model, neuron_map, "
            f"input_shape), got cost_profile={cost_profile!r}"
        )
    if cost_profile.neuron_map != neuron_map:
        raise ValueError("cost_profile was built for a different neuron map than neuron_map")
    check_int("batch_size", batch_size, 1)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    return MemoryRequest(int(limit), cost_profile, batch_size, optimizer, bool(dense_grads))



def limit_for(
    memory: MemoryRequest | None, model: nn.Module, extra: Iterable[str] = ()
) -> MemoryLimit | None:
    """``memory``'s limit for ``model`` with ``extra`` tensors trained by every selection."""
    return None if memory is None else memory.limit(model, extra)



def resolve_memory_limit(
    meter: MemoryMeter, limit_bytes: int | None = None, fraction: float | None = None
) -> int | None:
    """A device's training-memory limit in bytes for the model ``meter`` prices.

    ``limit_bytes`` is returned as is. ``fraction`` (in ``[0, 1]``) places
    the limit between the least memory that trains anything, ``low`` (the
    cheapest neuron alone, :meth:`MemoryMeter.alone_bytes`: the weights, its
    layer's gradient and optimizer state and the activations from its layer
    on), and training everything, ``full``:
    ``low + floor(fraction * (full - low))``. So every memory-limited device
    can train something, whatever the model. Neither: ``None`` (no limit).
    """
    if limit_bytes is not None and fraction is not None:
        raise ValueError(
            f"give limit_bytes or fraction, not both (got {limit_bytes!r} and {fraction!r})"
        )
    if fraction is None:
        return limit_bytes
    if not is_real(fraction):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    everything = meter.mask_bytes(torch.ones(meter.layer_of.numel(), dtype=torch.bool))
    low = int(meter.alone_bytes().min())
    return low + int(float(fraction) * (everything - low))


def memory_bound(meter: MemoryMeter, budget_only: torch.Tensor, limit_bytes: int | None) -> bool:
    """Whether the memory limit, not the parameter budget, binds a selection.

    ``budget_only`` is the (N,) bool selection the same selector makes with
    the parameter budget alone; the memory limit binds when that selection
    would not fit it (``meter.mask_bytes(budget_only) > limit_bytes``). No
    limit: never memory-bound.
    """
    return limit_bytes is not None and meter.mask_bytes(budget_only) > limit_bytes
