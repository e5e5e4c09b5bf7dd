"""Neuron-wise federated averaging.

Every row of every tensor (one neuron's slice of a weight, bias or
BatchNorm statistic) becomes the example-weighted mean over the clients that
sent it; rows nobody sent keep their global value. With every client at full
budget this is exactly FedAvg (McMahan et al., https://arxiv.org/abs/1602.05629).

The clients train sparse, velocity-selected sets of neurons after NEq
(Bragagnolo et al., "To update or not to update? Neurons at equilibrium in
deep models", NeurIPS 2022, https://arxiv.org/abs/2207.09455) under a budget
(Quélennec et al., "Towards On-device Learning on the Edge: Ways to Select
Neurons to Update under a Budget Constraint", WACVW 2024,
https://arxiv.org/abs/2312.05282).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedneq.federation.wire import SparseUpdate

from .registry import register_strategy
from .row_rule import RowRule
from .rows import RowAverage, average_rows, check_weights

__all__ = ["NeuronAvg", "RowAverage", "average_rows", "check_weights", "neuron_average"]


def neuron_average(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[SparseUpdate],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """The new global state: :func:`~strategies.rows.average_rows` values.

    Every row becomes the example-weighted mean over the clients whose update
    contains it; rows nobody sent keep their global value. When every update
    contains every row this is FedAvg.
    """
    return average_rows(global_state, updates, weights).values


@register_strategy("neuron-avg")
class NeuronAvg(RowRule):
    """Neuron-wise FedAvg over sparse replies (:func:`neuron_average`).

    Parameters are those of :class:`~strategies.row_rule.RowRule` (``fednova``,
    ``label_split``) and :class:`~strategies.base.SparseStrategy`.
    """

    fedavg_at_full_budget = True

    def step(
        self, global_state: dict[str, torch.Tensor], average: RowAverage, total: float
    ) -> dict[str, torch.Tensor]:
        return average.values
