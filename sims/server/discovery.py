"""Which node is which partition: discovery before the first round, rediscovery before every round.

Every node is asked who it is (a ``QUERY`` message that carries the run's
config); it answers with its ``partition-id``, the device it declares and its
``data-file``'s partition and split fingerprint (:class:`Identity`).
:func:`discover_nodes` waits for ``[run] num_clients`` nodes and fails fast,
before the first round and with every reason in the ServerApp's log (what
``flwr run --stream`` shows), when they do not come or one of them cannot
serve the run: a data-file cut for another run or partition, a device other
than the one the server's table gives its partition.

A partition is bound to the first node that claimed it. :func:`rediscover_nodes`
asks only the nodes that connected since (a restarted SuperNode registers
under a new node id): a node claiming a partition whose node the SuperLink
still lists is refused (a warning, never sampled); once that node is gone
from the SuperLink's list, or the SuperLink answered for it as a lost node,
the first live claimant takes the partition over.

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
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedneq.config import Config
from fedneq.federation.device_data import split_fingerprint
from fedneq.federation.protocol import (
    CONFIG_KEY,
    DATA_FINGERPRINT_KEY,
    DATA_PARTITION_KEY,
    DEVICE_KEY,
    INFO_RECORD,
)
from sims.server.records import error_reason

__all__ = [
    "DISCOVERY_SETTLE_S", "DISCOVERY_TIMEOUT_S", "Identity", "Nodes", "discover_nodes", "identify",
    "is_allowed", "rediscover_nodes",
]  # fmt: skip

log = logging.getLogger("fedneq")

DISCOVERY_TIMEOUT_S = 600.0  # waiting for nodes to connect and identify (not a round)
DISCOVERY_SETTLE_S = 10.0  # no new node for this long: the missing ones are not coming


@dataclass(frozen=True)
class Identity:
    """What a node says it is, in its answer to the server's query."""

    partition_id: int
    device: str  # the device class it declares
    data_partition: int = -1  # the partition its data-file holds; -1: no data-file
    data_fingerprint: str = ""  # the split fingerprint its data-file was cut with


@dataclass
class Nodes:
    """What the server knows of the nodes; :func:`rediscover_nodes` updates it in place."""

    node_of: dict[int, int]  # partition id -> the node id it is bound to (sent to)
    declared: dict[int, str]  # partition id -> the device its node declares
    partition_of: dict[int, int]  # every node id ever bound -> its partition id
    allowed: Mapping[int, int]  # the operator's pins: partition id -> the only node id that may claim it
    devices: Mapping[int, str] = field(default_factory=dict)  # the server's table: pid -> device
    refused: dict[int, Identity] = field(default_factory=dict)  # live claimant node id -> its claim, oldest first
    unreachable: set[int] = field(default_factory=set)  # nodes the SuperLink answered for (lost)
    pinned_out: set[int] = field(default_factory=set)  # claimants the operator's pins refuse: not asked again


