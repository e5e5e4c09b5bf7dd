"""``SparseStrategy``: Flower's FedAvg plumbing around a pure aggregation rule.

Sampling, configuration, evaluation and metric averaging are Flower's
:class:`~flwr.serverapp.strategy.FedAvg`; what changes is training
aggregation. Replies follow the sparse wire format (:mod:`fedneq.federation.wire`): a
fixed key set with variable-length arrays, so Flower's consistency checks
pass, and ``aggregate_train`` decodes them against the global model this
strategy sent in ``configure_train`` and hands them to the pure method
:meth:`SparseStrategy.aggregate`.

Replies are untrusted. :meth:`SparseStrategy.check_reply` rejects a reply
that is malformed (records, wire arrays, indices, dtypes, non-finite values),
weighted wrongly (``num-examples`` not a positive integer, or more than the
node's partition holds, :attr:`~strategies.inputs.ServerInputs.max_examples`), of a device
class other than the one the operator gave the node
(:attr:`~strategies.inputs.ServerInputs.device_classes`), with a value beyond
``max_abs_value`` (:func:`strategies.robust.check_max_abs`), or that trains
more than its device may (:func:`strategies.budget.check_budget`: every sent
tensor counted as the client-side cost model counts it, against the budget
the reply declares, and that declaration against the node's
:class:`~strategies.budget.BudgetLimit` when the server knows it).
:meth:`SparseStrategy.check_replies` then rejects an exploded update: one
whose size (:func:`strategies.robust.update_rms`) exceeds
``max_update_ratio`` times the median size of the round's other replies, or
``max_update_rms``. A rejected reply is dropped and the others aggregated.

What the server knows of the nodes, and never takes from them, reaches the
strategy through one declared interface, never through attributes patched
onto it: :class:`strategies.inputs.ServerInputs` (budget limits, partition
sizes, device classes, the tensors trained outside the budget, the round's
sample), set with :meth:`SparseStrategy.set_server_inputs` and read as
:attr:`SparseStrategy.server_inputs`. A rule that needs more than the updates
and their weights (a reply's local steps, its client's labels) overrides
:meth:`SparseStrategy.aggregate_with_facts`, which also gets one
:class:`ReplyFacts` per update, and says when it needs them with
:attr:`SparseStrategy.uses_reply_facts`. After every aggregation
:attr:`SparseStrategy.last_coverage` holds how many of the aggregated replies
trained each parameter (:mod:`strategies.coverage`).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
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

from fedneq.federation.protocol import (
    ARRAYS_RECORD,
    BUDGET_KEY,
    CONFIG_RECORD,
    DEVICE_KEY,
    EPOCHS_KEY,
    INFO_RECORD,
    LOCAL_STEPS_KEY,
    NUM_EXAMPLES_KEY,
    SERVER_ROUND_KEY,
)
from fedneq.federation.wire import (
    SparseUpdate,
    check_compatible,
    decode,
    from_array_record,
    pack_model,
    payload_nbytes,
    unpack_model,
    wire_format,
)
from fedneq.neurons import NeuronMap

from .budget import check_budget
from .coverage import TensorCoverage, coverage
from .inputs import ServerInputs
from .metrics import aggregate_metrics, check_finite_metrics, int_metric
from .options import check_bound, check_count, check_fraction
from .robust import check_max_abs, scale_update, screen_sizes, update_rms

__all__ = ["ReplyFacts", "RoundSummary", "SparseStrategy"]


@dataclass(frozen=True)
class RoundSummary:
    """What one ``aggregate_train`` call received."""

    server_round: int
    num_results: int  # replies with content, aggregated
    num_failures: int  # error replies, skipped
    num_examples: float  # sum of the aggregated replies' weights
    upload_bytes: int  # sum of payload_nbytes over the aggregated replies


@dataclass(frozen=True)
class ReplyFacts:
    """What the server knows of one aggregated reply besides its update and weight."""

    node_id: int
    # optimizer steps of its local training: the reply's LOCAL_STEPS_KEY (checked equal to the
    # server's count where it has one), else the server's count; None: neither
    local_steps: int | None
    # the labels its partition holds, as the server computed them (ServerInputs.labels); None: unknown
    labels: frozenset[int] | None


class SparseStrategy(FedAvg):
    """Base class of fedneq's server strategies.

    Parameters
    ----------
    neuron_map:
        The global model's neurons (:func:`fedneq.neurons.enumerate_neurons`).
    table:
        The global model's tensor table (:func:`fedneq.federation.wire.tensor_table`).
    reference_state:
        Optional initial global ``state_dict``: checked against ``neuron_map``
        and ``table`` at construction and used as the global model until
        ``configure_train`` sends one.
    budget_key:
        Metric in which a reply declares its budget in selectable parameters
        per local epoch (default ``"budget-params"``, what
        :func:`fedneq.federation.client.client_round` sends). ``None`` turns the budget
        check off.
    epochs_key:
        Metric in which a reply declares its number of local epochs
        (default ``"local-epochs"``); a re-selection per epoch may train up to
        ``budget * epochs`` parameters in all.
    max_update_ratio:
        Reject a reply whose :func:`~strategies.robust.update_rms` exceeds this many times the
        median of the round's other replies (default 10.0; ``None``: off).
        Measured on the paper sweep (MobileNetV2, Fashion-MNIST): healthy
        replies stay within a few times the median; an exploded client was
        ~10^4 times it.
    max_update_rms:
        Reject a reply whose :func:`~strategies.robust.update_rms` exceeds this absolute bound
        (default ``None``: off).
    clip_update_ratio:
        Scale down an accepted reply's change so that its :func:`update_rms`
        is at most this many times the median of the round's other replies
        (:func:`~strategies.robust.clip_factors`; default ``None``: off). Rejection stops
        explosions; clipping bounds the sway of an honest far-drifted client.
    max_abs_value:
        Reject a reply that sends any value (parameters and running
        statistics alike) of magnitude above this (default ``1e6``; ``None``:
        off): the bound on a single reply's values that holds even in a round
        with no other reply to compare its update size with.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, \
