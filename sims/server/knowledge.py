"""What the server knows of every node, and what it tells the strategy.

A node is held to what the *server* knows of it, never to what it declares:
its device (the seeded fleet assignment, or the operator's table,
:mod:`sims.server.device_table`), hence its budget and local epochs
(:func:`budget_limits`), its device class, and at most its partition's size
as ``num-examples`` (computed on the server from the seed).

Every input the server gives its strategy
(:meth:`strategies.base.SparseStrategy.set_server_inputs`) is set here, and only here:
:func:`set_run_inputs` once per run (the tensors trained outside the budget),
:func:`set_round_inputs` before every round (the nodes sampled, and what the
server knows of each node, :func:`set_server_knowledge`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedneq.config import Config
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.protocol import FULL_BUDGET_KEY
from fedneq.neurons import NeuronMap
from fedneq.task import client_split
from sims.server.device_table import DeviceTable
from strategies import SparseStrategy
from strategies.budget import BudgetLimit

__all__ = [
    "ServerKnowledge", "budget_limits", "free_tensors", "server_knowledge", "set_round_inputs",
    "set_run_inputs", "set_server_knowledge",
]  # fmt: skip


@dataclass(frozen=True)
class ServerKnowledge:
    """What the server knows of each partition, whatever its node declares."""

    profiles: dict[int, DeviceProfile]  # partition id -> its device
    devices: dict[int, str]  # partition id -> its device's name (clients.csv's ``device``)
    examples: dict[int, int]  # partition id -> its training examples
    allowed: dict[int, int]  # partition id -> the only node id that may claim it; {}: any


def server_knowledge(
    config: Config, devices: DeviceTable | Mapping[int, DeviceProfile] | None = None
) -> ServerKnowledge:
    """The server's knowledge of ``config``'s partitions.

    ``devices`` is the operator's table (:func:`sims.server.device_table.read_device_table`,
    or just ``{partition id: device}``); by default the seeded fleet assignment.
    """
    allowed = devices.node_ids if isinstance(devices, DeviceTable) else {}
    if isinstance(devices, DeviceTable):
        devices = devices.profiles
    profiles = dict(devices) if devices is not None else {
        pid: config.device(pid) for pid in range(config.run.num_clients)
    }
    examples = {pid: len(client_split(config, pid).train) for pid in range(config.run.num_clients)}
    names = {pid: profile.name for pid, profile in profiles.items()}
    return ServerKnowledge(profiles, names, examples, dict(allowed))


def budget_limits(
    config: Config,
    strategy: SparseStrategy,
    server_round: int,
    node_of: dict[int, int],
    profiles: Mapping[int, DeviceProfile],
) -> dict[int, BudgetLimit]:
    """``{node id: BudgetLimit}``: what each node's device, as the server knows it, may train.

    ``profiles`` is the server's ``{partition id: device}`` (the seeded fleet
    assignment, or the operator's table), never what the node declares: a node
    may declare at most its device's budget (all selectable parameters when
    the strategy asks for full budget) and local epochs.
    """
    selectable = strategy.neuron_map.selectable_params
    full = bool(strategy.train_config(server_round).get(FULL_BUDGET_KEY, False))

    @functools.cache  # one limit per device class: 10 000 nodes share a few
    def limit(profile: DeviceProfile) -> BudgetLimit:
        params = selectable if full else profile.budget_params(selectable)
        return BudgetLimit(max(1, params), profile.local_epochs)

    return {node: limit(profiles[pid]) for pid, node in node_of.items()}


def free_tensors(config: Config, neuron_map: NeuronMap) -> frozenset[str]:
    """Whole tensors this run's clients train outside their budget (:func:`strategies.budget.trained_params`).

    A static selector or initializer: the neuron layers' bias-only tensors (a
    Sparse Update scheme's bias depth); ``[train] bn_stats = "all"``: every
    BatchNorm's running statistics.
    """
    free: set[str] = set()
    if "static" in (config.selection.selector, config.selection.initializer):
        free |= {k for layer in neuron_map.layers for k in layer.param_tensors if k.endswith(".bias")}
    if config.train.bn_stats == "all":
        free |= set(neuron_map.statistic_tensors())
    return frozenset(free)


def set_server_knowledge(
    strategy: SparseStrategy,
    config: Config,
    server_round: int,
    node_of: dict[int, int],
    profiles: Mapping[int, DeviceProfile],
    examples: Mapping[int, int],
) -> None:
    """Tell the strategy what the server knows of each node (it then checks replies against it).

    Budget limits from the node's device (:func:`budget_limits`), the device
    class it must declare, and at most ``examples[pid]`` (its partition's
    training examples, computed on the server from the seed) as its weight.
    """
    strategy.set_server_inputs(
        budget_limits=budget_limits(config, strategy, server_round, node_of, profiles),
        device_classes={node: profiles[pid].name for pid, node in node_of.items()},
        max_examples={node: examples[pid] for pid, node in node_of.items()},
    )


def set_run_inputs(strategy: SparseStrategy, config: Config, neuron_map: NeuronMap) -> None:
    """Tell the strategy what holds for the whole run: the tensors trained outside the budget."""
    strategy.set_server_inputs(free_tensors=free_tensors(config, neuron_map))


def set_round_inputs(
    strategy: SparseStrategy,
    config: Config,
    server_round: int,
    send_to: Sequence[int],
    node_of: dict[int, int],
    knowledge: ServerKnowledge,
) -> None:
    """Tell the strategy the round's nodes: the node ids it sends to (``send_to``, in
    partition order) and what the server knows of every node."""
    strategy.set_server_inputs(sample=lambda _grid, _round, chosen=tuple(send_to): list(chosen))
    set_server_knowledge(strategy, config, server_round, node_of, knowledge.profiles, knowledge.examples)
