"""``RowRule``: the neuron-format rules' shared options, FedNova and the label split.

Every rule over neuron replies (``neuron-avg``, ``sparse-fedavg``,
``server-momentum``, ``fednova``, ``fedadam``, ``fedyogi``) first averages each
row over the clients that sent it (:class:`~strategies.rows.RowAverage`), then
turns that average into the new global state its own way
(:meth:`RowRule.step`). Two switches change the first part for all of them:

* ``fednova``: the average normalises each client's update by its local
  optimizer steps (:func:`~strategies.rows.fednova_average`); the steps are
  each reply's :data:`~fedneq.federation.protocol.LOCAL_STEPS_KEY`, held to
  the server's count (:class:`~strategies.base.ReplyFacts`).
* ``label_split``: each row of the classifier head (weight and bias) comes
  only from the clients whose partition holds its label
  (:mod:`strategies.label_split`; the labels and the head's tensors are what
  the server knows, :class:`~strategies.inputs.ServerInputs`).

Both off (the default), the rules are what they were, bit for bit.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from logging import WARNING
from typing import Any

import torch
from flwr.app import Message
from flwr.supercore import log

from fedneq.federation.protocol import LOCAL_STEPS_KEY
from fedneq.federation.wire import SparseUpdate
from fedneq.neurons import NeuronMap

from .base import ReplyFacts, SparseStrategy
from .label_split import label_weights, split_labels
from .options import check_flag
from .rows import RowAverage, average_rows, fednova_average

__all__ = ["RowRule", "parameter_keys"]


def parameter_keys(neuron_map: NeuronMap) -> frozenset[str]:
    """Every parameter name ``neuron_map`` accounts for (neurons, always/never trained)."""
    keys = set(neuron_map.always_trained) | set(neuron_map.never_trained)
    for layer in neuron_map.layers:
        keys.update(layer.param_tensors)
    return frozenset(keys)


class RowRule(SparseStrategy):
    """Base of the neuron-format rules (module notes).

    Parameters
    ----------
    fednova : bool (default: False)
        Normalise each client's update by its local optimizer steps, per
        element (:func:`~strategies.rows.fednova_average`).
    label_split : bool (default: False)
        Average each classifier-head row only over the clients holding its
        label (:mod:`strategies.label_split`).
    **kwargs
        Those of :class:`~strategies.base.SparseStrategy`.
    """

    def __init__(
        self,
        neuron_map: NeuronMap,
        table: Sequence[str],
        *,
        fednova: bool = False,
        label_split: bool = False,
        **kwargs: Any,
    ) -> None:
        self.fednova = check_flag("fednova", fednova)
        self.label_split = check_flag("label_split", label_split)
        super().__init__(neuron_map, tuple(table), **kwargs)
        self.param_keys = parameter_keys(neuron_map) & set(self.table)
        self._warned_no_head = False

    def check_reply(self, msg: Message) -> tuple[SparseUpdate, float]:
        """:meth:`SparseStrategy.check_reply`; with ``fednova``, also a reply whose local steps
        are unknown (not declared, and the server has no count for its node) is rejected."""
        checked = super().check_reply(msg)
        if self.fednova and self.reply_facts(msg).local_steps is None:
            raise ValueError(
                f"fednova needs the reply's local steps ({LOCAL_STEPS_KEY}): it declares none and "
                "the server has no count for its node"
            )
        return checked

    @abstractmethod
    def step(
        self, global_state: dict[str, torch.Tensor], average: RowAverage, total: float
    ) -> dict[str, torch.Tensor]:
        """The new global state from the round's :class:`~strategies.rows.RowAverage`;
        ``total`` is the round's total weight."""

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        """The rule knowing nothing of the replies (no steps, no labels)."""
        facts = [ReplyFacts(-1, None, None) for _ in updates]
        return self.aggregate_with_facts(global_state, updates, weights, facts)

    @property
    def uses_reply_facts(self) -> bool:
        """``fednova`` or ``label_split`` is on."""
        return self.fednova or self.label_split

    def aggregate_with_facts(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
        facts: list[ReplyFacts],
    ) -> dict[str, torch.Tensor]:
        """:meth:`step` over the :meth:`row_average` of the round."""
        return self.step(global_state, self.row_average(global_state, updates, weights, facts),
                         float(sum(weights)))  # fmt: skip

    def row_average(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
        facts: list[ReplyFacts],
    ) -> RowAverage:
        """The round's row average, with the ``fednova`` and ``label_split`` switches applied.

        Raises
        ------
        ValueError
            With ``fednova``, if a reply's local steps are unknown (it did not
            declare them and the server has no count for its node).
        """
        eligible: dict[str, torch.Tensor] = {}
        if self.label_split:
            head = self.server_inputs.head_tensors & set(self.table)
            if not head and not self._warned_no_head:
                log(WARNING, "%s: label_split is on, but the server named no classifier head "
                    "(ServerInputs.head_tensors): the head is aggregated as usual",
                    type(self).__name__)  # fmt: skip
                self._warned_no_head = True
            labels = [f.labels for f in facts]
            updates = split_labels(updates, labels, head)
            eligible = label_weights(global_state, labels, weights, head)
        if self.fednova:
            steps = [f.local_steps for f in facts]
            if any(t is None for t in steps):
                raise ValueError(
                    "fednova needs every reply's local steps: a reply declared none and the "
                    "server has no count for its node"
                )
            average = fednova_average(global_state, updates, weights, steps, self.param_keys)  # type: ignore[arg-type]
        else:
            average = average_rows(global_state, updates, weights)
        if eligible:
            average = RowAverage(average.values, average.rows, average.weights, eligible)
        return average
