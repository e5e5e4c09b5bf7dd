"""Losing a device and getting it back, on an in-process grid that answers like a SuperLink.

A lost node is answered for by the SuperLink with Flower's own "node
unavailable" error reply (``create_message_error_unavailable_res_message``,
whose ``src_node_id`` is the SuperLink's node id, not the lost node's); a
restarted SuperNode registers under a new node id with an empty
``Context.state``. ``tests/test_deployment.py`` does the same with real
processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from helpers import LocalGrid
from tiny_sim import tiny_config

from fedneq.federation.client_app import app
from sims.server.device_table import DeviceTable
from sims.server.results import read_csv
from sims.server.round_loop import run_federation

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("task_identity")]


class SuperLinkLikeGrid(LocalGrid):
    """Gives every message an id (as a SuperLink does on push); lost nodes get its error reply.

    ``after[r]()`` runs once round ``r``'s training messages are answered.
    """

    def __init__(self, contexts: dict[int, Context]) -> None:
        super().__init__(contexts, None)
        self.contexts = contexts
        self.lost: set[int] = set()  # still listed (the SuperLink has not timed it out), but gone
        self.after: dict[int, Callable[[], None]] = {}
        self.sent: list[tuple[int, int]] = []  # (server round, node id) of training messages
        self.asked: list[int] = []  # node ids sent a query (who are you?)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies, rnd = [], 0
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            rnd = msg.content["config"].get("server-round", 0)
            if msg.metadata.message_type == "train":
                self.sent.append((rnd, msg.metadata.dst_node_id))
            else:
                self.asked.append(msg.metadata.dst_node_id)
            if msg.metadata.dst_node_id in self.lost:
                replies.append(create_message_error_unavailable_res_message(msg.metadata, "node"))
            else:
                replies.append(app(msg, self.contexts[msg.metadata.dst_node_id]))
        if rnd in self.after:
            self.after.pop(rnd)()
        return replies


def _context(node: int, pid: int, n: int, **extra) -> Context:
    return Context(1, node, {"partition-id": pid, "num-partitions": n, **extra}, RecordDict(), {})


def _config(tmp_path: Path, rounds: int):
    return tiny_config(
        tmp_path, run={"num_clients": 3, "clients_per_round": 3, "min_replies": 1, "rounds": rounds}
    )


def test_a_lost_node_is_a_failed_row_and_its_restart_rejoins_with_its_velocity(
    tmp_path: Path,
) -> None:
    device_dir = tmp_path / "device-2-state"  # on the device: survives its SuperNode
    contexts = {100 + p: _context(100 + p, p, 3) for p in range(2)}
    contexts[102] = _context(102, 2, 3, **{"state-dir": str(device_dir)})
    grid = SuperLinkLikeGrid(contexts)

    def restart() -> None:  # the SuperLink dropped node 102; the SuperNode came back as 205
        grid.lost.clear()
        del grid.contexts[102]
        grid.contexts[205] = _context(205, 2, 3, **{"state-dir": str(device_dir)})

    grid.after = {1: lambda: grid.lost.add(102), 2: restart}  # kill -9 after round 1
    out = tmp_path / "run"
    rounds = run_federation(grid, _config(tmp_path, 4), out)
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    assert [r["replied"] for r in rounds] == [3, 2, 3, 3]
    assert [r["failed"] for r in rounds] == [0, 1, 0, 0]
    rows = {(int(c["round"]), int(c["partition_id"])): c for c in read_csv(out / "clients.csv")}
    lost = rows[(2, 2)]
    assert lost["status"] == "failed" and "unavailable" in lost["reason"].lower(), lost
    assert SUPERLINK_NODE_ID not in grid.contexts  # that error reply came from the SuperLink's id
    assert (3, 205) in grid.sent and (2, 102) in grid.sent
    for rnd in (3, 4):  # the new node trains as partition 2
        assert rows[(rnd, 2)]["status"] == "ok"
    # ... from the velocity it kept on the device, not from the selector's initializer
    assert (rows[(1, 2)]["used_initializer"], rows[(3, 2)]["used_initializer"]) == ("1", "0")
    assert sorted(p.name for p in (device_dir / "2").iterdir())[-1] == "round-00004.safetensors"
    # kept on the device only: nothing of partition 2 in the server's folder
    assert not (out / "client_state" / "2").exists() and (out / "client_state" / "0").is_dir()


def test_a_sampled_partition_without_a_live_node_is_recorded_not_sent(tmp_path: Path) -> None:
    grid = SuperLinkLikeGrid({100 + p: _context(100 + p, p, 3) for p in range(3)})
    grid.after = {1: lambda: grid.contexts.pop(101)}  # no longer listed by the SuperLink
    out = tmp_path / "run"
    rounds = run_federation(grid, _config(tmp_path, 2), out)
    assert [r["replied"] for r in rounds] == [3, 2]
    assert (2, 101) not in grid.sent and (1, 101) in grid.sent
    (row,) = [c for c in read_csv(out / "clients.csv") if c["round"] == "2" and c["partition_id"] == "1"]
    assert row["status"] == "failed" and "no live node" in row["reason"], row


def test_a_node_claiming_a_partition_the_table_gives_another_node_is_ignored(tmp_path: Path) -> None:
    """With SuperNode authentication node ids are the operator's: the table pins them.

    The impostor is ignored at discovery, and so is one that connects mid-run,
    even once the partition's own node is lost; each is asked who it is once.
    """
    config = _config(tmp_path, 4)
    contexts = {100 + p: _context(100 + p, p, 3) for p in range(3)}
    contexts[300] = _context(300, 1, 3, budget=1.0)  # claims partition 1, at a full budget
    profiles = {p: config.device(p) for p in range(3)}
    grid = SuperLinkLikeGrid(dict(contexts))

    def impostor() -> None:  # a second one connects after round 1, claiming partition 2
        grid.contexts[301] = _context(301, 2, 3)

    def owner_lost() -> None:  # node 102 dropped by the SuperLink: partition 2 is free
        del grid.contexts[102]

    grid.after = {1: impostor, 2: owner_lost}
    rounds = run_federation(
        grid, config, tmp_path / "run", devices=DeviceTable(profiles, {0: 100, 1: 101, 2: 102})
    )
    assert [r["replied"] for r in rounds] == [3, 3, 2, 2]
    assert not [n for _, n in grid.sent if n in (300, 301)]  # never trained
    assert (grid.asked.count(300), grid.asked.count(301)) == (1, 1)  # not asked every round
    with pytest.raises(RuntimeError, match="two nodes claim partition-id 1"):  # without the ids
        run_federation(SuperLinkLikeGrid(contexts), config, tmp_path / "run2")


def test_a_second_live_claimant_is_refused_until_the_bound_node_is_gone(tmp_path: Path) -> None:
    """A partition is bound to its first node; a newcomer claiming it waits for that node to go."""
    contexts = {100 + p: _context(100 + p, p, 3) for p in range(3)}
    grid = SuperLinkLikeGrid(contexts)

    def intruder() -> None:  # a second node claims partition 2 while node 102 still serves it
        grid.contexts[300] = _context(300, 2, 3)

    def gone() -> None:  # node 102 drops out of the SuperLink's list
        del grid.contexts[102]

    grid.after = {1: intruder, 3: gone}
    rounds = run_federation(grid, _config(tmp_path, 4), tmp_path / "run")
    assert [r["replied"] for r in rounds] == [3, 3, 3, 3]
    assert [n for rnd, n in grid.sent if rnd in (2, 3) and n in (102, 300)] == [102, 102]
    assert (4, 300) in grid.sent and (4, 102) not in grid.sent  # then it takes the partition


def test_a_claimant_takes_over_a_node_the_superlink_answered_for(tmp_path: Path) -> None:
    """A lost node still listed (its heartbeats not yet expired) but answered for by the SuperLink."""
    contexts = {100 + p: _context(100 + p, p, 3) for p in range(3)}
    grid = SuperLinkLikeGrid(contexts)

    def lost_and_restarted() -> None:
        grid.lost.add(102)
        grid.contexts[205] = _context(205, 2, 3)

    grid.after = {1: lost_and_restarted}
    out = tmp_path / "run"
    rounds = run_federation(grid, _config(tmp_path, 3), out)
    assert [r["failed"] for r in rounds] == [0, 1, 0]  # round 2: 102 is still bound, and lost
    assert (2, 102) in grid.sent and (2, 205) not in grid.sent
    assert (3, 205) in grid.sent and (3, 102) not in grid.sent
