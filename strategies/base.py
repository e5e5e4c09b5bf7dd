"""``SparseStrategy``: Flower's FedAvg plumbing around a pure aggregation rule.

Sampling, configuration, evaluation and metric averaging are Flower's
:class:`~flwr.serverapp.strategy.FedAvg`; what changes is training
aggregation. Replies follow the sparse wire format (:mod:`fedneq.wire`): a
fixed key set with variable-length arrays, so Flower's consistency checks
pass, and ``aggregate_train`` decodes them against the global model this
strategy sent in ``configure_train`` and hands them to the pure method
:meth:`SparseStrategy.aggregate`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedneq.neurons import NeuronMap
from fedneq.wire import SparseUpdate, check_compatible, decode, from_array_record, payload_nbytes

__all__ = ["RoundSummary", "SparseStrategy"]


@dataclass(frozen=True)
class RoundSummary:
    """What one ``aggregate_train`` call received."""

    server_round: int
    num_results: int  # replies with content, aggregated
    num_failures: int  # error replies, skipped
    num_examples: float  # sum of the aggregated replies' weights
    upload_bytes: int  # sum of payload_nbytes over the aggregated replies


class SparseStrategy(FedAvg):
    """Base class of fedneq's server strategies.

    Parameters
    ----------
    neuron_map:
        The global model's neurons (:func:`fedneq.neurons.enumerate_neurons`).
    table:
        The global model's tensor table (:func:`fedneq.wire.tensor_table`).
    reference_state:
        Optional initial global ``state_dict``: checked against ``neuron_map``
        and ``table`` at construction and used as the global model until
        ``configure_train`` sends one.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, \
min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key, \
train_metrics_aggr_fn, evaluate_metrics_aggr_fn:
        As in :class:`flwr.serverapp.strategy.FedAvg` (same defaults).

    Notes
    -----
    Each reply must hold exactly one ``ArrayRecord`` (the four wire arrays)
    and one ``MetricRecord`` containing ``weighted_by_key`` (Flower's own
    consistency rule). A malformed reply raises
    :class:`fedneq.wire.WireFormatError`. Entries of the global
    ``ArrayRecord`` outside the tensor table (e.g. ``num_batches_tracked``)
    are passed through unchanged.
    """

    def __init__(
        self,
        neuron_map: NeuronMap,
        table: Sequence[str],
        *,
        reference_state: Mapping[str, torch.Tensor] | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        if not isinstance(neuron_map, NeuronMap):
            raise ValueError(f"neuron_map must be a NeuronMap, got {type(neuron_map).__name__}")
        if isinstance(table, str) or not table:
            raise ValueError(f"table must be a non-empty sequence of state_dict keys, got {table!r}")
        for name, value in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name, value in (
            ("min_train_nodes", min_train_nodes),
            ("min_evaluate_nodes", min_evaluate_nodes),
            ("min_available_nodes", min_available_nodes),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.neuron_map = neuron_map
        self.table = tuple(table)
        self.summaries: list[RoundSummary] = []
        self.last_rejected: dict[int, str] = {}  # node id -> reason, of the last aggregate_train
        self.sample: Callable[[Grid, int], Sequence[int]] | None = None
        self._global: dict[str, torch.Tensor] | None = None
        if reference_state is not None:
            self.set_global_state(reference_state)

    # --- the extension points ------------------------------------------------

    @abstractmethod
    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        """The new global state from the decoded updates (pure, no Flower types).

        Must return a tensor for every key of ``global_state``, same shape.
        """

    def train_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        """Keys merged into the training ``ConfigRecord`` (they win over the caller's)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The strategy's own state (e.g. server momentum), for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; a stateless strategy accepts only ``{}``."""
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state, got keys {sorted(state)}"
            )

    # --- global model ---------------------------------------------------------

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model last sent (or given as ``reference_state``)."""
        if self._global is None:
            raise RuntimeError(
                f"{type(self).__name__} has no global model yet: call configure_train "
                "(or pass reference_state) before aggregate_train"
            )
        return self._global

    def set_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Remember ``state`` as the global model replies are decoded against."""
        check_compatible(self.neuron_map, self.table, state, "global state")
        self._global = {k: v.detach().clone() for k, v in state.items()}

    # --- Flower ---------------------------------------------------------------

    def summary(self) -> None:
        log(INFO, "\t├──> %s: %d neurons in %d layers, %d tensors in the table",
            type(self).__name__, self.neuron_map.num_neurons, len(self.neuron_map.layers),
            len(self.table))
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, remember ``arrays`` and merge :meth:`train_config`.

        Sampling is FedAvg's unless :attr:`sample` is set: ``sample(grid,
        server_round) -> node ids`` (the fedneq server samples from its seed).
        """
        self.set_global_state(arrays.to_torch_state_dict())
        merged = ConfigRecord(dict(config))
        merged.update(self.train_config(server_round))
        if self.sample is None:
            return super().configure_train(server_round, arrays, merged, grid)
        merged["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: merged})
        return self._construct_messages(record, list(self.sample(grid, server_round)), MessageType.TRAIN)

    def check_reply(self, msg: Message) -> tuple[SparseUpdate, float]:
        """Decode one reply and its weight; raises ValueError saying what is wrong."""
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise ValueError(
                f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} "
                f"and {len(content.metric_records)}"
            )
        metrics = next(iter(content.metric_records.values()))
        if self.weighted_by_key not in metrics:
            raise ValueError(f"missing metric {self.weighted_by_key!r}")
        weight = metrics[self.weighted_by_key]
        if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
            raise ValueError(f"{self.weighted_by_key} must be a positive integer, got {weight!r}")
        wire = from_array_record(next(iter(content.array_records.values())))
        return decode(wire, self.neuron_map, self.table, self.global_state), float(weight)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check each reply, :meth:`aggregate` the good ones, average metrics.

        Error replies are skipped; a reply that fails :meth:`check_reply` is
        rejected (logged with its node and reason, kept in :attr:`last_rejected`)
        and the others are aggregated. Returns ``(None, None)`` when nothing is
        left to aggregate, like FedAvg.
        """
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        self.last_rejected = {}
        accepted: list[Message] = []
        updates: list[SparseUpdate] = []
        weights: list[float] = []
        nbytes = 0
        for msg in replies:
            if msg.has_error():
                continue
            try:
                update, weight = self.check_reply(msg)
            except (ValueError, KeyError, TypeError) as err:
                reason = f"{type(err).__name__}: {err}"
                self.last_rejected[msg.metadata.src_node_id] = reason
                log(WARNING, "round %d: rejected the update of node %d: %s",
                    server_round, msg.metadata.src_node_id, reason)  # fmt: skip
                continue
            accepted.append(msg)
            updates.append(update)
            weights.append(weight)
            nbytes += payload_nbytes(from_array_record(next(iter(msg.content.array_records.values()))))
        self.summaries.append(
            RoundSummary(server_round, len(accepted), len(errors), float(sum(weights)), nbytes)
        )
        if not accepted:
            return None, None

        global_state = self.global_state
        new_state = self.aggregate(dict(global_state), updates, weights)
        if set(new_state) != set(global_state):
            raise RuntimeError(
                f"{type(self).__name__}.aggregate must return every global key; missing "
                f"{sorted(set(global_state) - set(new_state))}, extra "
                f"{sorted(set(new_state) - set(global_state))}"
            )
        arrays = ArrayRecord({k: new_state[k] for k in global_state})
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        return arrays, metrics
