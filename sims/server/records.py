"""The rows a round adds to clients.csv and device_classes.csv, and the round's log line.

A reply becomes one clients.csv row (:func:`client_row`): ``ok`` with its
metrics and measured upload, ``failed`` with the reason of an error reply,
``rejected`` with the strategy's reason (nothing else is read from it). A
sampled partition with no reply gets a ``failed`` row (:func:`unanswered_rows`).
The columns and files themselves are :mod:`sims.server.results`'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message

from fedneq.federation.wire import from_array_record, payload_nbytes

__all__ = [
    "CLIENT_METRICS", "class_rows", "client_row", "error_reason", "format_eta", "format_percent",
    "format_seconds", "mean", "numbers", "unanswered_rows",
]  # fmt: skip

CLIENT_METRICS = {  # clients.csv column -> reply metric (upload_bytes is measured here)
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


def _number(value: Any) -> int | float | str:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else ""


def error_reason(reason: str | None) -> str:
    """The informative part of an error reply's reason (Flower wraps the client's exception)."""
    lines = (reason or "").strip().splitlines()
    text = lines[-1] if lines else ""
    text = text.split("occurred. Message: ", 1)[-1].removesuffix("'>")
    return text[:200]


def client_row(
    server_round: int,
    msg: Message,
    pid: int,
    device: str,
    rejected: Mapping[int, str],
    update_rms: float | None,
    clip: float | None = None,
) -> dict[str, Any]:
    """The clients.csv row of partition ``pid``'s reply ``msg`` (``rejected``: partition -> why)."""
    row: dict[str, Any] = {"round": server_round, "partition_id": pid, "device": device}
    if msg.has_error():
        return row | {"status": "failed", "reason": error_reason(msg.error.reason)}
    if pid in rejected:  # its content is untrusted: record nothing from it
        return row | {"status": "rejected", "reason": rejected[pid][:300]}
    metrics = next(iter(msg.content.metric_records.values()))
    row["status"] = "ok"
    for column, key in CLIENT_METRICS.items():
        row[column] = _number(metrics.get(key, ""))
    row["upload_bytes"] = payload_nbytes(
        from_array_record(next(iter(msg.content.array_records.values())))
    )
    row["update_rms"] = "" if update_rms is None else update_rms
    if "filtered-layers" in metrics:  # a device that filters: which convs ran filtered
        row["filtered_layers"] = _number(metrics["filtered-layers"])
        row["filtered_convs"] = " ".join(str(i) for i in metrics.get("filtered-convs", []))
    if clip is not None:
        row["reason"] = f"update scaled by {clip:.3g} to clip_update_ratio x the round's median"
    return row


def unanswered_rows(
    server_round: int,
    sampled: Sequence[int],
    answered: Collection[int],
    gone: Collection[int],
    devices: Mapping[int, str],
) -> list[dict[str, Any]]:
    """``failed`` rows of the sampled partitions with no reply: ``gone`` ones were not sent."""
    return [
        {"round": server_round, "partition_id": p, "device": devices[p], "status": "failed",
         "reason": "no live node: its SuperNode is gone (not sent)" if p in gone
         else "no reply before the round timeout"}
        for p in sampled
        if p not in answered
    ]  # fmt: skip


def numbers(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The non-empty values of column ``key``."""
    return [float(r[key]) for r in rows if r.get(key, "") != ""]


def mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | str:
    """The mean of column ``key``'s non-empty values; "" when there are none."""
    values = numbers(rows, key)
    return float(np.mean(values)) if values else ""


def class_rows(server_round: int, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """device_classes.csv: the ``ok`` rows of a round, aggregated per device class."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok":
            groups[r["device"]].append(r)
    return [
        {
            "round": server_round,
            "device": device,
            "clients": len(g),
            "mean_trainable_fraction": mean(g, "trainable_fraction"),
            "bytes_up": int(sum(numbers(g, "upload_bytes"))),
            "mean_flops_saved": mean(g, "flops_saved"),
            "mean_train_loss": mean(g, "train_loss"),
        }
        for device, g in sorted(groups.items())
    ]


def format_seconds(seconds: float) -> str:
    """Simulated seconds for the round log line: 12.3s, 4.5min, 2.1h."""
    if seconds >= 7200:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}min" if seconds >= 120 else f"{seconds:.1f}s"


def format_eta(seconds: float) -> str:
    """Time left for the round log line: m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def format_percent(value: float | str) -> str:
    """A fraction as a percentage; "-" for an empty cell."""
    return f"{100 * value:.1f}%" if isinstance(value, float) else "-"
