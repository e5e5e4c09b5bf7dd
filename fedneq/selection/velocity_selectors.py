"""The velocity selectors of the paper: ``"velocity"`` (``|v|``) and ``"velocity-per-param"``.

Quélennec et al., "Towards On-device Learning on the Edge: Ways to Select
Neurons to Update under a Budget Constraint", WACVW 2024
(https://arxiv.org/abs/2312.05282), after NEq (Bragagnolo et al., NeurIPS 2022).
Both rank neurons by a score of the velocity and take what the rule fits
(:mod:`fedneq.selection.rules`); before any velocity they use their
initializer. With a memory limit, ``"velocity-per-param"`` scores velocity per
unit of combined cost, ``|v_i| / (c_i / B + m_i / (M - M_0))``: the share of
the parameter budget ``B`` plus the share of the free memory ``M - M_0`` that
the neuron takes alone (``m_i``: :meth:`~fedneq.selection.memory_meter.MemoryMeter.neuron_bytes`, its
gradient and optimizer state and the activations saved from its layer on).
"""

from __future__ import annotations

import torch

from fedneq.selection.base import ScoredSelector
from fedneq.selection.registry import register_selector

__all__ = ["VelocityPerParamSelector", "VelocitySelector"]


@register_selector("velocity")
class VelocitySelector(ScoredSelector):
    """Score ``|v_i|``: the neurons whose function still changes fastest."""

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        return velocity.abs()


@register_selector("velocity-per-param")
class VelocityPerParamSelector(ScoredSelector):
    """Score ``|v_i| / c_i``: velocity per parameter of budget spent.

    With a memory limit ``M``: ``|v_i| / (c_i / B + m_i / (M - M_0))``, velocity
    per unit of combined cost, where ``B`` is the budget, ``M_0`` the fixed
    memory (:attr:`~fedneq.selection.memory_meter.MemoryMeter.fixed_bytes`) and ``m_i`` what the neuron alone
    adds to it (:meth:`~fedneq.selection.memory_meter.MemoryMeter.neuron_bytes`). Without a limit this ranks
    like ``|v_i| / c_i``.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        cost = self.costs.to(torch.float64).clamp(min=1) / self.budget  # (N,) share of budget
        if self.memory is not None:
            meter = self.memory.meter
            free = max(self.memory.limit_bytes - meter.fixed_bytes, 1)
            cost = cost + meter.neuron_bytes().to(torch.float64) / free  # + share of free memory
        self._unit_cost = cost

    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        return velocity.abs() / self._unit_cost
