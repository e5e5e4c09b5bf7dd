"""Flower's own strategies behind fedneq's checks: ``"flwr.serverapp.strategy:FedAdam"``.

Any Flower Message-API :class:`~flwr.serverapp.strategy.Strategy` (the
built-ins FedAvg, FedAdam, FedMedian, FedTrimmedAvg, Krum, ... of
``flwr.serverapp.strategy``, or a third-party subclass) aggregates fedneq's
sparse replies through :class:`FlowerStrategy`, a :class:`SparseStrategy`:

1. fedneq samples the nodes and sends the round (the wrapped strategy's own
   sampling and messages are not used: fedneq's client needs fedneq's config);
2. every reply passes :meth:`SparseStrategy.check_replies` first (wire format,
   budget, weight, device class, value and update-size bounds): the wrapped
   strategy never sees a reply the server cannot trust;
3. each accepted reply is *densified*: a record of every floating-point tensor
   of the model, the elements the client did not send holding the global
   model's values (:func:`densify`);
4. the wrapped strategy's ``configure_train`` sees the global model (its
   result is discarded; FedOpt-style strategies remember ``current_arrays``
   there), then its ``aggregate_train`` gets the dense replies, each with an
   ``"arrays"`` ArrayRecord and a ``"metrics"`` MetricRecord (the reply's
   metrics the round's replies all report, ``num-examples`` included);
5. its ArrayRecord is the new global model (cast back to the model's dtypes;
   integer buffers such as ``num_batches_tracked`` are passed through).

A wrapped strategy that cannot aggregate the round (``None``, or Flower's
``AggregationError`` / ``InconsistentMessageReplies``, e.g. a trimmed mean
that trims everything) leaves the global model unchanged for that round.
The wrapped strategy's state (FedAdam's moments, FedAvgM's momentum, any
numbers and arrays among its attributes) is the adapter's
:meth:`~FlowerStrategy.state_dict`: checkpointed and rolled back with the
round like fedneq's own strategies' state.

The registry builds one adapter class per Flower class (:func:`flower_strategy`)
whose constructor keywords are the Flower class's own options (``eta``,
``beta``, ``num_malicious_nodes``, ...): a config sets them as
``[strategy] options`` and an unknown one is refused. Flower's sampling and
record-key arguments (``fraction_train``, ``weighted_by_key``, ...) are
fedneq's to set, not options.
"""

from __future__ import annotations

import copy
import functools
import inspect
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from logging import ERROR, INFO
from typing import Any

import numpy as np
import torch
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedneq.federation.wire import SparseUpdate, element_mask
from fedneq.neurons import NeuronMap

from .base import SparseStrategy

__all__ = ["FlowerStrategy", "densify", "flower_options", "flower_strategy", "is_flower_strategy"]

# Flower's sampling arguments, set so that its configure_train lists every replying node
# (fedneq samples; the wrapped strategy's messages are never sent)
_SAMPLING = {"fraction_train": 1.0, "min_train_nodes": 0, "min_available_nodes": 0}
# SparseStrategy's settings a Flower strategy shares when its constructor takes them
_SHARED = ("weighted_by_key", "arrayrecord_key", "configrecord_key", "train_metrics_aggr_fn")


def is_flower_strategy(obj: object) -> bool:
    """Whether ``obj`` is a Flower Strategy class that is not already a :class:`SparseStrategy`."""
    return (
        inspect.isclass(obj)
        and issubclass(obj, Strategy)
        and not issubclass(obj, SparseStrategy)
    )


