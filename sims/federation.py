"""The server's side of a federated run: discover nodes, run rounds, record.

``run_federation`` is what the ServerApp's ``main`` does; it owns the round
loop (rather than ``Strategy.start``) so that it can sample clients from a
seed, record every client's reply, checkpoint after every round and resume.
The strategy is used through Flower's strategy API: ``configure_train`` builds
the messages, ``aggregate_train`` turns the replies into the next global model.

Failures a run survives:

* a client that raises: its error reply is recorded as ``failed`` with the
  reason, the round goes on with the others;
* a client with no reply after ``[run] round_timeout_s``: ``failed``, "no reply
  before the round timeout" (its late reply is never read);
* a lost node (a SuperNode killed, a device gone): the SuperLink answers for it
  with an error reply from its *own* node id; replies are attributed to the
  node each message was sent to (``reply_to_message_id``), so the loss is a
  ``failed`` row with Flower's reason. A sampled partition whose node the
  SuperLink no longer lists is not sent and is ``failed`` ("no live node");
* a restarted SuperNode (a new node id): before every round the server asks
  the nodes it does not know yet who they are (:func:`rediscover_nodes`), and
  the newest node of a partition takes it over;
* a malformed, over-budget or exploded reply: ``rejected`` by the strategy
  (:meth:`strategies.SparseStrategy.check_replies`), the others aggregated;
  every node is held to what the *server* knows of it, never to what it
  declares (:func:`set_server_knowledge`): its device's budget and local
  epochs (the seeded fleet assignment, or the operator's table in deployment,
  :func:`read_device_table`), its device class, and at most its partition's
  size as ``num-examples``;
* an aggregate whose evaluation loss is not finite: the round is not
  committed (``committed`` 0 in rounds.csv), the global model and the
  strategy's state stay as they were;
* a reply whose simulated time on its device exceeds ``[run] round_deadline_s``
  (:mod:`fedneq.federation.timing`, :mod:`sims.sim_time`): ``dropped``, not aggregated;
* fewer than ``[run] min_replies`` replies: the round is sent again once
  (the training config carries ``attempt``, so injected faults draw anew),
  then skipped, the global model unchanged (a reply counts here even if the
  strategy then rejects it: it is recorded as ``rejected``);
* a run in which no round was committed, or in which every sampled client of
  some round failed or was rejected: it still runs every round and writes
  every table, then :func:`run_federation` writes ``status.json`` saying so
  and raises :class:`RunFailed` (a non-zero exit status);
* the server itself stopping: every round ends with a checkpoint
  (:mod:`sims.checkpoint`) and ``resume=True`` continues after the last one.
  :func:`request_stop` (``sims.run``'s Ctrl-C) ends the run early and cleanly:
  the round in flight is abandoned (neither recorded nor checkpointed), the
  last committed round's checkpoint stays, and ``run_federation`` returns.
  The clients' velocity state survives through ``<results>/client_state/``
  (:func:`fedneq.federation.client.save_client_state`), rolled back to the checkpoint's
  round, so a resumed run gives the same results as an uninterrupted one.

Determinism: replies are handled in partition order whatever their arrival
order, and everything random derives from (seed, round, partition, attempt),
so the same config gives the same rounds.csv.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedneq.config import Config
from fedneq.federation.client import rollback_client_state
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.protocol import ATTEMPT_KEY, CONFIG_KEY, FULL_BUDGET_KEY, STATE_DIR_KEY
from fedneq.federation.wire import (
    from_array_record,
    model_nbytes,
    pack_model,
    payload_nbytes,
    tensor_table,
    unpack_model,
)
from fedneq.neurons import NeuronMap
from fedneq.task import build_model, check_partitions, client_split, derive_seed, load_task
from fedneq.training.loop import evaluate
from sims.checkpoint import load_run_checkpoint, save_run_checkpoint
from sims.initial import initial_state
from sims.results import Recorder, atomic_write_text, write_initial
from sims.sim_time import (
    add_seconds,
    apply_deadline,
    reachable_partitions,
    round_seconds,
    time_row,
)
from strategies import SparseStrategy, get_strategy
from strategies.budget import BudgetLimit

__all__ = [
    "DeviceTable", "RunFailed", "budget_limits", "discover_nodes", "free_tensors",
    "read_device_table", "rediscover_nodes", "request_stop", "run_federation",
    "sample_partitions", "set_server_knowledge", "stop_requested",
]  # fmt: skip

log = logging.getLogger("fedneq")

STATUS_FILE = "status.json"  # {"status": "completed" | "failed", "reason": ...}
DISCOVERY_TIMEOUT_S = 600.0  # waiting for nodes to connect and identify (not a round)
DISCOVERY_SETTLE_S = 10.0  # no new node for this long: the missing ones are not coming
ATTEMPTS = 2  # a round below min_replies is sent once more, then skipped

_STOP = threading.Event()  # set by request_stop(), from another thread or a signal handler


def request_stop(stop: bool = True) -> None:
    """Ask :func:`run_federation` to stop before its next round (``False``: clear the request).

    The round in flight when the request arrives is abandoned: not recorded,
    not checkpointed, so a resume runs it again exactly as it would have run.
    """
    if stop:
        _STOP.set()
    else:
        _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


_CLIENT_METRICS = {  # clients.csv column -> reply metric (upload_bytes is measured here)
    "num_examples": "num-examples",
    "train_loss": "train-loss",
    "smallest_batch": "smallest-batch",
    "trainable_params": "trainable-params",
    "trainable_fraction": "trainable-fraction",
    "selected_neurons": "selected-neurons",
    "flops_saved": "flops-saved",
    "memory_estimate_bytes": "memory-estimate-bytes",
    "memory_measured_bytes": "memory-measured-bytes",
    "memory_limit_bytes": "memory-limit-bytes",
    "memory_bound": "memory-bound",
    "width": "width",  # width clients (fedneq.federation.width_client)
    "state_bytes": "state-bytes",
    "used_initializer": "used-initializer",
    "train_flops": "train-flops",  # simulated time (fedneq.federation.timing)
    "probe_flops": "probe-flops",
    "download_s": "download-s",
    "compute_s": "compute-s",
    "upload_s": "upload-s",
}


class RunFailed(RuntimeError):
    """A run that went through all its rounds without learning what it should have."""


def run_failure(rounds: Sequence[dict[str, Any]]) -> str | None:
    """Why a finished run failed (rounds.csv rows), or None if it did not.

    It failed when no round was committed, or when every sampled client of
    some round failed or was rejected (a partial round that was skipped for
    ``min_replies`` is not a failure of the run).
    """
    if not any(int(r.get("committed") or 1 - int(r["skipped"])) for r in rounds):  # older tables

        return f"no round of {len(rounds)} was committed: the global model never changed"
    empty = [int(r["round"]) for r in rounds if int(r["replied"]) == 0]
    if empty:
        return f"every sampled client failed or was rejected in round(s) {empty}"
    return None


def sample_partitions(config: Config, server_round: int) -> list[int]:
    """The partition ids trained in a round: a seeded draw, the same on every rerun.

    Drawn from :meth:`~fedneq.config.Config.eligible_partitions` (the
    ``[run] participants`` classes; every partition by default) that are
    reachable in the round (:func:`sims.sim_time.reachable_partitions`; all of
    them unless a device class has ``availability`` < 1); all of those if
    fewer than ``[run] clients_per_round`` are.
    """
    rng = np.random.default_rng(derive_seed(config.run.seed, server_round, 1))
    pool = np.asarray(reachable_partitions(config, server_round), dtype=np.int64)
    size = min(config.run.clients_per_round, len(pool))
    chosen = rng.choice(pool, size=size, replace=False)
    return sorted(int(p) for p in chosen)


def discover_nodes(
    grid: Grid,
    config: Config,
    *,
    timeout_s: float = 600.0,
    settle_s: float = 10.0,
    allowed: Mapping[int, int] | None = None,
) -> tuple[dict[int, int], dict[int, str]]:
    """Ask every node who it is: ``{partition id: node id}`` and ``{partition id: device}``.

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
    for node, answer in _identify(grid, config, node_ids, timeout_s).items():
        if isinstance(answer, str):
            raise RuntimeError(f"node {node} failed to identify itself: {answer}")
        pid, device = answer
        if not _allowed(allowed, pid, node):
            continue
        if pid in by_partition:
            raise RuntimeError(f"two nodes claim partition-id {pid}")
        by_partition[pid] = node
        devices[pid] = device
    missing = sorted(set(range(config.run.num_clients)) - set(by_partition))
    if missing:
        raise RuntimeError(f"no node answered for partition ids {missing}")
    return by_partition, devices


