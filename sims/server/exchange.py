"""A round's exchange with the nodes: who is sampled, what is sent, which node each reply is from.

* :func:`sample_partitions`: the round's partitions, a seeded draw.
* :func:`send_round`: the training messages (built by the strategy's
  ``configure_train``), sent once more when fewer than ``[run] min_replies``
  replies come back (the config carries ``attempt``, so injected faults draw
  anew), then given up as skipped.
* :func:`attribute_replies`: each reply paired with the node its message was
  sent to, in partition order whatever the arrival order (the float sums of
  the aggregate then do not depend on it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedneq.config import Config
from fedneq.federation.protocol import ATTEMPT_KEY, CONFIG_KEY, STATE_DIR_KEY
from fedneq.task import derive_seed
from sims.server.sim_time import reachable_partitions
from strategies import SparseStrategy

__all__ = ["ATTEMPTS", "SentRound", "attribute_replies", "sample_partitions", "send_round"]

log = logging.getLogger("fedneq")

ATTEMPTS = 2  # a round below min_replies is sent once more, then skipped


def sample_partitions(config: Config, server_round: int) -> list[int]:
    """The partition ids trained in a round: a seeded draw, the same on every rerun.

    Drawn from :meth:`~fedneq.config.Config.eligible_partitions` (the
    ``[run] participants`` classes; every partition by default) that are
    reachable in the round (:func:`sims.server.sim_time.reachable_partitions`;
    all of them unless a device class has ``availability`` < 1); all of those
    if fewer than ``[run] clients_per_round`` are. The draw depends on the seed,
    the round and that pool alone, so every method of a seed trains the same
    clients in a round. The partitions of the ``[run] excluded`` classes are
    then left out of the draw (a server that ignores those devices): the
    others are exactly the whole fleet's sample, and a round may have none.
    """
    rng = np.random.default_rng(derive_seed(config.run.seed, server_round, 1))
    pool = np.asarray(reachable_partitions(config, server_round), dtype=np.int64)
    size = min(config.run.clients_per_round, len(pool))
    chosen = sorted(int(p) for p in rng.choice(pool, size=size, replace=False))
    if config.run.excluded:
        devices = config.fleet.fleet().assign(config.run.num_clients, config.run.seed)
        chosen = [p for p in chosen if devices[p].name not in config.run.excluded]
    return chosen


@dataclass(frozen=True)
class SentRound:
    """What came back from sending a round."""

    replies: list[Message]  # the replies to its last attempt, in arrival order
    skipped: bool  # every attempt had fewer than [run] min_replies replies
    sent_to: dict[str, int]  # message id -> the node id it was sent to (last attempt)


def send_round(
    grid: Grid,
    strategy: SparseStrategy,
    config: Config,
    server_round: int,
    arrays: ArrayRecord,
    state_dir: Path,
) -> SentRound:
    """Send a round's training messages (twice at most, see the module docstring)."""
    replies: list[Message] = []
    sent_to: dict[str, int] = {}
    for attempt in range(ATTEMPTS):
        train_config = ConfigRecord(
            {CONFIG_KEY: config.to_json(), ATTEMPT_KEY: attempt, STATE_DIR_KEY: str(state_dir)}
        )
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        if not messages:  # nobody to train this round ([run] excluded): skipped, nothing sent
            return SentRound([], True, {})
        replies = list(grid.send_and_receive(messages, timeout=config.run.round_timeout_s))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        ok = sum(not r.has_error() for r in replies)
        if ok >= config.run.min_replies:
            return SentRound(replies, False, sent_to)
        last = attempt + 1 == ATTEMPTS
        log.warning(
            "round %d, attempt %d of %d: %d of %d sampled clients replied (%d failed, %d no reply "
            "before the %g s round timeout), fewer than [run] min_replies=%d; %s",
            server_round, attempt + 1, ATTEMPTS, ok, len(messages), len(replies) - ok,
            len(messages) - len(replies), config.run.round_timeout_s, config.run.min_replies,
            "skipping the round, the global model stays as it was" if last else "sending it again",
        )  # fmt: skip
    return SentRound(replies, True, sent_to)


def attribute_replies(
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
