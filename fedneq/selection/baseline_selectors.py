"""The reference selectors: ``"random"``, ``"static"`` (Sparse Update) and ``"full"``.

``"random"`` is a seeded shuffle, ``"static"`` a Sparse Update scheme
(:mod:`fedneq.selection.sparse_update`) fixed at construction, ``"full"``
every neuron. Each keeps the parameter budget and, if the device has one, the
training-memory limit (``"full"`` raises if the whole model does not fit it).
"""

from __future__ import annotations

import torch
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask
from fedneq.selection.base import RequestSelector, Selector, scheme_or_tail
from fedneq.selection.budget import Budget
from fedneq.selection.memory_meter import MemoryRequest, limit_for
from fedneq.selection.registry import register_selector
from fedneq.selection.sparse_update import (
    StaticScheme,
    scheme_bias_tensors,
    scheme_mask,
    scheme_neuron_order,
)

__all__ = ["FullSelector", "RandomSelector", "StaticSelector"]


@register_selector("random")
class RandomSelector(RequestSelector):
    """A seeded shuffle (``torch.randperm`` with the passed generator), then the rule."""

    def choose(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return self.neuron_map.train_mask(self.random_order(generator))


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
        memory: MemoryRequest | None = None,
        **_: object,
    ) -> None:
        requested = budget.resolve(neuron_map.selectable_params)
        scheme = scheme_or_tail(scheme, model, neuron_map, requested)
        full = scheme_mask(scheme, model, neuron_map)
        own = int(neuron_map.costs()[full.neurons].sum())
        biases = scheme_bias_tensors(scheme, model)
        super().__init__(
            neuron_map=neuron_map,
            rule=rule,
            budget=min(requested, own),
            memory=limit_for(memory, model, biases),
        )
        self.scheme = scheme
        fits = self.memory is None or self.memory.meter.mask_bytes(full.neurons) <= (
            self.memory.limit_bytes
        )
        if requested >= own and fits:
            self._mask = full
        else:
            neurons = self.ordered(scheme_neuron_order(scheme, model, neuron_map))
            self._mask = neuron_map.train_mask(neurons, biases)

    def choose(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return TrainMask(self._mask.neurons.clone(), self._mask.full_tensors)


@register_selector("full")
class FullSelector(RequestSelector):
    """Every neuron; the budget is all selectable parameters (a requested one is only validated).

    With a memory limit the whole model must fit it, or construction raises.
    """

    def __init__(self, **request: object) -> None:
        super().__init__(**request)  # validates the requested budget
        self.budget = self.neuron_map.selectable_params
        if self.memory is not None:
            needed = self.memory.meter.mask_bytes(~self.neuron_map.empty_mask())
            if needed > self.memory.limit_bytes:
                raise ValueError(
                    f"selector 'full' needs {needed} bytes of training memory, more than "
                    f"memory_limit_bytes={self.memory.limit_bytes}; allowed: >= {needed}, or a "
                    "selector that keeps the limit"
                )

    def choose(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        return self.neuron_map.train_mask(torch.ones(self.neuron_map.num_neurons, dtype=torch.bool))
