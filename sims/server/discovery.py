"""Which node is which partition: discovery before the first round, rediscovery before every round.

Every node is asked who it is (a ``QUERY`` message that carries the run's
config); it answers with its ``partition-id`` and the device it declares.
:func:`discover_nodes` waits for ``[run] num_clients`` nodes and fails fast,
naming what is missing, when they do not come. :func:`rediscover_nodes` asks
only the nodes that connected since (a restarted SuperNode registers under a
new node id) and lets the newest node of a partition take it over.

A reply is attributed to the node its query was sent to (``reply_to_message_id``),
never to its ``src_node_id``: the SuperLink answers for a node it lost with an
error reply from its own node id. The operator's device table may pin a
partition to one node id (:class:`sims.server.device_table.DeviceTable`); a
node that claims a partition pinned to another is ignored (:func:`is_allowed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedneq.config import Config
from fedneq.federation.protocol import CONFIG_KEY
from sims.server.records import error_reason

__all__ = [
    "DISCOVERY_SETTLE_S", "DISCOVERY_TIMEOUT_S", "Nodes", "discover_nodes", "identify",
    "is_allowed", "rediscover_nodes", "warn_declared",
]  # fmt: skip

log = logging.getLogger("fedneq")

DISCOVERY_TIMEOUT_S = 600.0  # waiting for nodes to connect and identify (not a round)
DISCOVERY_SETTLE_S = 10.0  # no new node for this long: the missing ones are not coming


@dataclass
class Nodes:
    """What the server knows of the nodes; :func:`rediscover_nodes` updates it in place."""

    node_of: dict[int, int]  # partition id -> the node id it is sent to (the newest to claim it)
    declared: dict[int, str]  # partition id -> the device its node declares
    partition_of: dict[int, int]  # every node id ever known -> its partition id
    allowed: Mapping[int, int]  # the operator's pins: partition id -> the only node id that may claim it


def discover_nodes(
    grid: Grid,
    config: Config,
    *,
    timeout_s: float = DISCOVERY_TIMEOUT_S,
    settle_s: float = DISCOVERY_SETTLE_S,
    allowed: Mapping[int, int] | None = None,
) -> Nodes:
    """Ask every node who it is: which partition it trains and which device it declares.

    Waits for ``[run] num_clients`` nodes; fails once no new node has connected
    for ``settle_s`` seconds (or after ``timeout_s``), naming the count needed.
    ``allowed`` (``{partition id: node id}``, the operator's table): a node
    that claims a partition given to another node id is ignored, with a warning.
    """
    needed = config.run.num_clients
    deadline = time.monotonic() + timeout_s
    node_ids = list(grid.get_node_ids())
    last_change = time.monotonic()
    while len(node_ids) < needed and time.monotonic() < min(deadline, last_change + settle_s):
        time.sleep(0.5)
        now = list(grid.get_node_ids())
        if len(now) != len(node_ids):
            last_change = time.monotonic()
        node_ids = now
    if len(node_ids) < needed:
        raise RuntimeError(
            f"only {len(node_ids)} SuperNodes connected (none new for {settle_s:g} s); the run "
            f"needs [run] num_clients={needed}: start {needed - len(node_ids)} more (with "
            f"`flwr run` on the local simulation runtime: flwr federation simulation-config "
            f"--num-supernodes {needed})"
        )
    by_partition: dict[int, int] = {}
    devices: dict[int, str] = {}
    for node, answer in identify(grid, config, node_ids, timeout_s).items():
        if isinstance(answer, str):
            raise RuntimeError(f"node {node} failed to identify itself: {answer}")
        pid, device = answer
        if not is_allowed(allowed, pid, node):
            continue
        if pid in by_partition:
            raise RuntimeError(f"two nodes claim partition-id {pid}")
        by_partition[pid] = node
        devices[pid] = device
    missing = sorted(set(range(config.run.num_clients)) - set(by_partition))
    if missing:
        raise RuntimeError(f"no node answered for partition ids {missing}")
    partition_of = {n: p for p, n in by_partition.items()}
    return Nodes(by_partition, devices, partition_of, dict(allowed or {}))


def is_allowed(allowed: Mapping[int, int] | None, pid: int, node: int) -> bool:
    """Whether ``node`` may claim partition ``pid`` under the operator's pins (a warning if not)."""
    if not allowed or allowed.get(pid, node) == node:
        return True
    log.warning(
        "node %d claims partition-id %d, which the operator's table gives node %d: ignored",
        node, pid, allowed[pid],
    )  # fmt: skip
    return False


def identify(
    grid: Grid, config: Config, node_ids: Sequence[int], timeout_s: float
) -> dict[int, tuple[int, str] | str]:
    """Send ``node_ids`` a query: ``{node id: (partition id, device) or why it did not say}``.

    A reply is attributed to the node the query was sent to (``reply_to_message_id``),
    not to its ``src_node_id``: the SuperLink answers for a node it lost with an
    error reply from its own node id.
    """
    content = RecordDict({"config": ConfigRecord({CONFIG_KEY: config.to_json()})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    answers: dict[int, tuple[int, str] | str] = {}  # a node without a reply is left out
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if node not in node_ids:
            continue
        if reply.has_error():
            answers[node] = error_reason(reply.error.reason) or "error reply"
            continue
        try:
            pid = reply.content["metrics"]["partition-id"]
            device = reply.content["info"]["device"]
        except KeyError as err:
            answers[node] = f"malformed identity reply: missing {err}"
            continue
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < config.run.num_clients:
            answers[node] = (
                f"partition-id {pid!r} is not an int in [0, {config.run.num_clients - 1}]"
            )
            continue
        answers[node] = (pid, str(device))
    return answers


def rediscover_nodes(grid: Grid, config: Config, nodes: Nodes, *, timeout_s: float) -> set[int]:
    """Learn the nodes that connected since discovery; returns the live node ids.

    A SuperNode that restarts registers under a new node id: every connected
    node the server does not know yet is asked who it is, and one that names a
    partition takes it over (the newest node of a partition is the one sent to;
    its old node id, if still listed, is a SuperNode that is gone). A node that
    does not answer or names no valid partition is ignored, with a warning: it
    cannot stop the run. ``nodes`` is updated in place.
    """
    live = set(grid.get_node_ids())
    new = sorted(live - set(nodes.partition_of))
    if not new:
        return live
    answers = identify(grid, config, new, timeout_s)
    node_of = nodes.node_of
    for node in new:
        answer = answers.get(node, "no reply")
        if isinstance(answer, str):
            log.warning("node %d did not identify itself (%s): not sampled", node, answer)
            continue
        pid, device = answer
        if not is_allowed(nodes.allowed, pid, node):
            continue
        nodes.partition_of[node] = pid
        if node_of.get(pid) != node:
            log.warning(
                "partition %d is now node %d (was node %d, %s), device %r", pid, node,
                node_of.get(pid, -1), "still listed" if node_of.get(pid) in live else "gone", device,
            )  # fmt: skip
        node_of[pid] = node
        nodes.declared[pid] = device
    return live


def warn_declared(declared: Mapping[int, str], devices: Mapping[int, str]) -> None:
    """Warn about each partition whose node declares another device than the server's table."""
    for pid, name in sorted(declared.items()):
        if name != devices[pid]:
            log.warning(
                "partition %d declares device %r, the server's table gives it %r: its replies "
                "will be rejected", pid, name, devices[pid],
            )  # fmt: skip
