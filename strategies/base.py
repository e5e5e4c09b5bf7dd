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
node's partition holds, :attr:`SparseStrategy.max_examples`), of a device
class other than the one the operator gave the node
(:attr:`SparseStrategy.device_classes`), with a value beyond
``max_abs_value``, or that trains more than its device may
(:func:`trained_params`, which counts every sent tensor as the client-side
cost model does, against the budget the reply declares, and that declaration
against the node's :class:`BudgetLimit` when the server knows it). :meth:`SparseStrategy.check_replies` then rejects an
exploded update: one whose size (:func:`update_rms`) exceeds
``max_update_ratio`` times the median size of the round's other replies, or
``max_update_rms``. A rejected reply is dropped and the others aggregated.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

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

from fedneq.federation.wire import (
    SparseUpdate,
    as_rows,
    check_compatible,
    decode,
    from_array_record,
    pack_model,
    payload_nbytes,
    unpack_model,
    wire_format,
)
from fedneq.neurons import NeuronMap

__all__ = [
    "BudgetLimit",
    "RoundSummary",
    "SparseStrategy",
    "aggregate_metrics",
    "clip_factors",
    "oversized_updates",
    "scale_update",
    "trained_params",
    "update_rms",
]


@dataclass(frozen=True)
class RoundSummary:
    """What one ``aggregate_train`` call received."""

    server_round: int
    num_results: int  # replies with content, aggregated
    num_failures: int  # error replies, skipped
    num_examples: float  # sum of the aggregated replies' weights
    upload_bytes: int  # sum of payload_nbytes over the aggregated replies


@dataclass(frozen=True)
class BudgetLimit:
    """The most one node may declare: its device class's budget and local epochs.

    The server sets one per node in :attr:`SparseStrategy.budget_limits` when
    it knows the node's device class (in simulation, the seeded fleet
    assignment); a node without one is held to its own declaration only.
    """

    params: int  # budget in selectable parameters per local epoch
    local_epochs: int

    def __post_init__(self) -> None:
        for name in ("params", "local_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BudgetLimit {name} must be an int >= 1, got {value!r}")


def trained_params(
    arrays: Mapping[str, np.ndarray],
    neuron_map: NeuronMap,
    table: Sequence[str],
    reference_state: Mapping[str, torch.Tensor],
    free: Iterable[str] = (),
) -> int:
    """Selectable parameters a reply trained: what counts against its budget.

    Counted as the client-side cost model counts them: the cost of every
    sent neuron (``NeuronMap.costs``: its weight row, bias and BatchNorm
    affine parameters), plus, for every parameter tensor sent whole, the
    elements of its rows whose neuron was not sent (a whole ``.bias`` or
    BatchNorm weight is that part of every neuron of its layer). The
    always-trained set and its modules' buffers cost nothing, nor do the
    tensors in ``free`` (what the run's configuration trains outside the
    budget: a static scheme's bias-only tensors, every BatchNorm's running
    statistics under ``[train] bn_stats = "all"``). ``arrays`` must already
    be valid wire arrays (:func:`fedneq.federation.wire.decode` passed).

    Raises
    ------
    ValueError
        If a whole tensor is neither always-trained nor part of a neuron
        layer (a never-trained parameter, a buffer of a frozen module), or is
        a running statistic outside ``free`` of a layer not every neuron of
        which the reply trains: statistics travel only with their neuron.
    """
    if wire_format(arrays) == "blocks":
        return _block_trained_params(arrays, neuron_map, table, reference_state, free)
    ids = arrays["neurons"].astype(np.int64)
    total = int(neuron_map.costs()[torch.as_tensor(ids)].sum())
    sent = np.zeros(neuron_map.num_neurons, dtype=bool)
    sent[ids] = True
    layer_of = {key: layer for layer in neuron_map.layers for key in layer.tensors}
    always = set(neuron_map.always_trained)
    always_modules = {key.rsplit(".", 1)[0] for key in always}
    free = set(free)
    whole = [table[i] for i in arrays["tensors"].tolist()]
    # layers every neuron of which the reply trains: sent as neurons, or a parameter sent whole
    covered = {
        layer.name
        for layer in neuron_map.layers
        if sent[layer.offset : layer.offset + layer.num_neurons].all()
        or any(key in layer.param_tensors for key in whole)
    }
    for key in whole:
        if key in always or key.rsplit(".", 1)[0] in always_modules or key in free:
            continue
        layer = layer_of.get(key)
        if layer is None:
            raise ValueError(
                f"the reply sends tensor {key!r} whole, but it is never trained (neither in a "
                "neuron layer nor in the always-trained set)"
            )
        if key not in layer.param_tensors:
            if layer.name in covered:
                continue  # running statistics of neurons it trains: no parameters
            raise ValueError(
                f"the reply sends the running statistic {key!r} whole without training every "
                "neuron of its layer: statistics travel only with their neuron (or every one "
                "with [train] bn_stats = 'all')"
            )
        tensor = reference_state[key]
        unsent = int((~sent[layer.offset : layer.offset + layer.num_neurons]).sum())
        total += tensor.numel() // tensor.shape[0] * unsent
    return total


def _block_trained_params(
    arrays: Mapping[str, np.ndarray],
    neuron_map: NeuronMap,
    table: Sequence[str],
    reference_state: Mapping[str, torch.Tensor],
    free: Iterable[str],
) -> int:
    """:func:`trained_params` of an element-block reply: the elements of neuron-layer parameters.

    Its rows and columns are known valid (decoded); a block of a never-trained
    tensor raises ``ValueError``.
    """
    params = {key for layer in neuron_map.layers for key in layer.param_tensors}
    owned = {key for layer in neuron_map.layers for key in layer.tensors}
    always = set(neuron_map.always_trained)
    always_modules = {key.rsplit(".", 1)[0] for key in always}
    free = set(free)
    row_counts = arrays["block_row_counts"].astype(np.int64)
    col_counts = arrays["block_col_counts"].astype(np.int64)
    total = 0
    for i, r, c in zip(arrays["block_tensors"].tolist(), row_counts, col_counts, strict=True):
        key = table[i]
        if key in always or key.rsplit(".", 1)[0] in always_modules or key in free:
            continue
        if key not in owned:
            raise ValueError(
                f"the reply sends a block of {key!r}, which is never trained (neither in a neuron "
                "layer nor in the always-trained set)"
            )
        if key in params:
            shape = reference_state[key].shape
            per_cell = math.prod(shape[2:]) if len(shape) > 2 else 1  # a conv's kernel
            total += int(r) * max(int(c), 1) * per_cell
    return total


def update_rms(
    update: SparseUpdate, global_state: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> float:
    """Size of an update: root mean square of (sent - global) over the sent values of ``keys``.

    A mean per value, so that a device that trains 1 % of the model and one
    that trains all of it are comparable; ``keys`` are the parameters
    (BatchNorm running statistics legitimately move far on a new task and are
    left out). 0.0 when the update sends none of ``keys``. ``global_state`` is
    the reference ``update`` was decoded against: its unsent rows and
    elements hold the reference's values, so the change summed over whole
    tensors is the change of the sent values (two fused ops for all tensors,
    rather than a few per tensor).
    """
    sent = [key for key in keys if key in update.rows]
    if not sent:
        return 0.0
    changes = torch._foreach_sub([update.values[k] for k in sent], [global_state[k] for k in sent])
    total = float(torch.stack(torch._foreach_norm(changes)).double().square().sum())
    count = sum(
        int(update.elements[k].sum()) if k in update.elements
        else int(update.rows[k].sum()) * as_rows(global_state[k]).shape[1]
        for k in sent
    )  # fmt: skip
    return math.sqrt(total / count) if count else 0.0


def oversized_updates(
    sizes: Sequence[float], *, max_ratio: float | None, max_size: float | None
) -> dict[int, str]:
    """``{index: reason}`` of the updates too large to average in.

    An update is too large when its size exceeds ``max_size``, or
    ``max_ratio`` times the median size of the *other* updates of the round
    (a median, so that one exploded update among a few cannot hide itself by
    raising the reference; a round of one update has no reference, and a
    reference of 0 rejects nothing). ``None`` turns a rule off.
    """
    out: dict[int, str] = {}
    for i, size in enumerate(sizes):
        if max_size is not None and size > max_size:
            out[i] = f"update size (RMS change) {size:.4g} exceeds max_update_rms={max_size:g}"
            continue
        others = [s for j, s in enumerate(sizes) if j != i]
        if max_ratio is None or not others:
            continue
        reference = float(np.median(others))
        if reference > 0 and size > max_ratio * reference:
            out[i] = (
                f"update size (RMS change) {size:.4g} is {size / reference:.3g} times the median "
                f"{reference:.4g} of the round's other replies, more than max_update_ratio="
                f"{max_ratio:g}"
            )
    return out


def clip_factors(sizes: Sequence[float], *, ratio: float | None) -> list[float]:
    """Per update, the factor that bounds its size to ``ratio`` times the median of the others.

    Norm bounding (Sun et al., "Can You Really Backdoor Federated Learning?",
    2019): an honest but far-drifted client (many local steps on data the
    model fits badly) keeps its direction and loses its excess length, so one
    reply cannot swing the average. 1.0 leaves an update as it is (within the
    bound, a round of one, a reference of 0, or ``ratio`` ``None``).
    """
    factors = [1.0] * len(sizes)
    if ratio is None:
        return factors
    for i, size in enumerate(sizes):
        others = [s for j, s in enumerate(sizes) if j != i]
        reference = float(np.median(others)) if others else 0.0
        if reference > 0 and size > ratio * reference:
            factors[i] = ratio * reference / size
    return factors


def scale_update(
    update: SparseUpdate,
    global_state: Mapping[str, torch.Tensor],
    keys: Iterable[str],
    factor: float,
) -> SparseUpdate:
    """``update`` with the change of its sent rows of ``keys`` multiplied by ``factor``.

    Sent rows of other keys (BatchNorm running statistics) are left as sent.
    """
    if factor == 1.0:
        return update
    values = dict(update.values)
    for key in keys:
        sent = update.rows.get(key)
        if sent is None:
            continue
        old = as_rows(global_state[key])
        new = update.values[key].clone(memory_format=torch.contiguous_format)
        rows = as_rows(new)
        rows[sent] = old[sent] + factor * (rows[sent] - old[sent])
        values[key] = new
    return SparseUpdate(values=values, rows=update.rows)


def aggregate_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted mean of every metric over the replies that report it.

    Like Flower's ``aggregate_metricrecords`` when every reply has the same
    keys; unlike it, a key only some replies report is averaged over those
    (weights renormalized), and a key whose replies disagree on its shape
    (scalar vs list, or lists of different lengths) is dropped with a warning
    rather than failing the round. ``weighting_key`` itself is left out.
    """
    sums: dict[str, float | list[float]] = {}
    totals: dict[str, float] = {}
    dropped: set[str] = set()
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics[weighting_key])  # type: ignore[arg-type]
        for key, value in metrics.items():
            if key == weighting_key or key in dropped:
                continue
            prev = sums.get(key)
            if prev is None:
                sums[key] = (
                    [weight * v for v in value] if isinstance(value, list) else weight * value
                )
                totals[key] = weight
            elif isinstance(prev, list) and isinstance(value, list) and len(prev) == len(value):
                sums[key] = [p + weight * v for p, v in zip(prev, value, strict=True)]
                totals[key] += weight
            elif not isinstance(prev, list) and not isinstance(value, list):
                sums[key] = prev + weight * value
                totals[key] += weight
            else:
                dropped.add(key)
    for key in sorted(dropped):
        sums.pop(key, None)
        log(WARNING, "metric %r has different shapes across replies: not aggregated", key)
    return MetricRecord(
        {
            key: [v / totals[key] for v in value]
            if isinstance(value, list)
            else value / totals[key]
            for key, value in sums.items()
        }
    )


def _int_metric(metrics: MetricRecord, key: str, *, low: int, high: int | None = None) -> int:
    """``metrics[key]`` as an int in ``[low, high]``; ValueError saying what is wrong."""
    if key not in metrics:
        raise ValueError(f"missing metric {key!r}")
    value = metrics[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"metric {key!r} must be {allowed}, got {value!r}")
    return value


def _check_finite_metrics(metrics: MetricRecord) -> None:
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"metric {key!r} is not finite: {value!r}")


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
        Reject a reply whose :func:`update_rms` exceeds this many times the
        median of the round's other replies (default 10.0; ``None``: off).
        Measured on the paper sweep (MobileNetV2, Fashion-MNIST): healthy
        replies stay within a few times the median; an exploded client was
        ~10^4 times it.
    max_update_rms:
        Reject a reply whose :func:`update_rms` exceeds this absolute bound
        (default ``None``: off).
    clip_update_ratio:
        Scale down an accepted reply's change so that its :func:`update_rms`
        is at most this many times the median of the round's other replies
        (:func:`clip_factors`; default ``None``: off). Rejection stops
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
        As in FedAvg; the default is :func:`aggregate_metrics`, which
        tolerates replies reporting different metric keys.

    Notes
    -----
    :meth:`check_reply` decides what is aggregated: exactly one
    ``ArrayRecord`` (the four wire arrays, :func:`fedneq.federation.wire.decode`) and one
    ``MetricRecord`` with finite values, ``weighted_by_key`` a positive
    integer, the declared budget an integer in ``[1, selectable params]`` and
    local epochs an integer ``>= 1``, both within :attr:`budget_limits` for
    the sending node if it has an entry, and :func:`trained_params` of the
    reply at most ``min(budget * epochs, selectable params)``. Entries of the
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
        weighted_by_key: str = "num-examples",
        budget_key: str | None = "budget-params",
        epochs_key: str = "local-epochs",
        max_update_ratio: float | None = 10.0,
        max_update_rms: float | None = None,
        clip_update_ratio: float | None = None,
        max_abs_value: float | None = 1e6,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        if not isinstance(neuron_map, NeuronMap):
            raise ValueError(f"neuron_map must be a NeuronMap, got {type(neuron_map).__name__}")
        if isinstance(table, str) or not table:
            raise ValueError(
                f"table must be a non-empty sequence of state_dict keys, got {table!r}"
            )
        for name, value in (
            ("fraction_train", fraction_train),
            ("fraction_evaluate", fraction_evaluate),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name, value in (
            ("max_update_ratio", max_update_ratio),
            ("max_update_rms", max_update_rms),
            ("clip_update_ratio", clip_update_ratio),
            ("max_abs_value", max_abs_value),
        ):
            if value is not None and not (
                isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            ):
                raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
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
            train_metrics_aggr_fn=train_metrics_aggr_fn or aggregate_metrics,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn or aggregate_metrics,
        )
        self.budget_key = budget_key
        self.epochs_key = epochs_key
        self.max_update_ratio = None if max_update_ratio is None else float(max_update_ratio)
        self.max_update_rms = None if max_update_rms is None else float(max_update_rms)
        self.clip_update_ratio = None if clip_update_ratio is None else float(clip_update_ratio)
        self.max_abs_value = None if max_abs_value is None else float(max_abs_value)
        # parameters whose change measures an update's size (buffers left out)
        self._size_keys = tuple(
            key for layer in neuron_map.layers for key in layer.param_tensors
        ) + tuple(neuron_map.always_trained)
        # what the server knows about each node, set by the server that knows the fleet
        # (none of it is taken from the node): node id -> the most that node may declare,
        self.budget_limits: dict[int, BudgetLimit] = {}
        # ... the most examples it may weigh its reply with (its partition's size),
        self.max_examples: dict[int, int] = {}
        # ... and the device class the operator gave it (the reply's info["device"] must match)
        self.device_classes: dict[int, str] = {}
        # whole tensors the run trains outside the budget (trained_params' `free`)
        self.free_tensors: frozenset[str] = frozenset()
        self.neuron_map = neuron_map
        self.table = tuple(table)
        self.summaries: list[RoundSummary] = []
        self.last_rejected: dict[int, str] = {}  # node id -> reason, of the last aggregate_train
        self.last_update_rms: dict[int, float] = {}  # node id -> update_rms, of the last check
        self.last_clip: dict[int, float] = {}  # node id -> factor its change was scaled by (< 1)
        self.sample: Callable[[Grid, int], Sequence[int]] | None = None
        self._global: dict[str, torch.Tensor] | None = None
        if reference_state is not None:
            self.set_global_state(reference_state)

    #: the wire format of the replies it aggregates (:func:`fedneq.federation.wire.wire_format`)
    reply_format: str = "neurons"

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
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

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
        record. Sampling is FedAvg's unless :attr:`sample` is set: ``sample(grid,
        server_round) -> node ids`` (the fedneq server samples from its seed).
        """
        self.set_global_state(unpack_model(arrays))
        merged = ConfigRecord(dict(config))
        merged.update(self.train_config(server_round))
        if self.sample is None:
            return super().configure_train(server_round, arrays, merged, grid)
        merged["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: merged})
        return self._construct_messages(
            record, list(self.sample(grid, server_round)), MessageType.TRAIN
        )

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
        weight = _int_metric(metrics, self.weighted_by_key, low=1)
        most = self.max_examples.get(node)
        if most is not None and weight > most:
            raise ValueError(
                f"the reply declares {self.weighted_by_key}={weight}, more than the {most} "
                "examples the server knows its partition holds"
            )
        _check_finite_metrics(metrics)
        wire = from_array_record(next(iter(content.array_records.values())))
        if wire_format(wire) != self.reply_format:
            raise ValueError(
                f"the reply is in the {wire_format(wire)!r} wire format, {type(self).__name__} "
                f"aggregates {self.reply_format!r} replies"
            )
        update = decode(wire, self.neuron_map, self.table, self.global_state)
        if self.max_abs_value is not None:
            for key in ("neuron_values", "tensor_values", "block_values"):
                if key not in wire:
                    continue
                values = wire[key]
                peak = float(np.abs(values).max()) if values.size else 0.0
                if peak > self.max_abs_value:
                    raise ValueError(
                        f"the reply sends a value of magnitude {peak:.4g} in {key!r}, more than "
                        f"max_abs_value={self.max_abs_value:g}"
                    )
        if self.budget_key is not None:
            self._check_budget(self.budget_key, node, metrics, wire)
        expected = self.device_classes.get(node)
        if expected is not None:
            info = content.config_records.get("info")
            declared = info.get("device") if info is not None else None
            if declared != expected:
                raise ValueError(
                    f"the reply declares device {declared!r}, but the operator's table gives "
                    f"this node the device class {expected!r}"
                )
        return update, float(weight)

    def _check_budget(
        self, budget_key: str, node_id: int, metrics: MetricRecord, wire: Mapping[str, np.ndarray]
    ) -> None:
        selectable = self.neuron_map.selectable_params
        budget = _int_metric(metrics, budget_key, low=1, high=selectable)
        epochs = _int_metric(metrics, self.epochs_key, low=1)
        limit = self.budget_limits.get(node_id)
        if limit is not None and (budget > limit.params or epochs > limit.local_epochs):
            raise ValueError(
                f"the reply declares {budget_key}={budget}, {self.epochs_key}={epochs}, more "
                f"than its device is assigned ({limit.params} parameters, {limit.local_epochs} epochs)"
            )
        trained = trained_params(
            wire, self.neuron_map, self.table, self.global_state, self.free_tensors
        )
        allowed = min(selectable, budget * epochs)
        if trained > allowed:
            raise ValueError(
                f"the reply trains {trained} selectable parameters, more than its declared budget "
                f"allows ({budget_key}={budget} x {self.epochs_key}={epochs}, at most "
                f"{selectable}: {allowed})"
            )

    def check_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[tuple[Message, SparseUpdate, float]], dict[int, str]]:
        """:meth:`check_reply` every non-error reply: ``(accepted, {node id: reason rejected})``.

        ``accepted`` holds ``(reply, decoded update, weight)`` in reply order.
        Any exception raised while checking one reply (e.g. ``EOFError`` from
        a truncated array) rejects that reply; then the well-formed replies'
        sizes (:func:`update_rms`, kept in :attr:`last_update_rms`) reject the
        exploded ones (:func:`oversized_updates`) and, with ``clip_update_ratio``,
        scale down the change of the accepted ones that are still large
        (:func:`clip_factors`, kept in :attr:`last_clip`). Each rejection is logged.
        """
        global_state = self.global_state  # no global model yet is the caller's error: raise it here
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
        oversized = oversized_updates(
            sizes, max_ratio=self.max_update_ratio, max_size=self.max_update_rms
        )
        for i, why in oversized.items():
            node = accepted[i][0].metadata.src_node_id
            rejected[node] = why
            log(WARNING, "round %d: rejected the update of node %d: %s", server_round, node, why)
        kept = [i for i in range(len(accepted)) if i not in oversized]
        factors = clip_factors([sizes[i] for i in kept], ratio=self.clip_update_ratio)
        self.last_clip = {}
        out = []
        for i, factor in zip(kept, factors, strict=True):
            msg, update, weight = accepted[i]
            if factor < 1.0:
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
            payload_nbytes(from_array_record(next(iter(msg.content.array_records.values()))))
            for msg, _, _ in checked
        )
        num_errors = sum(m.has_error() for m in replies)
        self.summaries.append(
            RoundSummary(server_round, len(checked), num_errors, float(sum(weights)), nbytes)
        )
        if not checked:
            return None, None

        global_state = self.global_state
        updates = [update for _, update, _ in checked]
        new_state = self.aggregate(dict(global_state), updates, weights)
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
