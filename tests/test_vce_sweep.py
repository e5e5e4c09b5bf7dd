"""sims.engine.vce_sweep: the one-pass delivery hands out what Flower's per-node loop hands out."""

from __future__ import annotations

import threading
import time
from queue import Queue
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from sims.engine import vce_sweep
from sims.engine.vce_sweep import next_messages

pytestmark = pytest.mark.usefixtures("task_identity")


def _state_with_messages():
    """4 simulated nodes as run_simulation registers them; 2 messages pushed to each of 3."""
    state, nodes, grid = _empty_state()
    by_partition = {p: n for n, p in nodes.items()}
    grid.push_messages(
        Message(RecordDict({"c": ConfigRecord({"k": 10 * p + i})}), dst_node_id=by_partition[p],
                message_type="query")
        for i in range(2) for p in (2, 0, 3)
    )  # fmt: skip
    return state, nodes


def _empty_state():
    """4 simulated nodes as run_simulation registers them, no message: (state, nodes, grid)."""
    factory = LinkStateFactory(":flwr-in-memory:", NoOpFederationManager(), ObjectStoreFactory())
    nodes = _register_nodes(num_nodes=4, state_factory=factory)  # {node id: partition}
    state = factory.state()
    run = Run.create_empty(run_id=1)  # the task identity the fixture sets
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID  # as run_simulation sets it
    state.run_ids[1] = RunRecord(run=run)
    state.task_store[1] = Task(task_id=1, run_id=1)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    TaskIdentity.node_id = (
        SUPERLINK_NODE_ID  # messages from the ServerApp (the fixture restores it)
    )
    return state, nodes, grid


def _seen(messages, nodes) -> list[tuple[int, int]]:
    return [(nodes[m.metadata.dst_node_id], int(m.content["c"]["k"])) for m in messages]


def test_one_pass_delivers_what_the_per_node_loop_delivers() -> None:
    flower, flower_nodes = _state_with_messages()
    ours, our_nodes = _state_with_messages()
    sizes = []
    for _ in range(3):  # two sweeps with messages, then none
        expected = [
            m for node in flower_nodes for m in flower.get_message_ins(node_id=node, limit=1)
        ]
        got = next_messages(ours, our_nodes)
        assert _seen(got, our_nodes) == _seen(expected, flower_nodes)
        assert all(m.metadata.delivered_at for m in got)
        sizes.append(len(got))
    assert sizes == [3, 3, 0] and len(ours.message_ins_store) == 6  # one per node per sweep


def test_a_pushed_message_is_swept_at_once_not_at_the_next_tick(monkeypatch) -> None:
    """With the sweep clock at 60 s only the push itself can wake the loop within 10 s."""
    monkeypatch.setattr(vce_sweep, "IDLE_S", 60.0)
    state, nodes, grid = _empty_state()
    first, second = list(nodes)[:2]
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    loop = threading.Thread(target=vce_sweep._add_messages_to_queue, args=(state, queue, nodes, stop))
    loop.start()
    try:
        for node, k in ((first, 1), (second, 2)):  # the second arrives while the loop waits
            grid.push_messages([Message(RecordDict({"c": ConfigRecord({"k": k})}), dst_node_id=node,
                                        message_type="query")])  # fmt: skip
            got = queue.get(timeout=10)
            assert (got.metadata.dst_node_id, got.content["c"]["k"]) == (node, k)
    finally:
        stop.set()  # the loop ends at its next wake-up: a push, here
        grid.push_messages([Message(RecordDict({"c": ConfigRecord({"k": 3})}), dst_node_id=first,
                                    message_type="query")])  # fmt: skip
        loop.join(timeout=10)
    assert not loop.is_alive()


def test_send_and_receive_returns_when_the_last_reply_is_stored(monkeypatch) -> None:
    """With the grid's pull interval at 60 s only the stored replies can wake it within 10 s;
    it returns every reply, each once."""
    monkeypatch.setattr(InMemoryGrid, "send_and_receive", vce_sweep._send_and_receive)
    state, nodes, grid = _empty_state()
    grid.pull_interval = 60.0
    stop = threading.Event()

    def clients() -> None:  # what the simulation runtime's workers do, one message at a time
        while not stop.is_set():
            for msg in next_messages(state, nodes):
                stop.wait(0.05)
                reply = Message(RecordDict({"c": ConfigRecord({"k": int(msg.content["c"]["k"])})}),
                                reply_to=msg)  # fmt: skip
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                state.store_message_res(reply)
            stop.wait(0.01)

    worker = threading.Thread(target=clients)
    worker.start()
    try:
        messages = [
            Message(RecordDict({"c": ConfigRecord({"k": k})}), dst_node_id=node, message_type="query")
            for k, node in enumerate(nodes)
        ]
        started = time.monotonic()
        replies = list(grid.send_and_receive(messages, timeout=30))
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        worker.join(timeout=10)
    assert sorted(int(r.content["c"]["k"]) for r in replies) == [0, 1, 2, 3]
