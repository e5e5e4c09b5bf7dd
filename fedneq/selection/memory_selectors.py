"""Velocity within a byte budget: selectors whose scarce resource is training memory.

On a device the limit is bytes, not parameters. What a selection costs in
bytes is not additive: besides each neuron's gradient and optimizer state,
the earliest trained layer decides which activations autograd keeps (every
module call from it on keeps its input or output), so a neuron in an early
layer opens a region of activations that a deep neuron does not
(:class:`~fedneq.selection.memory_meter.MemoryMeter`). Both selectors keep the
parameter budget *and* the memory limit, with the prefix / fill rules of
:func:`~fedneq.selection.rules.select_ordered`, and fall back to their
initializer before any velocity exists. Without a memory limit they rank as
``"velocity-per-param"`` does (``|v_i| / c_i``).

* ``"velocity-per-byte"``: score ``|v_i| / m_i``, where ``m_i``
  (:meth:`MemoryMeter.neuron_bytes`) is what the neuron alone adds to the
  fixed memory: its gradient and optimizer state and the activation region
  its layer opens. Velocity per byte in its plain form: it is
  greedy on stand-alone costs, so it charges every neuron of a layer the
  whole region again, even after an earlier pick opened it.
* ``"velocity-per-param-truncated"``: ``|v_i| / c_i``, the memory limit only
  truncating the walk (the baseline: a parameter ranking cut to the memory).
* ``"velocity-region"``: pick the region first, then fill it. For every
  candidate start layer ``s`` (execution order), the neurons of ``s`` and
  the layers after it are ranked by velocity per parameter (``|v_i| / c_i``)
  and the rule takes what fits both limits; the start whose selection has
  the largest total velocity ``sum |v_i|`` wins (ties: the deeper start,
  which keeps fewer activations). Once the region's activations are paid,
  every further byte buys parameters, and velocity per parameter is the
  paper's best rule inside a parameter budget; scanning the starts finds
  where the region's price is worth paying. This is the layer-then-channel
  order of TraDy (Quélennec et al., 2025, https://arxiv.org/abs/2510.19675),
  with the layer choice made by velocity instead of at random. Candidates are
  scored with the prefix rule (vectorized); the selector's own rule then runs
  on the winning region.
"""

from __future__ import annotations

import torch

from fedneq.neurons import TrainMask
from fedneq.selection.base import ScoredSelector
from fedneq.selection.registry import register_selector
from fedneq.selection.rules import ranked

__all__ = [
    "TruncatedVelocityPerParamSelector",
    "VelocityPerByteSelector",
    "VelocityRegionSelector",
]


def _per_param(velocity: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    return velocity.abs() / costs.to(torch.float64).clamp(min=1)


@register_selector("velocity-per-byte")
class VelocityPerByteSelector(ScoredSelector):
    """Score ``|v_i| / m_i``: velocity per byte the neuron adds alone (see the module)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._bytes: torch.Tensor | None = None
        if self.memory is not None:
            self._bytes = self.memory.meter.neuron_bytes().to(torch.float64).clamp(min=1)

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        if self._bytes is None:
            return _per_param(velocity, self.costs)
        return velocity.abs() / self._bytes


@register_selector("velocity-per-param-truncated")
class TruncatedVelocityPerParamSelector(ScoredSelector):
    """Score ``|v_i| / c_i`` whatever the memory limit, which only truncates the walk.

    The baseline of the frontier: the paper's best parameter ranking, cut where
    the device's memory ends (``"velocity-per-param"`` instead folds the
    memory into its score).
    """

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        return _per_param(velocity, self.costs)


@register_selector("velocity-region")
class VelocityRegionSelector(ScoredSelector):
    """The start layer with the most velocity inside both limits, then velocity per parameter."""

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        return _per_param(velocity, self.costs)

    def choose(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        if velocity is None or self.memory is None:
            return super().choose(velocity, generator)
        region = self.region(velocity)
        order = ranked(self.scores(velocity), self.costs)
        order = order[region[order]]
        return self.neuron_map.train_mask(self.ordered(order))

    def region(self, velocity: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the neurons of the chosen start layer and of every layer after it."""
        assert self.memory is not None
        meter, limit = self.memory.meter, self.memory.limit_bytes
        speed = velocity.abs()
        order = ranked(self.scores(velocity), self.costs)  # (N,) best first
        layer_start = meter.layer_start  # (L,) execution order of each layer's earliest module
        neuron_start = layer_start[meter.layer_of]  # (N,)
        alone = meter.neuron_bytes() + meter.fixed_bytes  # (N,) memory of each neuron alone
        best_value, best_start = -1.0, None
        for start in sorted(set(layer_start.tolist()), reverse=True):  # deepest first
            inside = neuron_start >= start
            if int(alone[neuron_start == start].min()) > limit:
                continue  # the region's own activations do not fit
            candidate = order[inside[order]]
            fits = torch.cumsum(self.costs[candidate], 0) <= self.budget
            fits &= meter.prefix_bytes(candidate) <= limit
            value = float(speed[candidate[: int(fits.sum())]].sum())
            if value > best_value:  # strictly: ties keep the deeper start
                best_value, best_start = value, start
        if best_start is None:  # not even the deepest layer fits: nothing can train
            return torch.zeros_like(neuron_start, dtype=torch.bool)
        return neuron_start >= best_start
