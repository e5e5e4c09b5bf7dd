"""The dense baseline: FedAvg with every client at full budget.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, https://arxiv.org/abs/1602.05629.
"""

from __future__ import annotations

from flwr.app import ConfigRecordValues

from fedneq.federation.protocol import FULL_BUDGET_KEY

from .neuron_avg import NeuronAvg
from .registry import register_strategy

__all__ = ["DenseFedAvg"]


@register_strategy("fedavg")
class DenseFedAvg(NeuronAvg):
    """FedAvg: clients train everything, the server averages everything.

    The training config carries :data:`~fedneq.federation.protocol.FULL_BUDGET_KEY` set so every client trains
    (and sends) all its neurons; aggregation is :class:`NeuronAvg`'s
    :func:`~strategies.neuron_avg.neuron_average`, which equals FedAvg when
    every row is sent. Parameters are those of
    :class:`~strategies.base.SparseStrategy`.
    """

    def train_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {FULL_BUDGET_KEY: True}
