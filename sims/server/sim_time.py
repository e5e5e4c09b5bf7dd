"""The server's side of simulated time: who can be sampled, who misses the deadline, how long a round lasts.

The time model itself (what one client's round costs on its device) is
:mod:`fedneq.federation.timing`; each client reports its simulated seconds with its reply
(``download-s``, ``compute-s``, ``upload-s``). Here :func:`sims.server.round_loop.run_federation`
finds:

* the partitions reachable in a round (:func:`reachable_partitions`: the
  eligible ones that the seeded availability draw puts online);
* which replies miss ``[run] round_deadline_s`` (:func:`apply_deadline`): they
  are not aggregated and are recorded as ``dropped``, with their times;
* the round's simulated duration (:func:`round_seconds`): its slowest accepted
  reply, or the deadline when a sampled client missed it (dropped or failed).

A reply that reports no valid time is left to the strategy's checks and, if
accepted, recorded without times (it is never dropped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import Message

from fedneq.config import Config
from fedneq.federation.timing import (
    ClientTime,
    available,
    misses_deadline,
    read_client_time,
    round_duration,
)

__all__ = [
    "DeadlineSplit",
    "add_seconds",
    "apply_deadline",
    "reachable_partitions",
    "round_seconds",
    "time_row",
]

# clients.csv column -> reply metric, for a reply the deadline dropped (its times, its FLOPs)
_TIME_COLUMNS = {
    "train_flops": "train-flops",
    "probe_flops": "probe-flops",
    "download_s": "download-s",
    "compute_s": "compute-s",
    "upload_s": "upload-s",
}


def reachable_partitions(config: Config, server_round: int) -> list[int]:
    """The eligible partitions whose device is reachable in ``server_round``.

    Every eligible partition when all devices have availability 1.0 (the default).
    """
    devices = config.fleet.fleet().assign(config.run.num_clients, config.run.seed)
    up = available(devices, config.run.seed, server_round)
    return [p for p in config.eligible_partitions() if up[p]]


def _reported_time(msg: Message) -> tuple[ClientTime | None, Mapping[str, Any]]:
    """A reply's simulated time, or None when it has none (or a malformed one)."""
    if msg.has_error():
        return None, {}
    try:
        metrics = next(iter(msg.content.metric_records.values()))
        return read_client_time(metrics), metrics
    except (StopIteration, ValueError, TypeError):
        return None, {}


@dataclass(frozen=True)
class DeadlineSplit:
    """A round's replies split by the deadline."""

    on_time: list[Message]  # error replies, untimed replies and those within the deadline
    dropped: list[dict[str, Any]]  # clients.csv rows of the replies that missed it


def apply_deadline(
    server_round: int,
    replies: Sequence[Message],
    partition_of: Mapping[int, int],
    devices: Mapping[int, str],
    deadline_s: float,
) -> DeadlineSplit:
    """Drop the replies whose reported simulated time exceeds ``deadline_s`` (0: none)."""
    on_time: list[Message] = []
    dropped: list[dict[str, Any]] = []
    for msg in replies:
        time, metrics = _reported_time(msg)
        if time is None or not misses_deadline(time, deadline_s):
            on_time.append(msg)
            continue
        pid = partition_of[msg.metadata.src_node_id]
        row = {"round": server_round, "partition_id": pid, "device": devices[pid]}
        row |= {"status": "dropped", "reason": (
            f"simulated round time {time.total_s:.6g} s exceeds [run] round_deadline_s "
            f"= {deadline_s:g} s"
        )}  # fmt: skip
        row |= {column: metrics.get(key, "") for column, key in _TIME_COLUMNS.items()}
        dropped.append(time_row(row))
    return DeadlineSplit(on_time, dropped)


def time_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``time_s`` = download + compute + upload seconds, when it has all three."""
    parts = [row.get(k, "") for k in ("download_s", "compute_s", "upload_s")]
    if all(isinstance(p, int | float) and not isinstance(p, bool) for p in parts):
        return row | {"time_s": float(sum(parts))}
    return row


def round_seconds(client_rows: Sequence[Mapping[str, Any]], deadline_s: float) -> float:
    """Simulated seconds of a round from its clients.csv rows (:func:`fedneq.federation.timing.round_duration`)."""
    times = [
        float(r["time_s"]) for r in client_rows if r["status"] == "ok" and r.get("time_s", "") != ""
    ]
    missed = any(r["status"] in ("dropped", "failed") for r in client_rows)
    return round_duration(times, deadline_s, missed=missed)


def add_seconds(cumulative: float, seconds: float) -> float:
    """``cumulative + seconds`` to the microsecond.

    rounds.csv stores the cumulative time exactly (``repr``), so a resumed
    run, which continues from the stored value, adds up to the same figures
    as an uninterrupted one.
    """
    return round(cumulative + seconds, 6)