def _allowed(allowed: Mapping[int, int] | None, pid: int, node: int) -> bool:
    if not allowed or allowed.get(pid, node) == node:
        return True
    log.warning(
        "node %d claims partition-id %d, which the operator's table gives node %d: ignored",
        node, pid, allowed[pid],
    )  # fmt: skip
    return False


def _identify(
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
            answers[node] = _error_reason(reply.error.reason) or "error reply"
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


def rediscover_nodes(
    grid: Grid,
    config: Config,
    node_of: dict[int, int],
    devices: dict[int, str],
    partition_of: dict[int, int],
    *,
    timeout_s: float,
    allowed: Mapping[int, int] | None = None,
) -> set[int]:
    """Learn the nodes that connected since discovery; returns the live node ids.

    A SuperNode that restarts registers under a new node id: every connected
    node the server does not know yet is asked who it is, and one that names a
    partition takes it over (the newest node of a partition is the one sent to;
    its old node id, if still listed, is a SuperNode that is gone). A node that
    does not answer or names no valid partition is ignored, with a warning: it
    cannot stop the run. ``node_of``, ``devices`` and ``partition_of`` (every
    node id ever known -> its partition) are updated in place.
    """
    live = set(grid.get_node_ids())
    new = sorted(live - set(partition_of))
    if not new:
        return live
    answers = _identify(grid, config, new, timeout_s)
    for node in new:
        answer = answers.get(node, "no reply")
        if isinstance(answer, str):
            log.warning("node %d did not identify itself (%s): not sampled", node, answer)
            continue
        pid, device = answer
        if not _allowed(allowed, pid, node):
            continue
        partition_of[node] = pid
        if node_of.get(pid) != node:
            log.warning(
                "partition %d is now node %d (was node %d, %s), device %r", pid, node,
                node_of.get(pid, -1), "still listed" if node_of.get(pid) in live else "gone", device,
            )  # fmt: skip
        node_of[pid] = node
        devices[pid] = device
    return live


@dataclass(frozen=True)
class DeviceTable:
    """The operator's table: each partition's device, and optionally the node allowed to be it."""

    profiles: dict[int, DeviceProfile]
    node_ids: dict[int, int]  # partition id -> the only node id that may claim it; {}: any


def read_device_table(path: str | Path, config: Config) -> DeviceTable:
    """The operator's device table: a CSV ``partition_id,device[,node_id]``, one row per partition.

    ``device`` is a class of the run's ``[fleet]`` or a budget (a fraction in
    (0, 1] or a parameter count: a ``"custom"`` device with that budget, as
    ``--node-config "budget=..."`` gives). ``node_id`` (optional column) is the
    Flower node id that alone may claim the partition: with SuperNode
    authentication a registered key keeps its node id (``flwr supernode
    list``), so a node that claims another device's partition is ignored.
    Every partition ``0 .. [run] num_clients - 1`` must have exactly one row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"run config devices={str(path)!r}: no such file on the server")
    fleet = config.fleet.fleet()
    table: dict[int, DeviceProfile] = {}
    node_ids: dict[int, int] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames not in (["partition_id", "device"], ["partition_id", "device", "node_id"]):
            raise ValueError(
                f"{path}: the header should be 'partition_id,device' or "
                f"'partition_id,device,node_id', got {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            pid_text, device = (row["partition_id"] or "").strip(), (row["device"] or "").strip()
            if not pid_text.isdigit() or int(pid_text) >= config.run.num_clients:
                raise ValueError(
                    f"{path}:{line}: partition_id {pid_text!r} should be an integer in "
                    f"[0, {config.run.num_clients - 1}]"
                )
            pid = int(pid_text)
            if pid in table:
                raise ValueError(f"{path}:{line}: partition_id {pid} appears twice")
            node_text = (row.get("node_id") or "").strip()
            if node_text:
                if not node_text.isdigit():
                    raise ValueError(f"{path}:{line}: node_id {node_text!r} should be an integer")
                node_ids[pid] = int(node_text)
            if device in fleet.names:
                table[pid] = fleet.by_name(device)
                continue
            try:
                budget = float(device) if "." in device or "e" in device else int(device)
                table[pid] = DeviceProfile("custom", budget=budget)
            except ValueError as err:
                raise ValueError(
                    f"{path}:{line}: device {device!r} should be one of {list(fleet.names)} or a "
                    f"budget (a fraction in (0, 1] or a parameter count): {err}"
                ) from None
    missing = sorted(set(range(config.run.num_clients)) - set(table))
    if missing:
        raise ValueError(f"{path}: no row for partition ids {missing}")
    return DeviceTable(table, node_ids)


def budget_limits(
    config: Config,
    strategy: SparseStrategy,
    server_round: int,
    node_of: dict[int, int],
    profiles: Mapping[int, DeviceProfile],
) -> dict[int, BudgetLimit]:
    """``{node id: BudgetLimit}``: what each node's device, as the server knows it, may train.

    ``profiles`` is the server's ``{partition id: device}`` (the seeded fleet
    assignment, or the operator's table, :func:`read_device_table`), never
    what the node declares: a node may declare at most its device's budget
    (all selectable parameters when the strategy asks for full budget) and
    local epochs.
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


def _warn_declared(declared: Mapping[int, str], devices: Mapping[int, str]) -> None:
    for pid, name in sorted(declared.items()):
        if name != devices[pid]:
            log.warning(
                "partition %d declares device %r, the server's table gives it %r: its replies "
                "will be rejected", pid, name, devices[pid],
            )  # fmt: skip


def _number(value: Any) -> int | float | str:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _error_reason(reason: str | None) -> str:
    """The informative part of an error reply's reason (Flower wraps the client's exception)."""
    lines = (reason or "").strip().splitlines()
    text = lines[-1] if lines else ""
    text = text.split("occurred. Message: ", 1)[-1].removesuffix("'>")
    return text[:200]


def _client_row(
    server_round: int,
    msg: Message,
    pid: int,
    device: str,
    rejected: dict[int, str],
    update_rms: float | None,
    clip: float | None = None,
) -> dict[str, Any]:
    row: dict[str, Any] = {"round": server_round, "partition_id": pid, "device": device}
    if msg.has_error():
        return row | {"status": "failed", "reason": _error_reason(msg.error.reason)}
    if pid in rejected:  # its content is untrusted: record nothing from it
        return row | {"status": "rejected", "reason": rejected[pid][:300]}
    metrics = next(iter(msg.content.metric_records.values()))
    row["status"] = "ok"
    for column, key in _CLIENT_METRICS.items():
        row[column] = _number(metrics.get(key, ""))
    row["upload_bytes"] = payload_nbytes(
        from_array_record(next(iter(msg.content.array_records.values())))
    )
    row["update_rms"] = "" if update_rms is None else update_rms
    if clip is not None:
        row["reason"] = f"update scaled by {clip:.3g} to clip_update_ratio x the round's median"
    return row


def _numbers(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key, "") != ""]


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | str:
    values = _numbers(rows, key)
    return float(np.mean(values)) if values else ""