min_available_nodes, weighted_by_key, arrayrecord_key, configrecord_key:
        As in :class:`flwr.serverapp.strategy.FedAvg` (same defaults).
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn:
        As in FedAvg; the default is :func:`~strategies.metrics.aggregate_metrics`, which
        tolerates replies reporting different metric keys.

    Notes
    -----
    :meth:`check_reply` decides what is aggregated: exactly one
    ``ArrayRecord`` (the four wire arrays, :func:`fedneq.federation.wire.decode`) and one
    ``MetricRecord`` with finite values, ``weighted_by_key`` a positive
    integer, the declared budget an integer in ``[1, selectable params]`` and
    local epochs an integer ``>= 1``, local steps (if declared) an integer
    ``>= 1`` equal to :attr:`~strategies.inputs.ServerInputs.local_steps` for
    the node where the server knows it, budget and epochs within
    :attr:`~strategies.inputs.ServerInputs.budget_limits` for the sending node if it has an
    entry, and :func:`~strategies.budget.trained_params` of the reply at most ``min(budget * epochs, selectable params)``. Entries of the
    global ``ArrayRecord`` outside the tensor table (e.g.
    ``num_batches_tracked``) are passed through unchanged.
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
        weighted_by_key: str = NUM_EXAMPLES_KEY,
        budget_key: str | None = BUDGET_KEY,
        epochs_key: str = EPOCHS_KEY,
        max_update_ratio: float | None = 10.0,
        max_update_rms: float | None = None,
        clip_update_ratio: float | None = None,
        max_abs_value: float | None = 1e6,
        arrayrecord_key: str = ARRAYS_RECORD,
        configrecord_key: str = CONFIG_RECORD,
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        if not isinstance(neuron_map, NeuronMap):
            raise ValueError(f"neuron_map must be a NeuronMap, got {type(neuron_map).__name__}")
        if isinstance(table, str) or not table:
            raise ValueError(
                f"table must be a non-empty sequence of state_dict keys, got {table!r}"
            )
        check_fraction("fraction_train", fraction_train)
        check_fraction("fraction_evaluate", fraction_evaluate)
        self.max_update_ratio = check_bound("max_update_ratio", max_update_ratio)
        self.max_update_rms = check_bound("max_update_rms", max_update_rms)
        self.clip_update_ratio = check_bound("clip_update_ratio", clip_update_ratio)
        self.max_abs_value = check_bound("max_abs_value", max_abs_value)
        check_count("min_train_nodes", min_train_nodes)
        check_count("min_evaluate_nodes", min_evaluate_nodes)
        check_count("min_available_nodes", min_available_nodes)
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn or aggregate_metrics,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn or aggregate_metrics,
        )
        self.budget_key = budget_key
        self.epochs_key = epochs_key
        # parameters whose change measures an update's size (buffers left out)
        self._size_keys = tuple(
            key for layer in neuron_map.layers for key in layer.param_tensors
        ) + tuple(neuron_map.always_trained)
        self._inputs = ServerInputs()  # what the server knows of the nodes: set_server_inputs
        self.neuron_map = neuron_map
        self.table = tuple(table)
        self.summaries: list[RoundSummary] = []
        self.last_rejected: dict[int, str] = {}  # node id -> reason, of the last aggregate_train
        self.last_update_rms: dict[int, float] = {}  # node id -> update_rms, of the last check
        self.last_clip: dict[int, float] = {}  # node id -> factor its change was scaled by (< 1)
        # of the last aggregate_train: per parameter, how many aggregated replies trained it
        self.last_coverage: tuple[TensorCoverage, ...] = ()
        self._payload_nbytes: dict[int, int] = {}  # id(reply) -> its wire arrays' bytes, as checked
        self._global: dict[str, torch.Tensor] | None = None
        if reference_state is not None:
            self.set_global_state(reference_state)

    #: the wire format of the replies it aggregates (:func:`fedneq.federation.wire.wire_format`)
    reply_format: str = "neurons"
    #: whether replies that all send every parameter aggregate to FedAvg's example-weighted
    #: mean, on any round (the contract tests over the registry hold a True to it)
    fedavg_at_full_budget: bool = False

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

    @property
    def uses_reply_facts(self) -> bool:
        """Whether this rule, as configured, needs the :class:`ReplyFacts` (default False).

        A rule with a switch that reads them (``fednova``: local steps;
        ``label_split``: labels) returns True while the switch is on.
        """
        return False

    def aggregate_with_facts(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
        facts: list[ReplyFacts],
    ) -> dict[str, torch.Tensor]:
        """:meth:`aggregate` given also one :class:`ReplyFacts` per update (local steps, labels).

        Override it, with :attr:`uses_reply_facts`, for a rule that needs the
        facts; the default ignores them.
        """
        return self.aggregate(global_state, updates, weights)

    def aggregate_replies(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
        facts: list[ReplyFacts],
    ) -> dict[str, torch.Tensor]:
        """What ``aggregate_train`` calls: :meth:`aggregate_with_facts` if
        :attr:`uses_reply_facts`, else :meth:`aggregate`, so a subclass that overrides only
        :meth:`aggregate` (a plug-in over a built-in rule) is what runs unless a switch that
        needs the facts is on."""
        if self.uses_reply_facts:
            return self.aggregate_with_facts(global_state, updates, weights, facts)
        return self.aggregate(global_state, updates, weights)

    def train_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        """Keys merged into the training ``ConfigRecord`` (they win over the caller's)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The strategy's own state (e.g. server momentum), for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; a stateless strategy accepts only ``{}``."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    # --- what the server knows ------------------------------------------------

    @property
    def server_inputs(self) -> ServerInputs:
        """What the server last told this strategy of the nodes (a :class:`ServerInputs`)."""
        return self._inputs

    def set_server_inputs(self, **changes: Any) -> ServerInputs:
        """Replace the named fields of :attr:`server_inputs`; the others stay. Returns the new inputs.

        The one way a server gives a strategy what it knows of the nodes,
        e.g. ``set_server_inputs(budget_limits=..., max_examples=...)`` before
        each round.

        Raises
        ------
        ValueError
            If a name is not a field of :class:`~strategies.inputs.ServerInputs`, or a value is
            not what that field takes.
        """
        known = [f.name for f in dataclasses.fields(ServerInputs)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"set_server_inputs got unknown inputs {unknown}; known: {known}")
        self._inputs = dataclasses.replace(self._inputs, **changes)
        return self._inputs

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
        log(
            INFO,
            "\t├──> %s: %d neurons in %d layers, %d tensors in the table",
            type(self).__name__,
            self.neuron_map.num_neurons,
            len(self.neuron_map.layers),
            len(self.table),
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, remember ``arrays`` and merge :meth:`train_config`.

        ``arrays`` is the global model packed by
        :func:`fedneq.federation.wire.pack_model`; every message carries that one
        record. Sampling is FedAvg's unless :attr:`~strategies.inputs.ServerInputs.sample` is
        set: ``sample(grid, server_round) -> node ids`` (the fedneq server
        samples from its seed).
        """
        self.set_global_state(unpack_model(arrays))
        merged = ConfigRecord(dict(config))
        merged.update(self.train_config(server_round))
        sample = self._inputs.sample
        if sample is None:
            return super().configure_train(server_round, arrays, merged, grid)
        merged[SERVER_ROUND_KEY] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: merged})
        return self._construct_messages(record, list(sample(grid, server_round)), MessageType.TRAIN)

    def check_reply(self, msg: Message) -> tuple[SparseUpdate, float]:
        """Decode one reply and its weight; raises ValueError saying what is wrong.

        See the class notes for what is checked.
        """
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise ValueError(
                f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} "
                f"and {len(content.metric_records)}"
            )
        node = msg.metadata.src_node_id
        metrics = next(iter(content.metric_records.values()))
        weight = int_metric(metrics, self.weighted_by_key, low=1)
        most = self._inputs.max_examples.get(node)
        if most is not None and weight > most:
            raise ValueError(
                f"the reply declares {self.weighted_by_key}={weight}, more than the {most} "
                "examples the server knows its partition holds"
            )
        check_finite_metrics(metrics)
        if LOCAL_STEPS_KEY in metrics:
            steps = int_metric(metrics, LOCAL_STEPS_KEY, low=1)
            known = self._inputs.local_steps.get(node)
            if known is not None and steps != known:
                raise ValueError(
                    f"the reply declares {LOCAL_STEPS_KEY}={steps}, but the server counts {known} "
                    "optimizer steps for its device on its partition"
                )
        wire = from_array_record(next(iter(content.array_records.values())))
        self._payload_nbytes[id(msg)] = payload_nbytes(wire)
        if wire_format(wire) != self.reply_format:
            raise ValueError(
                f"the reply is in the {wire_format(wire)!r} wire format, {type(self).__name__} "
                f"aggregates {self.reply_format!r} replies"
            )
        update = decode(wire, self.neuron_map, self.table, self.global_state)
        if self.max_abs_value is not None:
            check_max_abs(wire, self.max_abs_value)
        if self.budget_key is not None:
            self._check_budget(self.budget_key, node, metrics, wire)
        expected = self._inputs.device_classes.get(node)
        if expected is not None:
            info = content.config_records.get(INFO_RECORD)
            declared = info.get(DEVICE_KEY) if info is not None else None
            if declared != expected:
                raise ValueError(
                    f"the reply declares device {declared!r}, but the operator's table gives "
                    f"this node the device class {expected!r}"
                )
        return update, float(weight)

    def _check_budget(
        self, budget_key: str, node_id: int, metrics: MetricRecord, wire: Mapping[str, np.ndarray]
    ) -> None:
        budget = int_metric(metrics, budget_key, low=1, high=self.neuron_map.selectable_params)
        epochs = int_metric(metrics, self.epochs_key, low=1)
        check_budget(
            wire, self.neuron_map, self.table, self.global_state,
            budget=budget, epochs=epochs, limit=self._inputs.budget_limits.get(node_id),
            free=self._inputs.free_tensors, budget_key=budget_key, epochs_key=self.epochs_key,
        )  # fmt: skip

    def reply_facts(self, msg: Message) -> ReplyFacts:
        """The :class:`ReplyFacts` of a reply :meth:`check_reply` accepted."""
        node = msg.metadata.src_node_id
        metrics = next(iter(msg.content.metric_records.values()))
        steps = metrics.get(LOCAL_STEPS_KEY)
        steps = int(steps) if steps is not None else self._inputs.local_steps.get(node)
        return ReplyFacts(node, steps, self._inputs.labels.get(node))

    def check_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[tuple[Message, SparseUpdate, float]], dict[int, str]]:
        """:meth:`check_reply` every non-error reply: ``(accepted, {node id: reason rejected})``.

        ``accepted`` holds ``(reply, decoded update, weight)`` in reply order.
        Any exception raised while checking one reply (e.g. ``EOFError`` from
        a truncated array) rejects that reply; then the well-formed replies'
        sizes (:func:`~strategies.robust.update_rms`, kept in
        :attr:`last_update_rms`) reject the exploded ones and, with
        ``clip_update_ratio``, scale down the change of the accepted ones that
        are still large (:func:`~strategies.robust.screen_sizes`; the factors
        kept in :attr:`last_clip`). Each rejection is logged.
        """
        global_state = self.global_state  # no global model yet is the caller's error: raise it here
        self.last_coverage = ()
        self._payload_nbytes = {}
        accepted: list[tuple[Message, SparseUpdate, float]] = []
        rejected: dict[int, str] = {}
        for msg in replies:
            if msg.has_error():
                continue
            try:
                update, weight = self.check_reply(msg)
            except Exception as err:  # noqa: BLE001 - nothing in one untrusted reply may stop the round
                node = msg.metadata.src_node_id
                rejected[node] = f"{type(err).__name__}: {err}"
                log(WARNING, "round %d: rejected the update of node %d: %s",
                    server_round, node, rejected[node])  # fmt: skip
                continue
            accepted.append((msg, update, weight))
        sizes = [update_rms(update, global_state, self._size_keys) for _, update, _ in accepted]
        self.last_update_rms = {
            msg.metadata.src_node_id: size for (msg, _, _), size in zip(accepted, sizes, strict=True)
        }
        screen = screen_sizes(
            sizes,
            max_ratio=self.max_update_ratio,
            max_size=self.max_update_rms,
            clip_ratio=self.clip_update_ratio,
        )
        for i, why in screen.rejected.items():
            node = accepted[i][0].metadata.src_node_id
            rejected[node] = why
            log(WARNING, "round %d: rejected the update of node %d: %s", server_round, node, why)
        self.last_clip = {}
        out = []
        for i, (msg, update, weight) in enumerate(accepted):
            if i in screen.rejected:
                continue
            factor = screen.factors.get(i)
            if factor is not None:
                self.last_clip[msg.metadata.src_node_id] = factor
                update = scale_update(update, global_state, self._size_keys, factor)
            out.append((msg, update, weight))
        return out, rejected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check each reply, :meth:`aggregate` the good ones, average metrics.

        Error replies are skipped; a reply that fails :meth:`check_replies` is
        rejected (kept in :attr:`last_rejected`) and the others are
        aggregated. Returns the new global model packed
        (:func:`fedneq.federation.wire.pack_model`, as :meth:`configure_train`
        takes it) and the averaged metrics; ``(None, None)`` when nothing is
        left to aggregate, like FedAvg, or when the aggregate is not finite (the
        global model then stays as it was).
        """
        replies = list(replies)
        checked, self.last_rejected = self.check_replies(server_round, replies)
        weights = [weight for _, _, weight in checked]
        nbytes = sum(
            self._payload_nbytes.get(id(msg))
            or payload_nbytes(from_array_record(next(iter(msg.content.array_records.values()))))
            for msg, _, _ in checked
        )  # the bytes check_reply read, not read again
        num_errors = sum(m.has_error() for m in replies)
        self.summaries.append(
            RoundSummary(server_round, len(checked), num_errors, float(sum(weights)), nbytes)
        )
        if not checked:
            return None, None

        global_state = self.global_state
        updates = [update for _, update, _ in checked]
        self.last_coverage = coverage(updates, global_state, self._size_keys)
        facts = [self.reply_facts(msg) for msg, _, _ in checked]
        new_state = self.aggregate_replies(dict(global_state), updates, weights, facts)
        if set(new_state) != set(global_state):
            raise RuntimeError(
                f"{type(self).__name__}.aggregate must return every global key; missing "
                f"{sorted(set(global_state) - set(new_state))}, extra "
                f"{sorted(set(new_state) - set(global_state))}"
            )
        not_finite = [
            k
            for k, v in new_state.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if not_finite:  # finite replies can still overflow (e.g. a large server learning rate)
            log(ERROR, "round %d: %s.aggregate gave non-finite values in %s; the global model "
                "is left unchanged", server_round, type(self).__name__, not_finite)  # fmt: skip
            return None, None
        arrays = pack_model({k: new_state[k] for k in global_state})
        metrics = self.train_metrics_aggr_fn(
            [m.content for m, _, _ in checked], self.weighted_by_key
        )
        return arrays, metrics
