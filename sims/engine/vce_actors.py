"""Flower's Ray actor pool, with the next client queued at each actor while it trains one.

Flower 1.41's simulation runtime (``RayBackend``, ``BasicActorPool``) keeps one
task in flight per actor: one worker thread per actor takes a message, submits
it, waits for the reply, and only then takes the next message. Between two
clients the actor waits for the driver: the reply travels back, the thread
wakes, the next message (the whole global model) is serialized into Ray's
object store and sent. For MobileNetV2 0.5 at 32x32 that is ~15 ms per client,
an eighth of the actors' time in a 10 000-client round (docs/SCALE.md).

:func:`install` swaps in :class:`QueuedActorPool`, which lists every actor
:data:`SLOTS` times. The runtime starts one worker thread per entry, so each
actor has the next client's message queued (serialized, in Ray's object
store) while it trains the current one, and starts it as soon as it is done;
a Ray actor runs its tasks one at a time, in the order they were submitted.
What each client computes is unchanged; the cost is that the last clients of
a round are committed to an actor one client earlier than before, so a round
can end up to one client's time less balanced.

A client queued behind one that sleeps waits out the sleep too: an injected
straggler (``[faults] straggler_prob``) would make the client after it miss
the round timeout as well. Runs with straggler faults therefore keep Flower's
one task per actor (:func:`slots_for`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

from fedneq.config import Config

__all__ = ["SLOTS", "QueuedActorPool", "install", "slots_for"]

SLOTS = 2  # tasks in flight per actor: the one running and the next one


class QueuedActorPool(BasicActorPool):
    """Flower's actor pool, with each actor in it ``slots`` times."""

    def __init__(self, *args: Any, slots: int = SLOTS, **kwargs: Any) -> None:
        self.slots = slots
        super().__init__(*args, **kwargs)

    def add_actors_to_pool(self, num_actors: int) -> None:
        for _ in range(num_actors):
            actor = self.create_actor_fn()
            self.pool.extend([actor] * self.slots)
        self.num_actors += num_actors * self.slots  # RayBackend starts this many worker threads

    def actors(self) -> list[Any]:
        """Each idle actor once."""
        return list({id(actor): actor for actor in self.pool}.values())

    def terminate_all_actors(self) -> None:
        for actor in self.actors():
            actor.terminate.remote()


def slots_for(configs: Iterable[Config]) -> int:
    """Tasks in flight per actor for runs sharing one engine: 1 if any injects stragglers."""
    return 1 if any(c.faults.straggler_prob > 0 for c in configs) else SLOTS


def install(slots: int = SLOTS) -> None:
    """Build this process's simulation runtime's actor pool as a :class:`QueuedActorPool` of
    ``slots`` tasks per actor (calling it again replaces the setting)."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
    raybackend.BasicActorPool = functools.partial(QueuedActorPool, slots=slots)  # type: ignore[misc]