def densify(
    global_state: Mapping[str, torch.Tensor], update: SparseUpdate, keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The reply ``update`` as whole tensors of ``keys``: unsent elements = ``global_state``'s.

    Whatever ``update.values`` holds outside its sent rows (elements) is ignored.
    """
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        reference = global_state[key]
        if key not in update.rows:
            out[key] = reference
            continue
        sent = element_mask(update, key, reference.shape)
        out[key] = torch.where(sent, update.values[key].to(reference.dtype), reference)
    return out


def _to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in state.items()}
    )


class _ReplyingNodes(Grid):
    """The Grid the wrapped strategy's ``configure_train`` sees: this round's replying nodes.

    It only lists nodes; fedneq sends the messages.
    """

    def __init__(self, node_ids: Sequence[int]) -> None:
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "a Flower strategy wrapped by fedneq may only list nodes in configure_train: "
            "fedneq samples the nodes and sends the messages"
        )

    set_run = create_message = push_messages = pull_messages = send_and_receive = _refuse

    @property
    def run(self) -> Any:
        return self._refuse()


@contextmanager
def _python_random_kept() -> Iterator[None]:
    """Flower's FedAvg samples with the global ``random``: leave its state as it was."""
    saved = random.getstate()
    try:
        yield
    finally:
        random.setstate(saved)


class FlowerAggregationFailed(RuntimeError):
    """The wrapped Flower strategy gave no aggregate for the round."""


# --- the wrapped strategy's state as tensors ---------------------------------------


def _state_kind(value: Any) -> str | None:
    """How an attribute of the wrapped strategy is kept in :meth:`FlowerStrategy.state_dict`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return "number"
    if isinstance(value, np.ndarray):
        return "array"
    if isinstance(value, ArrayRecord):
        return "record"
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()
    ):
        return "dict"
    if isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value):
        return "list"
    return None


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def flower_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    """``{"kind/attribute[/entry]": tensor}`` of the numbers and arrays among ``strategy``'s attributes."""
    out: dict[str, torch.Tensor] = {}
    for attr, value in vars(strategy).items():
        kind = _state_kind(value)
        if kind == "number":
            number = value.item() if isinstance(value, np.generic) else value
            dtype = torch.int64 if isinstance(number, int) else torch.float64
            out[f"number/{attr}"] = torch.tensor(number, dtype=dtype)
        elif kind == "array":
            out[f"array/{attr}"] = _tensor(value)
        elif kind == "record":
            out.update({f"record/{attr}/{k}": _tensor(a.numpy()) for k, a in value.items()})
        elif kind == "dict":
            out.update({f"dict/{attr}/{k}": _tensor(a) for k, a in value.items()})
        elif kind == "list":
            out.update({f"list/{attr}/{i}": _tensor(a) for i, a in enumerate(value)})
    return out


def load_flower_state(
    strategy: Strategy, state: Mapping[str, torch.Tensor], initial: Mapping[str, Any]
) -> None:
    """Set ``strategy``'s attributes from :func:`flower_state`; the ones it lacks go back to
    ``initial`` (their values after construction) or are removed.

    Raises
    ------
    ValueError
        A key not of the form ``kind/attribute[/entry]`` or naming an attribute
        the strategy does not have, or a number that is not 0-d.
    """
    groups: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        kind, _, rest = key.partition("/")
        attr, _, entry = rest.partition("/")
        known = kind in ("number", "array") and not entry or kind in ("record", "dict", "list") and entry
        if not known or not attr:
            raise ValueError(
                f"strategy state key {key!r} is not 'number/ATTR', 'array/ATTR' or "
                "'record|dict|list/ATTR/ENTRY'"
            )
        if attr not in vars(strategy) and attr not in initial:
            raise ValueError(f"strategy state key {key!r}: {type(strategy).__name__} has no {attr!r}")
        if groups.setdefault(attr, (kind, {}))[0] != kind:
            raise ValueError(f"strategy state keeps {attr!r} as two kinds")
        groups[attr][1][entry] = tensor
    for attr, (kind, parts) in groups.items():
        arrays = {k: t.detach().cpu().numpy().copy() for k, t in parts.items()}
        if kind == "number":
            tensor = parts[""]
            if tensor.dim() != 0:
                raise ValueError(f"strategy state number {attr!r} must be 0-d, got {tuple(tensor.shape)}")
            value: Any = int(tensor) if not tensor.is_floating_point() else float(tensor)
        elif kind == "array":
            value = arrays[""]
        elif kind == "record":
            value = ArrayRecord({k: Array(a) for k, a in arrays.items()})
        elif kind == "dict":
            value = arrays
        else:
            value = [arrays[k] for k in sorted(arrays, key=int)]
        setattr(strategy, attr, value)
    for attr, value in list(vars(strategy).items()):
        if attr in groups or _state_kind(value) is None:
            continue
        if attr in initial:
            setattr(strategy, attr, copy.deepcopy(initial[attr]))
        else:
            delattr(strategy, attr)


# --- the adapter ------------------------------------------------------------------


class FlowerStrategy(SparseStrategy):
    """A Flower strategy aggregating densified sparse replies behind fedneq's checks.

    Parameters
    ----------
    neuron_map, table:
        As in :class:`~strategies.base.SparseStrategy`.
    flower : flwr.serverapp.strategy.Strategy, or a Strategy class
        The wrapped strategy. A class is built here with ``options`` and, where
        its constructor takes them, fedneq's ``weighted_by_key``, record keys and
        metric averaging. Either way its sampling attributes, where it has them,
        are set so that its ``configure_train`` lists every replying node
        without waiting for more (``fraction_train=1.0``, ``min_train_nodes=0``,
        ``min_available_nodes=0``): fedneq samples.
    options : dict (default: none)
        Keyword arguments for the ``flower`` class, checked against its
        constructor (names, and the type of each default).
    **kwargs
        Those of :class:`~strategies.base.SparseStrategy`.

    Notes
    -----
    See the module notes. :func:`flower_strategy` builds the class a config
    names (``"flwr.serverapp.strategy:FedAdam"``), whose keywords are the
    Flower class's options.
    """

    def __init__(
        self,
        neuron_map: NeuronMap,
        table: Sequence[str],
        *,
        flower: Strategy | type[Strategy],
        options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        options = dict(options or {})
        if inspect.isclass(flower):
            if not is_flower_strategy(flower) or inspect.isabstract(flower):
                raise ValueError(
                    f"flower must be a concrete Flower Strategy class that is not a "
                    f"SparseStrategy, got {flower!r}"
                )
        elif not isinstance(flower, Strategy) or isinstance(flower, SparseStrategy):
            raise ValueError(
                f"flower must be a Flower Strategy (flwr.serverapp.strategy.Strategy) that is not "
                f"a SparseStrategy, got {type(flower).__name__}"
            )
        elif options:
            raise ValueError(f"options {sorted(options)} need a Flower Strategy class, not a built one")
        super().__init__(neuron_map, table, **kwargs)
        if inspect.isclass(flower):
            flower = self._build(flower, options)
        for name, value in _SAMPLING.items():
            if hasattr(flower, name):
                setattr(flower, name, value)
        self.flower = flower
        self._initial = {
            k: copy.deepcopy(v) for k, v in vars(flower).items() if v is None or _state_kind(v)
        }
        self.server_round = 1  # FedAdam's bias correction counts rounds
        self._senders: list[tuple[int, dict[str, Any]]] = []  # of the last check_replies

    def _build(self, cls: type[Strategy], options: Mapping[str, Any]) -> Strategy:
        params = _parameters(cls)
        allowed = flower_options(cls)
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown options {unknown}; its options: {allowed}")
        for name, value in options.items():
            _check_option(cls, name, value, params[name].default)
        plumbing = {n: getattr(self, n) for n in _SHARED if n in params}
        try:
            return cls(**plumbing, **options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{cls.__name__}({_args(options)}) could not be built: {err}") from err

    def summary(self) -> None:
        log(INFO, "\t├──> wraps Flower's %s (fedneq samples and checks replies)",
            type(self.flower).__name__)  # fmt: skip
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.server_round = server_round
        return super().configure_train(server_round, arrays, config, grid)

    def check_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[tuple[Message, SparseUpdate, float]], dict[int, str]]:
        accepted, rejected = super().check_replies(server_round, replies)
        metrics = [dict(next(iter(m.content.metric_records.values()))) for m, _, _ in accepted]
        common = set.intersection(*(set(m) for m in metrics)) if metrics else set()
        self._senders = [
            (msg.metadata.src_node_id, {k: v for k, v in m.items() if k in common})
            for (msg, _, _), m in zip(accepted, metrics, strict=True)
        ]
        return accepted, rejected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """:meth:`SparseStrategy.aggregate_train`; ``(None, None)`` when the wrapped strategy
        gives no aggregate (logged)."""
        self.server_round = server_round
        try:
            return super().aggregate_train(server_round, replies)
        except FlowerAggregationFailed as err:
            log(ERROR, "round %d: %s; the global model is left unchanged", server_round, err)
            return None, None

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        """The wrapped strategy's aggregate of the densified ``updates`` (:func:`densify`).

        Raises
        ------
        FlowerAggregationFailed
            If the wrapped strategy returns no arrays or raises Flower's
            ``AggregationError`` / ``InconsistentMessageReplies``.
        ValueError
            If its arrays are not the model's floating-point tensors.
        """
        if len(updates) != len(weights):
            raise ValueError(f"weights has {len(weights)} entries for {len(updates)} updates")
        keys = [k for k in self.table if k in global_state]
        senders = self._senders
        self._senders = []
        if len(senders) != len(updates):  # called directly, not from aggregate_train
            senders = [(i + 1, {}) for i in range(len(updates))]
        replies = []
        for (node, metrics), update, weight in zip(senders, updates, weights, strict=True):
            metrics = dict(metrics)
            metrics[self.weighted_by_key] = int(weight) if float(weight).is_integer() else weight
            content = RecordDict(
                {
                    self.arrayrecord_key: _to_record(densify(global_state, update, keys)),
                    "metrics": MetricRecord(metrics),
                }
            )
            metadata = Metadata(
                run_id=0, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                group_id=str(self.server_round), created_at=0.0, ttl=DEFAULT_TTL,
                message_type=MessageType.TRAIN,
            )  # fmt: skip
            replies.append(Message(metadata=metadata, content=content))
        flower = self.flower
        current = _to_record({k: global_state[k] for k in keys})
        name = type(flower).__name__
        try:
            with _python_random_kept():
                list(flower.configure_train(self.server_round, current, ConfigRecord(),
                                            _ReplyingNodes([n for n, _ in senders])))  # fmt: skip
            arrays, _ = flower.aggregate_train(self.server_round, replies)
        except (AggregationError, InconsistentMessageReplies) as err:
            raise FlowerAggregationFailed(f"{name} could not aggregate: {err}") from err
        if arrays is None:
            raise FlowerAggregationFailed(f"{name}.aggregate_train gave no arrays")
        if set(arrays) != set(keys):
            raise ValueError(
                f"{name}.aggregate_train must return the model's floating-point tensors; missing "
                f"{sorted(set(keys) - set(arrays))[:5]}, extra {sorted(set(arrays) - set(keys))[:5]}"
            )
        new_state = dict(global_state)
        for key in keys:
            value = torch.from_numpy(np.array(arrays[key].numpy(), copy=True))
            reference = global_state[key]
            if tuple(value.shape) != tuple(reference.shape):
                raise ValueError(
                    f"{name}.aggregate_train returned {key!r} of shape {tuple(value.shape)}, the "
                    f"model's is {tuple(reference.shape)}"
                )
            new_state[key] = value.to(reference.dtype)
        return new_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped strategy's numbers and arrays (:func:`flower_state`)."""
        return flower_state(self.flower)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_flower_state(self.flower, state, self._initial)


# --- one adapter class per Flower class ------------------------------------------------


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters ``cls(...)`` takes, following ``**kwargs`` up the MRO."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                out.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return out


def _check_option(cls: type, name: str, value: Any, default: Any) -> None:
    """Refuse an option whose type differs from its default's (TOML gives ints for floats)."""
    if default is inspect.Parameter.empty or default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int | float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (isinstance(value, int) or not isinstance(default, int))
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        raise ValueError(
            f"{cls.__name__} option {name!r} must be a {type(default).__name__} (default "
            f"{default!r}), got {value!r}"
        )


def flower_options(cls: type[Strategy]) -> list[str]:
    """The options of Flower strategy class ``cls``: its constructor's keywords that
    :class:`SparseStrategy` does not take (those are fedneq's), sorted."""
    sparse = inspect.signature(SparseStrategy.__init__).parameters
    return sorted(n for n in _parameters(cls) if n not in sparse)


@functools.cache
def flower_strategy(cls: type[Strategy]) -> type[FlowerStrategy]:
    """The :class:`FlowerStrategy` subclass that builds and wraps a ``cls`` per run.

    Its keywords are :class:`SparseStrategy`'s and ``cls``'s options
    (:func:`flower_options`), with their defaults: what the registry
    introspects to check a config's ``[strategy] options``.

    Raises
    ------
    ValueError
        If ``cls`` is not a concrete Flower Strategy class (:func:`is_flower_strategy`).
    """
    if not is_flower_strategy(cls):
        raise ValueError(f"{cls!r} is not a Flower Strategy class (or is a SparseStrategy)")
    if inspect.isabstract(cls):
        raise ValueError(f"{cls.__name__} is abstract: name a concrete Flower strategy")
    names = set(flower_options(cls))

    def __init__(self: FlowerStrategy, neuron_map: NeuronMap, table: Sequence[str], **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        FlowerStrategy.__init__(self, neuron_map, table, flower=cls, options=options, **kwargs)

    keyword = inspect.Parameter.KEYWORD_ONLY
    sparse = [
        p for p in inspect.signature(SparseStrategy.__init__).parameters.values() if p.kind is keyword
    ]
    params = _parameters(cls)
    own = sorted((params[n].replace(kind=keyword) for n in names), key=lambda p: p.default is not p.empty)
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("neuron_map", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("table", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *sparse,
            *own,
        ]
    )
    doc = (
        f"fedneq's checks and densified replies around Flower's :class:`{cls.__module__}."
        f"{cls.__qualname__}` (:class:`FlowerStrategy`); options: {sorted(names)}."
    )
    return type(
        f"FlowerStrategy[{cls.__name__}]",
        (FlowerStrategy,),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__, "flower_class": cls},
    )


def _args(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())
