"""What the server knows of every node, and what it tells the strategy.

A node is held to what the *server* knows of it, never to what it declares:
its device (the seeded fleet assignment, or the operator's table,
:mod:`sims.server.device_table`), hence its budget and local epochs
(:func:`budget_limits`), its device class, at most its partition's size
as ``num-examples`` and exactly the optimizer steps its device takes on that
partition as ``local-steps`` (computed on the server from the seed), and the
labels its partition holds (for the label split of the classifier head,
never declared by the node).

Every input the server gives its strategy
(:meth:`strategies.base.SparseStrategy.set_server_inputs`) is set here, and only here:
:func:`set_run_inputs` once per run (the tensors trained outside the budget),
:func:`set_round_inputs` before every round (the nodes sampled, and what the
server knows of each node, :func:`set_server_knowledge`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedneq.config import Config
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.protocol import FULL_BUDGET_KEY
from fedneq.models import model_head
from fedneq.neurons import NeuronMap
from fedneq.task import client_split, load_task
from fedneq.training.schedule import local_work
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
    labels: dict[int, frozenset[int]] = field(default_factory=dict)  # partition id -> its labels
    steps: dict[int, int] = field(default_factory=dict)  # partition id -> its device's local steps


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
    splits = {pid: client_split(config, pid).train for pid in range(config.run.num_clients)}
    examples = {pid: len(split) for pid, split in splits.items()}
    names = {pid: profile.name for pid, profile in profiles.items()}
    y = load_task(config).train.y
    labels = {  # the training split's labels: what the client's head rows train on
        pid: frozenset(y[torch.as_tensor(split, dtype=torch.long)].unique().tolist())
        for pid, split in splits.items()
    }
    steps = {
        pid: _work(config, profiles[pid], examples[pid])[1] for pid in profiles if examples.get(pid)
    }
    return ServerKnowledge(profiles, names, examples, dict(allowed), labels, steps)


def _work(config: Config, profile: DeviceProfile, examples: int) -> tuple[int, int]:
    """``(local epochs, local steps)`` of ``profile`` on a partition of ``examples``."""
    return local_work(examples, profile.batch_size, profile.local_epochs, config.fleet.local_steps)


def budget_limits(
    config: Config,
    strategy: SparseStrategy,
    server_round: int,
    node_of: dict[int, int],
    profiles: Mapping[int, DeviceProfile],
    examples: Mapping[int, int] | None = None,
) -> dict[int, BudgetLimit]:
    """``{node id: BudgetLimit}``: what each node's device, as the server knows it, may train.

    ``profiles`` is the server's ``{partition id: device}`` (the seeded fleet
    assignment, or the operator's table), never what the node declares: a node
    may declare at most its device's budget (all selectable parameters when
    the strategy asks for full budget) and local epochs. Under ``[fleet]
    local_steps`` the epochs are the passes those steps take over the
    partition (``examples``: partition id -> its training examples).
    """
    selectable = strategy.neuron_map.selectable_params
    full = bool(strategy.train_config(server_round).get(FULL_BUDGET_KEY, False))
    steps = config.fleet.local_steps

    @functools.cache  # one limit per device class (and size): 10 000 nodes share a few
    def limit(profile: DeviceProfile, size: int) -> BudgetLimit:
        params = selectable if full else profile.budget_params(selectable)
        epochs = _work(config, profile, size)[0] if steps and size else profile.local_epochs
        return BudgetLimit(max(1, params), epochs)

    sizes = examples if steps and examples is not None else {}
    return {node: limit(profiles[pid], sizes.get(pid, 0)) for pid, node in node_of.items()}


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
    *,
    steps: Mapping[int, int] | None = None,
    labels: Mapping[int, frozenset[int]] | None = None,
) -> None:
    """Tell the strategy what the server knows of each node (it then checks replies against it).

    Budget limits from the node's device (:func:`budget_limits`), the device
    class it must declare, at most ``examples[pid]`` (its partition's
    training examples, computed on the server from the seed) as its weight,
    the optimizer steps it takes (``steps``, default: counted from its device
    and ``examples``) and the labels its partition holds (``labels``, when
    given: the label split reads them).
    """
    if steps is None:
        steps = {
            pid: _work(config, profiles[pid], n)[1] for pid, n in examples.items() if n and pid in profiles
        }
    strategy.set_server_inputs(
        budget_limits=budget_limits(config, strategy, server_round, node_of, profiles, examples),
        device_classes={node: profiles[pid].name for pid, node in node_of.items()},
        max_examples={node: examples[pid] for pid, node in node_of.items()},
        local_steps={node: steps[pid] for pid, node in node_of.items() if pid in steps},
        labels={node: labels[pid] for pid, node in node_of.items() if pid in (labels or {})},
    )


def set_run_inputs(strategy: SparseStrategy, config: Config, neuron_map: NeuronMap) -> None:
    """Tell the strategy what holds for the whole run: the tensors trained outside the budget,
    and the classifier head's (whose rows are the labels)."""
    head = model_head(config.model.name) + "."
    strategy.set_server_inputs(
        free_tensors=free_tensors(config, neuron_map),
        head_tensors=frozenset(k for k in strategy.table if k.startswith(head)),
    )


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
    set_server_knowledge(
        strategy, config, server_round, node_of, knowledge.profiles, knowledge.examples,
        steps=knowledge.steps, labels=knowledge.labels,
    )  # fmt: skip
