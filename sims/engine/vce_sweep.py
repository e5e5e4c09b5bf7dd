"""Flower's simulation runtime, delivering messages in one pass over its store per sweep,
and as soon as they are stored, both ways.

Flower 1.41's simulation runtime delivers messages in a loop
(``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``): every
0.1 s it asks the LinkState, for each of the N simulated nodes in turn, for
that node's next undelivered message, and the in-memory LinkState answers each
question by scanning and validating every stored message. One sweep costs
N x M message checks. With 10 000 nodes the 10 000 identification queries of
start-up cost ~10^8 checks per sweep (start-up did not end within 10 minutes),
and a round's 32 training messages 320 000 checks every 0.1 s while the round
lasts: a CPU core the clients need.

:func:`install` replaces that loop by one that validates each stored message
once per sweep (Flower's own ``_check_stored_messages``: expired messages and
nodes that left are dropped as before) and hands each node at most one
message per sweep, the first it has, marked delivered, in the nodes' order:
what Flower's loop queues, in N + M steps. It applies to the in-memory
LinkState (what ``run_simulation`` uses); any other state keeps Flower's loop.

It also sweeps as soon as the ServerApp stores a message rather than at the
next tick of a 0.1 s clock: the round's clients start when it is sent, not up
to 0.1 s later (0.05 s of every round on average, the actors idle). Sweeps are
at least :data:`MIN_GAP_S` apart, so that a burst of pushes (10 000
identification queries) costs a few sweeps, not one per message, and at most
:data:`IDLE_S` apart, as before.

The same holds for the replies: the in-memory Grid's ``send_and_receive``
looked for them every 0.1 s (``pull_interval``), so a round ended up to 0.1 s
after its last reply. It now looks when a reply is stored, at least
:data:`MIN_GAP_S` and 4 times its last look's duration apart (a look costs
0.1 ms with 32 messages out, 56 ms with 10 000: at most a fifth of a core),
and at most ``pull_interval`` apart; what it returns is unchanged.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now
from flwr.superlink.grid import InMemoryGrid

__all__ = ["IDLE_S", "MIN_GAP_S", "install", "next_messages"]

_FLOWER_LOOP = vce_api.add_messages_to_queue
_FLOWER_SEND = InMemoryGrid.send_and_receive
MIN_GAP_S = 0.005  # the least time between two sweeps
IDLE_S = 0.1  # the most time between two sweeps (Flower's period)


def next_messages(state: InMemoryLinkState, nodes: Mapping[int, Any]) -> list[Message]:
    """Each node's first undelivered message (at most one per node, in ``nodes``' order),
    marked delivered, after dropping the invalid ones: one pass over the store."""
    with state.lock:
        state._check_stored_messages(set(state.message_ins_store))
        first: dict[int, Message] = {}
        for msg in state.message_ins_store.values():
            dst = msg.metadata.dst_node_id
            if msg.metadata.delivered_at == "" and dst in nodes and dst not in first:
                first[dst] = msg
        if not first:
            return []
        out = [first[node] for node in nodes if node in first]
        delivered_at = now().isoformat()
        for msg in out:
            msg.metadata.delivered_at = delivered_at
        return out


_STORED: weakref.WeakKeyDictionary[InMemoryLinkState, dict[str, threading.Event]] = (
    weakref.WeakKeyDictionary()
)


def _notify_on_store(state: InMemoryLinkState, method: str) -> threading.Event:
    """An event set whenever ``state.<method>`` stores a message (``"store_message_ins"``:
    for a node, ``"store_message_res"``: a reply); wrapped once per instance and method."""
    events = _STORED.setdefault(state, {})
    if method not in events:
        stored = threading.Event()
        store = getattr(state, method)

        def store_and_notify(message: Message) -> str | None:
            message_id = store(message)
            stored.set()
            return message_id

        setattr(state, method, store_and_notify)
        events[method] = stored
    return events[method]


def _send_and_receive(
    self: InMemoryGrid, messages: Iterable[Message], *, timeout: float | None = None
) -> Iterable[Message]:
    """Flower's ``InMemoryGrid.send_and_receive``, looking for replies when one is stored."""
    if not isinstance(self.state, InMemoryLinkState):
        return _FLOWER_SEND(self, messages, timeout=timeout)
    replied = _notify_on_store(self.state, "store_message_res")
    msg_ids = set(self.push_messages(messages))
    del messages
    end_time = time.time() + (timeout if timeout is not None else 0.0)
    ret: list[Message] = []
    while timeout is None or time.time() < end_time:
        replied.clear()  # before the look: a reply stored during it wakes the next one
        started = time.monotonic()
        res_msgs = self.pull_messages(msg_ids)
        ret.extend(res_msgs)
        msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
        if not msg_ids:
            break
        gap = max(MIN_GAP_S, 4 * (time.monotonic() - started))
        time.sleep(gap)
        replied.wait(max(self.pull_interval - gap, 0.0))
    return ret


def _add_messages_to_queue(
    state: Any, queue: Queue[Message], nodes_mapping: Mapping[int, Any], f_stop: threading.Event
) -> None:
    if not isinstance(state, InMemoryLinkState):
        _FLOWER_LOOP(state, queue, nodes_mapping, f_stop)
        return
    pushed = _notify_on_store(state, "store_message_ins")
    while not f_stop.is_set():
        pushed.clear()  # before the sweep: a message stored during it wakes the next one
        for msg in next_messages(state, nodes_mapping):
            queue.put(msg)
        if not f_stop.wait(MIN_GAP_S):
            pushed.wait(max(IDLE_S - MIN_GAP_S, 0.0))


def install() -> None:
    """Use the one-pass, push-woken loop in this process's simulation runtime and the
    reply-woken ``InMemoryGrid.send_and_receive`` (idempotent)."""
    vce_api.add_messages_to_queue = _add_messages_to_queue
    InMemoryGrid.send_and_receive = _send_and_receive  # type: ignore[method-assign]