def _class_rows(server_round: int, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[r["device"]].append(r)
    return [
        {
            "round": server_round,
            "device": device,
            "clients": len(g),
            "mean_trainable_fraction": _mean(g, "trainable_fraction"),
            "bytes_up": int(sum(_numbers(g, "upload_bytes"))),
            "mean_flops_saved": _mean(g, "flops_saved"),
            "mean_train_loss": _mean(g, "train_loss"),
        }
        for device, g in sorted(groups.items())
    ]


def build_strategy(config: Config, neuron_map, state: dict[str, torch.Tensor]) -> SparseStrategy:
    return get_strategy(
        config.strategy.name,
        neuron_map=neuron_map,
        table=tensor_table(state),
        reference_state=state,
        **config.strategy.options,
    )


def _send_round(
    grid: Grid,
    strategy: SparseStrategy,
    config: Config,
    server_round: int,
    arrays: ArrayRecord,
    state_dir: Path,
) -> tuple[list[Message], bool, dict[str, int]]:
    """Send a round (twice at most).

    Returns ``(replies of the last attempt, skipped, {message id: node id it was sent to})``.
    """
    replies: list[Message] = []
    sent_to: dict[str, int] = {}
    for attempt in range(ATTEMPTS):
        train_config = ConfigRecord(
            {CONFIG_KEY: config.to_json(), ATTEMPT_KEY: attempt, STATE_DIR_KEY: str(state_dir)}
        )
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        replies = list(grid.send_and_receive(messages, timeout=config.run.round_timeout_s))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        ok = sum(not r.has_error() for r in replies)
        if ok >= config.run.min_replies:
            return replies, False, sent_to
        last = attempt + 1 == ATTEMPTS
        log.warning(
            "round %d, attempt %d of %d: %d of %d sampled clients replied (%d failed, %d no reply "
            "before the %g s round timeout), fewer than [run] min_replies=%d; %s",
            server_round, attempt + 1, ATTEMPTS, ok, len(messages), len(replies) - ok,
            len(messages) - len(replies), config.run.round_timeout_s, config.run.min_replies,
            "skipping the round, the global model stays as it was" if last else "sending it again",
        )  # fmt: skip
    return replies, True, sent_to


def _attributed(
    replies: Sequence[Message], sent_to: dict[str, int], partition_of: dict[int, int]
) -> list[tuple[Message, int]]:
    """``(reply, node id it answers for)``, in partition order; replies of no known node dropped.

    The node is the one the answered message was sent to: for a node it lost,
    the SuperLink replies with an error whose ``src_node_id`` is its own.
    """
    out = []
    for msg in replies:
        node = sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        if node not in partition_of:
            log.warning("a reply from unknown node %d ignored", node)
            continue
        out.append((msg, node))
    # aggregate in partition order: the float sums do not depend on arrival order
    return sorted(out, key=lambda pair: partition_of[pair[1]])


def run_federation(
    grid: Grid,
    config: Config,
    out_dir: Path,
    *,
    resume: bool = False,
    devices: DeviceTable | Mapping[int, DeviceProfile] | None = None,
) -> list[dict[str, Any]]:
    """Run all rounds of ``config`` on ``grid``; returns the rows of rounds.csv.

    ``resume=True`` continues after the last checkpoint in ``out_dir`` (from
    round 1 if there is none); the checkpoint's config must equal ``config``
    except for ``[run] rounds``. ``devices`` is the operator's table
    (:func:`read_device_table`, or just ``{partition id: device}``); by
    default the seeded fleet assignment, as in simulation. A node is held to
    that device, whatever it declares.
    """
    out_dir = Path(out_dir)
    task = load_task(config)
    check_partitions(config)  # bad partitions fail here, before any round
    allowed = devices.node_ids if isinstance(devices, DeviceTable) else {}
    if isinstance(devices, DeviceTable):
        devices = devices.profiles
    profiles = dict(devices) if devices is not None else {
        pid: config.device(pid) for pid in range(config.run.num_clients)
    }
    examples = {pid: len(client_split(config, pid).train) for pid in range(config.run.num_clients)}
    torch.manual_seed(config.run.seed)
    model, neuron_map = build_model(config, task)
    state = initial_state(config, task, model, cache_dir=Path(config.run.out_dir) / "_pretrained")
    model.load_state_dict(state)
    strategy = build_strategy(config, neuron_map, state)
    strategy.set_server_inputs(free_tensors=free_tensors(config, neuron_map))
    ckpt = load_run_checkpoint(out_dir, config) if resume else None  # before writing anything
    recorder = Recorder(out_dir, config.to_dict())
    (out_dir / STATUS_FILE).unlink(missing_ok=True)  # written again when this run ends
    state_dir = (out_dir / "client_state").resolve()
    arrays = pack_model(state)  # the global model, packed once per round for every message
    first_round = 1
    if ckpt is not None:
        if set(ckpt.global_state) != set(state):
            raise ValueError(f"cannot resume {out_dir}: its checkpoint does not match the model")
        arrays = pack_model({k: ckpt.global_state[k] for k in state})  # state_dict order
        strategy.load_state_dict(ckpt.strategy_state)
        torch.set_rng_state(ckpt.rng_state)
        first_round = ckpt.round + 1
        recorder.resume(ckpt.round)
        removed = rollback_client_state(state_dir, ckpt.round)
        print(
            f"[fedneq] resuming {out_dir} after round {ckpt.round} "
            f"({removed} client state files from later rounds removed)",
            flush=True,
        )
    else:
        if resume:
            log.warning("no checkpoint in %s: starting from round 1", out_dir)
        for stale in (state_dir, out_dir / "checkpoint"):  # nothing left from an earlier run here
            shutil.rmtree(stale, ignore_errors=True)
        loss0, acc0 = evaluate(model, task.test)
        write_initial(out_dir, acc0, loss0)  # the plots' round-0 point
    state_dir.mkdir(parents=True, exist_ok=True)
    cum_up = float(recorder.rounds[-1]["cum_bytes_up"]) if recorder.rounds else 0.0
    cum_time = float(recorder.rounds[-1].get("cum_time_s") or 0.0) if recorder.rounds else 0.0
    deadline = config.run.round_deadline_s

    if _STOP.is_set():
        return recorder.rounds
    node_of, declared = discover_nodes(
        grid, config, timeout_s=DISCOVERY_TIMEOUT_S, settle_s=DISCOVERY_SETTLE_S, allowed=allowed
    )
    devices = {pid: profile.name for pid, profile in profiles.items()}  # the server's, not the node's
    _warn_declared(declared, devices)
    partition_of = {n: p for p, n in node_of.items()}  # every node id ever known
    total = config.run.rounds
    loop_t0 = t0 = time.monotonic()  # a round's seconds run from the previous round's row
    for rnd in range(first_round, total + 1):
        if _STOP.is_set():
            break
        live = rediscover_nodes(
            grid, config, node_of, declared, partition_of, timeout_s=config.run.round_timeout_s,
            allowed=allowed,
        )
        sampled = sample_partitions(config, rnd)
        gone = [p for p in sampled if node_of[p] not in live]  # not sent: recorded as failed
        strategy.set_server_inputs(sample=lambda _grid, _round, chosen=sampled, skip=set(gone): [
            node_of[p] for p in chosen if p not in skip
        ])
        set_server_knowledge(strategy, config, rnd, node_of, profiles, examples)
        raw_replies, skipped, sent_to = _send_round(grid, strategy, config, rnd, arrays, state_dir)
        if _STOP.is_set():  # interrupted: this round is not committed
            print(f"[fedneq] round {rnd} abandoned (interrupted)", flush=True)
            break
        pairs = _attributed(raw_replies, sent_to, partition_of)
        pid_of = {id(m): partition_of[n] for m, n in pairs}
        split = apply_deadline(rnd, [m for m, _ in pairs], partition_of, devices, deadline)
        replies = split.on_time  # the dropped ones are neither aggregated nor checked
        if not skipped and sum(not r.has_error() for r in replies) < config.run.min_replies:
            skipped = True  # a retry would miss the deadline again: same simulated times
            log.warning(
                "round %d: %d replies missed the %g s round deadline, fewer than [run] "
                "min_replies=%d left; skipping the round", rnd, len(split.dropped), deadline,
                config.run.min_replies,
            )  # fmt: skip
        committed, note = False, "skipped: too few replies" if skipped else ""
        if skipped:  # not aggregated, but still checked: an invalid reply is recorded as such
            _, rejected_nodes = strategy.check_replies(rnd, replies)
        else:
            before = {k: v.clone() for k, v in strategy.state_dict().items()}
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            rejected_nodes = strategy.last_rejected
            if new_arrays is None:
                note = "no reply accepted"
            else:
                model.load_state_dict(unpack_model(new_arrays))
                loss, acc = evaluate(model, task.test)
                committed = math.isfinite(loss)
                if committed:
                    arrays = new_arrays
                else:  # the previous global model and strategy state stay
                    note = f"the aggregate's test loss is {loss}: not committed"
                    log.warning("round %d: %s, the global model stays as it was", rnd, note)
                    strategy.load_state_dict(before)
        sizes, clips = strategy.last_update_rms, strategy.last_clip
        rejected = {partition_of[n]: why for n, why in rejected_nodes.items()}
        client_rows = [
            _client_row(rnd, m, pid_of[id(m)], devices[pid_of[id(m)]], rejected,
                        sizes.get(m.metadata.src_node_id), clips.get(m.metadata.src_node_id))
            for m in replies
        ]  # fmt: skip
        answered = {r["partition_id"] for r in client_rows + split.dropped}
        client_rows += [
            {"round": rnd, "partition_id": p, "device": devices[p], "status": "failed",
             "reason": "no live node: its SuperNode is gone (not sent)" if p in gone
             else "no reply before the round timeout"}
            for p in sampled
            if p not in answered
        ]  # fmt: skip
        client_rows = [time_row(r) for r in client_rows] + split.dropped
        client_rows.sort(key=lambda r: r["partition_id"])
        accepted = [r for r in client_rows if r["status"] == "ok"]
        round_time = round_seconds(client_rows, deadline)
        cum_time = add_seconds(cum_time, round_time)
        if not committed:  # the evaluation of the global model that stays
            model.load_state_dict(unpack_model(arrays))
            loss, acc = evaluate(model, task.test)
        bytes_up = int(sum(_numbers(accepted, "upload_bytes")))
        cum_up += bytes_up
        recorder.add("clients.csv", client_rows)
        recorder.add("device_classes.csv", _class_rows(rnd, accepted))
        recorder.add(
            "rounds.csv",
            [
                {
                    "round": rnd,
                    "accuracy": acc,
                    "loss": loss,
                    "sampled": len(sampled),
                    "replied": len(accepted),
                    "failed": sum(r["status"] == "failed" for r in client_rows),
                    "rejected": len(rejected),
                    "skipped": int(skipped),
                    "committed": int(committed),
                    "note": note,
                    "bytes_down": len(sampled) * model_nbytes(arrays),
                    "bytes_up": bytes_up,
                    "cum_bytes_up": int(cum_up),
                    "mean_trainable_fraction": _mean(accepted, "trainable_fraction"),
                    "mean_flops_saved": _mean(accepted, "flops_saved"),
                    "mean_train_loss": _mean(accepted, "train_loss"),
                    "mean_state_bytes": _mean(accepted, "state_bytes"),
                    "available": len(reachable_partitions(config, rnd)),
                    "dropped": len(split.dropped),
                    "round_time_s": round_time,
                    "cum_time_s": repr(cum_time),  # exact: a resumed run continues from it
                }
            ],
        )
        now = time.monotonic()  # the previous round's tables and checkpoint count in this one
        seconds, t0 = now - t0, now
        recorder.add("timing.csv", [{"round": rnd, "seconds": seconds}])
        recorder.flush()
        save_run_checkpoint(
            out_dir, config, rnd, unpack_model(arrays), strategy.state_dict()
        )
        failed = len(client_rows) - len(accepted)
        print(
            f"[fedneq] round {rnd}/{total}  acc {acc:.4f}  loss {loss:.4f}  "
            f"clients {len(accepted)}/{len(sampled)} ok, {failed} failed/rejected/dropped"
            f"{'' if committed else '  NOT COMMITTED (' + note + ')'}  up {bytes_up / 1e3:.1f} kB  "
            f"trainable {_fmt_pct(_mean(accepted, 'trainable_fraction'))}  "
            f"sim {_fmt_seconds(round_time)}  {seconds:.1f}s"
            f"  eta {_eta((time.monotonic() - loop_t0) / (rnd - first_round + 1) * (total - rnd))}",
            flush=True,
        )
    if _STOP.is_set():  # interrupted: not plotted nor judged until it completes (--resume)
        atomic_write_text(out_dir / STATUS_FILE, json.dumps({"status": "interrupted", "reason": ""}))
        return recorder.rounds
    recorder.plot(f"{config.selection.selector} ({config.strategy.name})")
    failure = run_failure(recorder.rounds)
    status = {"status": "failed" if failure else "completed", "reason": failure or ""}
    atomic_write_text(out_dir / STATUS_FILE, json.dumps(status, indent=1))
    if failure:
        raise RunFailed(f"the run in {out_dir} failed: {failure} (see rounds.csv and clients.csv)")
    return recorder.rounds


def _fmt_seconds(seconds: float) -> str:
    """Simulated seconds for the round log line: 12.3s, 4.5min, 2.1h."""
    if seconds >= 7200:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}min" if seconds >= 120 else f"{seconds:.1f}s"


def _eta(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _fmt_pct(value: float | str) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, float) else "-"