def discover_nodes(
    grid: Grid,
    config: Config,
    *,
    timeout_s: float = DISCOVERY_TIMEOUT_S,
    settle_s: float = DISCOVERY_SETTLE_S,
    allowed: Mapping[int, int] | None = None,
    devices: Mapping[int, str] | None = None,
) -> Nodes:
    """Ask every node who it is: which partition it trains and which device it declares.

    Waits for ``[run] num_clients`` nodes; fails once no new node has connected
    for ``settle_s`` seconds (or after ``timeout_s``), naming the count needed.
    ``allowed`` (``{partition id: node id}``, the operator's table): a node
    that claims a partition given to another node id is ignored, with a warning.
    ``devices`` (``{partition id: device name}``, the server's table): a node
    declaring another device fails the run here, as does a node whose
    data-file was cut for another run or partition (:func:`identify`).

    Raises
    ------
    RuntimeError
        Naming every node that cannot serve the run and why (each also logged).
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
    devices = dict(devices or {})
    by_partition: dict[int, int] = {}
    declared: dict[int, str] = {}
    pinned_out: set[int] = set()
    problems: list[str] = []
    for node, answer in sorted(identify(grid, config, node_ids, timeout_s).items()):
        if isinstance(answer, str):
            problems.append(f"node {node} cannot serve the run: {answer}")
            continue
        pid = answer.partition_id
        if not is_allowed(allowed, pid, node):
            pinned_out.add(node)
            continue
        if pid in by_partition:
            problems.append(f"two nodes claim partition-id {pid}: {by_partition[pid]} and {node}")
            continue
        wrong = _device_mismatch(answer, devices)
        if wrong:
            problems.append(f"node {node}: {wrong}")
        by_partition[pid] = node
        declared[pid] = answer.device
    missing = sorted(set(range(config.run.num_clients)) - set(by_partition))
    if missing:
        problems.append(f"no node answered for partition ids {missing}")
    if problems:
        for problem in problems:
            log.error("discovery: %s", problem)
        raise RuntimeError("node discovery failed before round 1: " + "; ".join(problems))
    partition_of = {n: p for p, n in by_partition.items()}
    return Nodes(
        by_partition, declared, partition_of, dict(allowed or {}), devices, pinned_out=pinned_out
    )


def _device_mismatch(answer: Identity, devices: Mapping[int, str]) -> str:
    """Why the declared device differs from the server's table ("" if it does not)."""
    expected = devices.get(answer.partition_id)
    if expected is None or expected == answer.device:
        return ""
    return (
        f"partition-id {answer.partition_id} declares device {answer.device!r}, the server's "
        f"table gives it {expected!r} (its replies would all be rejected): fix the node's "
        "--node-config or the devices table"
    )


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
) -> dict[int, Identity | str]:
    """Send ``node_ids`` a query: ``{node id: its Identity, or why it cannot serve the run}``.

    A reply is attributed to the node the query was sent to (``reply_to_message_id``),
    not to its ``src_node_id``: the SuperLink answers for a node it lost with an
    error reply from its own node id. A node whose data-file holds another
    partition, or was cut with other split settings than the run's
    (:func:`fedneq.federation.device_data.split_fingerprint`), gets the reason.
    """
    content = RecordDict({"config": ConfigRecord({CONFIG_KEY: config.to_json()})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    answers: dict[int, Identity | str] = {}  # a node without a reply is left out
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if node not in node_ids:
            continue
        if reply.has_error():
            answers[node] = error_reason(reply.error.reason) or "error reply"
            continue
        try:
            pid = reply.content["metrics"]["partition-id"]
            info = reply.content[INFO_RECORD]
            device = info[DEVICE_KEY]
        except KeyError as err:
            answers[node] = f"malformed identity reply: missing {err}"
            continue
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < config.run.num_clients:
            answers[node] = (
                f"partition-id {pid!r} is not an int in [0, {config.run.num_clients - 1}]"
            )
            continue
        answer = Identity(
            pid, str(device), _int(info.get(DATA_PARTITION_KEY, -1)),
            str(info.get(DATA_FINGERPRINT_KEY, "")),
        )  # fmt: skip
        answers[node] = _data_file_problem(answer, config) or answer
    return answers


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -2


def _data_file_problem(answer: Identity, config: Config) -> str:
    """Why the node's data-file cannot serve its partition of this run ("" if it can, or none)."""
    if not answer.data_fingerprint:
        return ""
    pid = answer.partition_id
    if answer.data_partition != pid:
        return (
            f"its data-file holds partition {answer.data_partition}, but the node is "
            f"partition-id={pid}"
        )
    if answer.data_fingerprint != split_fingerprint(config, pid):
        return (
            f"its data-file (partition {pid}) was cut for another run (dataset, seed, "
            "num_clients or [data] split settings differ): cut it again with "
            "`python -m fedneq.federation.device_data <config> <folder>`"
        )
    return ""


def rediscover_nodes(grid: Grid, config: Config, nodes: Nodes, *, timeout_s: float) -> set[int]:
    """Learn the nodes that connected since discovery; returns the live node ids.

    A SuperNode that restarts registers under a new node id: every connected
    node the server does not know yet is asked who it is. A partition stays
    bound to its node while the SuperLink lists that node: another node
    claiming it is refused (a warning; it waits in ``nodes.refused``). Once
    the bound node is no longer listed (a lost SuperNode drops out of the list
    when its heartbeats expire) or the SuperLink answered for it as lost
    (``nodes.unreachable``, set by the round loop), the first live claimant
    takes the partition over. A node whose claim the operator's pins refuse is
    remembered and never asked again (a pinned-out node would otherwise cost a
    query in every round). A node that does not answer, names no valid partition, declares
    another device than the server's table or holds a data-file cut for
    another run is ignored, with a warning: it cannot stop the run. ``nodes``
    is updated in place.
    """
    live = set(grid.get_node_ids())
    nodes.refused = {n: claim for n, claim in nodes.refused.items() if n in live}
    new = sorted(live - set(nodes.partition_of) - set(nodes.refused) - nodes.pinned_out)
    answers = identify(grid, config, new, timeout_s) if new else {}
    for node in new:
        answer = answers.get(node, "no reply")
        if isinstance(answer, str):
            log.warning("node %d did not identify itself (%s): not sampled", node, answer)
            continue
        wrong = _device_mismatch(answer, nodes.devices)
        if wrong:
            log.warning("node %d: %s; not sampled", node, wrong)
            continue
        pid = answer.partition_id
        if not is_allowed(nodes.allowed, pid, node):
            nodes.pinned_out.add(node)  # the pins do not change during a run: not asked again
            continue
        holder = nodes.node_of.get(pid)
        if holder in live and holder not in nodes.unreachable:
            log.warning(
                "node %d claims partition-id %d, which is bound to node %d, still connected: "
                "refused (it takes the partition over only once node %d is gone)",
                node, pid, holder, holder,
            )  # fmt: skip
        nodes.refused[node] = answer
    for node, claim in list(nodes.refused.items()):  # the first claimant first
        pid, holder = claim.partition_id, nodes.node_of.get(claim.partition_id)
        if holder in live and holder not in nodes.unreachable:
            continue
        log.warning("partition %d is now node %d (was node %s, gone), device %r", pid, node,
                    holder, claim.device)  # fmt: skip
        del nodes.refused[node]
        nodes.partition_of[node] = pid
        nodes.node_of[pid] = node
        nodes.declared[pid] = claim.device
    return live
