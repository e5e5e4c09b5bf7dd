"""sims.engine.vce_actors: each Ray actor holds the next client queued behind the one it runs."""

from __future__ import annotations

import os
import threading
import time
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

from fedneq.config import Config
from sims.engine import vce_actors
from sims.engine.vce_actors import SLOTS, QueuedActorPool

pytestmark = pytest.mark.usefixtures("task_identity")

BUSY_S = 0.5  # each client's work

app = ClientApp()


@app.query()
def busy(msg: Message, context: Context) -> Message:
    started = time.time()
    time.sleep(BUSY_S)
    times = ConfigRecord({"start": started, "end": time.time(), "pid": os.getpid()})
    return Message(RecordDict({"times": times}), reply_to=msg)


def _load_app() -> ClientApp:
    return app


def _message(node: int) -> tuple[Message, Context]:
    msg = Message(
        RecordDict({"c": ConfigRecord({"node": node})}), dst_node_id=node, message_type="query"
    )
    msg.metadata.__dict__["_message_id"] = str(uuid4())  # as the LinkState sets it when stored
    context = Context(run_id=1, node_id=node, node_config={"partition-id": node}, state=RecordDict(),
                      run_config={})  # fmt: skip
    return msg, context


def test_install_makes_the_ray_backend_build_the_queued_pool(monkeypatch) -> None:
    monkeypatch.setattr(raybackend, "BasicActorPool", BasicActorPool)  # restored after the test
    vce_actors.install(1)
    vce_actors.install()  # the last call's setting holds
    assert raybackend.BasicActorPool.func is QueuedActorPool
    assert raybackend.BasicActorPool.keywords == {"slots": SLOTS}
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="slots must be an integer >= 1"):
            vce_actors.install(bad)


@pytest.mark.slow
def test_runs_with_stragglers_keep_one_task_per_actor() -> None:
    """A straggler sleeps in its actor: a client queued behind it would miss the timeout too."""
    plain = Config()
    stragglers = plain.replace(faults={"straggler_prob": 0.1, "straggler_delay_s": 5.0})
    crashes = plain.replace(faults={"crash_prob": 0.3})
    assert vce_actors.slots_for([plain, crashes]) == SLOTS == 2
    assert vce_actors.slots_for([plain, stragglers]) == 1


@pytest.mark.slow
def test_one_actor_runs_two_clients_back_to_back(monkeypatch) -> None:
    """Two worker threads submit at once to the one actor: the second client is queued at
    it (Flower's pool has no actor left for it) and starts as the first one ends."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(raybackend, "BasicActorPool", BasicActorPool)  # restored after the test
    vce_actors.install()
    backend = RayBackend({"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 1}})
    try:
        backend.build(_load_app)
        assert backend.num_workers == SLOTS  # one worker thread per slot of the one actor
        assert backend.pool is not None and len(backend.pool.actors()) == 1
        replies: dict[int, Message] = {}

        def work(node: int) -> None:
            replies[node] = backend.process_message(*_message(node))[0]

        threads = [threading.Thread(target=work, args=(node,)) for node in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(replies) == [1, 2], "a client was not run"
        runs = sorted(
            (r.content["times"]["start"], r.content["times"]["end"]) for r in replies.values()
        )
        assert len({r.content["times"]["pid"] for r in replies.values()}) == 1  # one actor
        (_, end1), (start2, _) = runs
        assert start2 >= end1  # one at a time
        assert start2 - end1 < BUSY_S / 2  # the second was waiting at the actor
        assert backend.is_worker_idle() and len(backend.pool.pool) == SLOTS
    finally:
        backend.terminate()
        ray.shutdown()
