"""The server's side of a federated run: discover nodes, run rounds, record.

``run_federation`` is what the ServerApp's ``main`` does; it owns the round
loop (rather than ``Strategy.start``) so that it can sample clients from a
seed, record every client's reply, checkpoint after every round and resume.
The strategy is used through Flower's strategy API: ``configure_train`` builds
the messages, ``aggregate_train`` turns the replies into the next global model.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedneq.client_app import CONFIG_KEY
from fedneq.config import Config
from fedneq.task import build_model, client_data, derive_seed, load_task
from fedneq.training import evaluate
from fedneq.wire import tensor_table
from sims.checkpoint import load_run_checkpoint, save_run_checkpoint
from sims.initial import initial_state
from sims.results import Recorder
from strategies import SparseStrategy, get_strategy

__all__ = ["discover_nodes", "run_federation", "sample_partitions"]

log = logging.getLogger("fedneq")

_CLIENT_METRICS = {
    "num_examples": "num-examples",
    "train_loss": "train-loss",
    "trainable_params": "trainable-params",
    "trainable_fraction": "trainable-fraction",
    "selected_neurons": "selected-neurons",
    "upload_bytes": "upload-bytes",
    "flops_saved": "flops-saved",
    "memory_estimate_bytes": "memory-estimate-bytes",
    "state_bytes": "state-bytes",
    "used_initializer": "used-initializer",
}


def sample_partitions(config: Config, server_round: int) -> list[int]:
    """The partition ids trained in a round: a seeded draw, the same on every rerun."""
    rng = np.random.default_rng(derive_seed(config.run.seed, server_round, 1))
    chosen = rng.choice(config.run.num_clients, size=config.run.clients_per_round, replace=False)
    return sorted(int(p) for p in chosen)


def discover_nodes(
    grid: Grid, config: Config, *, timeout_s: float = 600.0
) -> tuple[dict[int, int], dict[int, str]]:
    """Ask every node who it is: ``{partition id: node id}`` and ``{partition id: device}``."""
    deadline = time.monotonic() + timeout_s
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < config.run.num_clients and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < config.run.num_clients:
        raise RuntimeError(
            f"only {len(node_ids)} nodes connected, the run needs [run] num_clients="
            f"{config.run.num_clients}"
        )
    content = RecordDict({"config": ConfigRecord({CONFIG_KEY: config.to_json()})})
    messages = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    by_partition: dict[int, int] = {}
    devices: dict[int, str] = {}
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(
                f"node {reply.metadata.src_node_id} failed to identify itself: {reply.error.reason}"
            )
        pid = int(reply.content["metrics"]["partition-id"])
        if pid in by_partition:
            raise RuntimeError(f"two nodes claim partition-id {pid}")
        by_partition[pid] = reply.metadata.src_node_id
        devices[pid] = str(reply.content["info"]["device"])
    missing = sorted(set(range(config.run.num_clients)) - set(by_partition))
    if missing:
        raise RuntimeError(f"no node answered for partition ids {missing}")
    return by_partition, devices


def _dense_nbytes(arrays: ArrayRecord) -> int:
    return sum(a.numpy().nbytes for a in arrays.values())


def _client_row(server_round: int, msg: Message, partition_of: dict[int, int], devices: dict[int, str]) -> dict[str, Any]:
    pid = partition_of[msg.metadata.src_node_id]
    row: dict[str, Any] = {"round": server_round, "partition_id": pid, "device": devices[pid]}
    if msg.has_error():
        row.update(status="failed", reason=msg.error.reason.splitlines()[-1][:200] if msg.error.reason else "")
        return row
    metrics = msg.content["metrics"]
    row["status"] = "ok"
    for column, key in _CLIENT_METRICS.items():
        row[column] = metrics.get(key, "")
    return row


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
            "mean_trainable_fraction": float(np.mean([r["trainable_fraction"] for r in g])),
            "bytes_up": int(sum(r["upload_bytes"] for r in g)),
            "mean_flops_saved": float(np.mean([r["flops_saved"] for r in g])),
            "mean_train_loss": float(np.mean([r["train_loss"] for r in g])),
        }
        for device, g in sorted(groups.items())
    ]


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float | str:
    values = [float(r[key]) for r in rows]
    return float(np.mean(values)) if values else ""


def build_strategy(config: Config, neuron_map, state: dict[str, torch.Tensor]) -> SparseStrategy:
    return get_strategy(
        config.strategy.name,
        neuron_map=neuron_map,
        table=tensor_table(state),
        reference_state=state,
        **config.strategy.options,
    )


def run_federation(grid: Grid, config: Config, out_dir: Path, *, resume: bool = False) -> list[dict[str, Any]]:
    """Run all rounds of ``config`` on ``grid``; returns the rows of rounds.csv."""
    out_dir = Path(out_dir)
    task = load_task(config)
    for pid in range(config.run.num_clients):  # bad partitions fail here, before any round
        client_data(config, pid)
    torch.manual_seed(config.run.seed)
    model, neuron_map = build_model(config, task)
    state = initial_state(config, task, model, cache_dir=Path(config.run.out_dir) / "_pretrained")
    model.load_state_dict(state)
    strategy = build_strategy(config, neuron_map, state)
    recorder = Recorder(out_dir, config.to_dict())
    arrays = ArrayRecord(state)
    first_round = 1
    if resume:
        ckpt = load_run_checkpoint(out_dir, config)
        if ckpt is not None:
            arrays = ArrayRecord(ckpt.global_state)
            strategy.load_state_dict(ckpt.strategy_state)
            first_round = ckpt.round + 1
            recorder.resume(ckpt.round)
            log.info("resuming %s after round %d", out_dir, ckpt.round)
    cum_up = float(recorder.rounds[-1]["cum_bytes_up"]) if recorder.rounds else 0.0

    node_of, devices = discover_nodes(grid, config, timeout_s=config.run.round_timeout_s)
    partition_of = {n: p for p, n in node_of.items()}
    total = config.run.rounds
    for rnd in range(first_round, total + 1):
        t0 = time.monotonic()
        sampled = sample_partitions(config, rnd)
        strategy.sample = lambda _grid, _round, chosen=sampled: [node_of[p] for p in chosen]
        train_config = ConfigRecord({CONFIG_KEY: config.to_json()})
        replies: list[Message] = []
        for attempt in range(2):  # a round below min_replies is retried once, then skipped
            messages = strategy.configure_train(rnd, arrays, train_config, grid)
            replies = list(grid.send_and_receive(messages, timeout=config.run.round_timeout_s))
            ok = [r for r in replies if not r.has_error()]
            if len(ok) >= config.run.min_replies:
                break
            log.warning(
                "round %d attempt %d: %d of %d clients replied, fewer than [run] min_replies=%d%s",
                rnd, attempt + 1, len(ok), len(sampled), config.run.min_replies,
                "; retrying" if attempt == 0 else "; skipping the round",
            )  # fmt: skip
        # aggregate in partition order: the float sums do not depend on arrival order
        replies.sort(key=lambda m: partition_of[m.metadata.src_node_id])
        ok = [r for r in replies if not r.has_error()]
        skipped = len(ok) < config.run.min_replies
        rejected: dict[int, str] = {}
        if not skipped:
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            rejected = {partition_of[n]: why for n, why in strategy.last_rejected.items()}
            if new_arrays is not None:
                arrays = new_arrays
        client_rows = [_client_row(rnd, m, partition_of, devices) for m in replies]
        for row in client_rows:
            if row["partition_id"] in rejected:
                row.update(status="rejected", reason=rejected[row["partition_id"]])
        answered = {r["partition_id"] for r in client_rows}
        client_rows += [
            {"round": rnd, "partition_id": p, "device": devices[p], "status": "failed", "reason": "no reply before the round timeout"}
            for p in sampled
            if p not in answered
        ]  # fmt: skip
        client_rows.sort(key=lambda r: r["partition_id"])
        accepted = [r for r in client_rows if r["status"] == "ok"]
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, task.test)
        bytes_up = int(sum(r["upload_bytes"] for r in accepted))
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
                    "bytes_down": len(sampled) * _dense_nbytes(arrays),
                    "bytes_up": bytes_up,
                    "cum_bytes_up": int(cum_up),
                    "mean_trainable_fraction": _mean(accepted, "trainable_fraction"),
                    "mean_flops_saved": _mean(accepted, "flops_saved"),
                    "mean_train_loss": _mean(accepted, "train_loss"),
                    "mean_state_bytes": _mean(accepted, "state_bytes"),
                }
            ],
        )
        recorder.add("timing.csv", [{"round": rnd, "seconds": time.monotonic() - t0}])
        recorder.flush()
        save_run_checkpoint(out_dir, config, rnd, arrays.to_torch_state_dict(), strategy.state_dict())
        failed = sum(r["status"] != "ok" for r in client_rows)
        print(
            f"[fedneq] round {rnd}/{total}  acc {acc:.4f}  loss {loss:.4f}  "
            f"clients {len(accepted)}/{len(sampled)} ok, {failed} failed/rejected  "
            f"up {bytes_up / 1e3:.1f} kB  trainable {_fmt_pct(_mean(accepted, 'trainable_fraction'))}  "
            f"{time.monotonic() - t0:.1f}s",
            flush=True,
        )
    recorder.plot()
    return recorder.rounds


def _fmt_pct(value: float | str) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, float) else "-"
