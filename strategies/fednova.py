"""FedNova on sparse replies: each element's update normalised by its trainers' local steps.

Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020, https://arxiv.org/abs/2007.07481.
Devices of a heterogeneous fleet take different numbers of local steps a
round (an mcu 6 steps of 7-8 images, a phone 1 step of all of them); plain
averaging then weighs each client's update by its steps as well as by its
examples, and the global model drifts toward the many-step clients' optimum.
FedNova divides each client's update by its step count and rescales by the
effective steps (:func:`strategies.rows.fednova_average`, per element over
the clients that trained it); ``fednova`` then mixes each element with the
global value by its trainers' share of the round, as ``sparse-fedavg`` does
(:func:`strategies.sparse_fedavg.sparse_mix`). With every client sending
every element and all taking the same number of steps it is FedAvg.

Every reply declares its steps (:data:`~fedneq.federation.protocol.LOCAL_STEPS_KEY`),
held to the count the server makes from the device and partition it knows
(:attr:`~strategies.inputs.ServerInputs.local_steps`). The same normalisation
is the ``fednova = true`` option of every neuron-format rule
(:class:`~strategies.row_rule.RowRule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedneq.neurons import NeuronMap

from .registry import register_strategy
from .sparse_fedavg import SparseFedAvg

__all__ = ["FedNova"]


@register_strategy("fednova")
class FedNova(SparseFedAvg):
    """``sparse-fedavg`` with FedNova's normalisation (module notes).

    Parameters
    ----------
    fednova : bool (default: True)
        As :class:`~strategies.row_rule.RowRule`; ``False`` is ``sparse-fedavg``.
    **kwargs
        Those of :class:`~strategies.row_rule.RowRule` and
        :class:`~strategies.base.SparseStrategy`.
    """

    fedavg_at_full_budget = False  # only when every client takes the same number of steps

    def __init__(
        self, neuron_map: NeuronMap, table: Sequence[str], *, fednova: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(neuron_map, table, fednova=fednova, **kwargs)
