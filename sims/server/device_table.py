"""The operator's device table: which device each partition runs on, and which node may be it.

In deployment the server holds every node to the device the *operator* says it
is, never to what the node declares: a CSV ``partition_id,device[,node_id]``
(``flwr run --run-config "devices='table.csv'"``, docs/DEPLOY.md). Without one,
the server uses the seeded fleet assignment, as in simulation.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from fedneq.config import Config
from fedneq.federation.devices import DeviceProfile

__all__ = ["DeviceTable", "read_device_table"]


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
