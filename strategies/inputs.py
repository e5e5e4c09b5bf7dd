"""What the server tells a strategy of the nodes: :class:`ServerInputs`.

The server knows things about each node that it never takes from the node's
word: the budget its device may declare, how many examples its partition
holds, how many local optimizer steps its device takes on it, which labels it
holds, the device class the operator gave it, which tensors the run trains
outside the budget (and which are the classifier head), and which nodes a
round samples. It hands them to its
strategy as one frozen :class:`ServerInputs` through
:meth:`strategies.base.SparseStrategy.set_server_inputs`; the strategy's
checks (:meth:`strategies.base.SparseStrategy.check_reply`) read them from
:attr:`strategies.base.SparseStrategy.server_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp import Grid

from .budget import BudgetLimit

__all__ = ["Sampler", "ServerInputs"]

#: ``sample(grid, server_round) -> node ids`` a round's training is sent to
Sampler = Callable[[Grid, int], Sequence[int]]


class _NodeMap(Mapping[int, Any]):
    """A read-only ``{node id: value}`` whose values were checked to be ``kind``."""

    __slots__ = ("_items", "kind")

    def __init__(self, items: dict[int, Any], kind: type) -> None:
        self._items, self.kind = items, kind

    def __getitem__(self, node: int) -> Any:
        return self._items[node]

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


def _node_map(name: str, value: object, kind: type, what: str) -> _NodeMap:
    """``value`` as a read-only ``{node id: kind}``; ValueError naming ``name`` otherwise.

    Checked by the set of types it holds (a few C-level passes: the server
    sets these every round, for every node of the fleet), and once: a map
    this function made passes through.
    """
    if isinstance(value, _NodeMap) and value.kind is kind:
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"ServerInputs {name} must map node ids to {what}, got {value!r}")
    items = dict(value)
    good_types = set(map(type, items)) <= {int} and all(
        issubclass(t, kind) and t is not bool for t in set(map(type, items.values()))
    )
    if not good_types or (kind is int and items and min(items.values()) < 0):
        node, item = next(
            (n, v) for n, v in items.items()
            if type(n) is not int or type(v) is bool or not isinstance(v, kind)
            or (kind is int and v < 0)
        )  # fmt: skip
        raise ValueError(
            f"ServerInputs {name} must map node ids (int) to {what}, got {node!r}: {item!r}"
        )
    return _NodeMap(items, kind)


@dataclass(frozen=True)
class ServerInputs:
    """What the server knows of the nodes and tells its strategy, never taken from a node.

    The server sets these with :meth:`~strategies.base.SparseStrategy.set_server_inputs`
    (in ``sims``: the fleet and partitions once per round, ``free_tensors``
    once per run); a strategy reads them as
    :attr:`~strategies.base.SparseStrategy.server_inputs`.
    Every field defaults to "nothing known": the check it feeds is then off
    (or, for ``sample``, Flower's FedAvg samples).

    Attributes
    ----------
    budget_limits:
        Node id -> the most that node may declare (:class:`~strategies.budget.BudgetLimit`:
        its device's budget and local epochs).
    max_examples:
        Node id -> the most examples it may weigh its reply with (its
        partition's size, an int >= 0).
    local_steps:
        Node id -> the optimizer steps its device takes in a round on its
        partition (an int >= 0); a reply that declares
        :data:`~fedneq.federation.protocol.LOCAL_STEPS_KEY` must declare this
        (FedNova divides by it, :mod:`strategies.rows`).
    labels:
        Node id -> the labels its partition's training split holds (a
        frozenset of ints), derived by the server from the seeded partition:
        the label split of the classifier head (:mod:`strategies.label_split`)
        reads them. A node without an entry counts as holding every label.
    device_classes:
        Node id -> the device class the operator gave it; its reply's
        :data:`~fedneq.federation.protocol.INFO_RECORD`
        :data:`~fedneq.federation.protocol.DEVICE_KEY` must name it.
    free_tensors:
        Whole tensors the run trains outside the budget
        (:func:`strategies.budget.trained_params`' ``free``).
    head_tensors:
        The classifier head's tensors whose row ``r`` belongs to label ``r``
        (its weight and bias): what the label split aggregates per label.
    sample:
        ``sample(grid, server_round) -> node ids`` the round trains on
        (the fedneq server samples from its seed); ``None``: FedAvg's sampling.
    """

    budget_limits: Mapping[int, BudgetLimit] = field(default_factory=dict)
    max_examples: Mapping[int, int] = field(default_factory=dict)
    local_steps: Mapping[int, int] = field(default_factory=dict)
    labels: Mapping[int, frozenset] = field(default_factory=dict)
    device_classes: Mapping[int, str] = field(default_factory=dict)
    free_tensors: frozenset[str] = frozenset()
    head_tensors: frozenset[str] = frozenset()
    sample: Sampler | None = None

    def __post_init__(self) -> None:
        checked_labels = isinstance(self.labels, _NodeMap)  # a map made here was checked
        for name, kind, what in (
            ("budget_limits", BudgetLimit, "BudgetLimit"),
            ("max_examples", int, "an int >= 0"),
            ("local_steps", int, "an int >= 0"),
            ("labels", frozenset, "a frozenset of labels (ints >= 0)"),
            ("device_classes", str, "a device class name"),
        ):
            object.__setattr__(self, name, _node_map(name, getattr(self, name), kind, what))
        bad = None if checked_labels else next(
            ((n, v) for n, v in self.labels.items()
             if not all(type(x) is int and x >= 0 for x in v)), None,
        )  # fmt: skip
        if bad is not None:
            raise ValueError(
                f"ServerInputs labels must map node ids to frozensets of ints >= 0, got {bad[0]!r}: "
                f"{set(bad[1])!r}"
            )
        for name in ("free_tensors", "head_tensors"):
            names = getattr(self, name)
            if (
                isinstance(names, str) or not isinstance(names, Iterable)
                or not all(isinstance(k, str) for k in names)
            ):  # fmt: skip
                raise ValueError(f"ServerInputs {name} must be a set of tensor names, got {names!r}")
            object.__setattr__(self, name, frozenset(names))
        if self.sample is not None and not callable(self.sample):
            raise ValueError(
                "ServerInputs sample must be None or a callable (grid, server_round) -> node "
                f"ids, got {self.sample!r}"
            )
