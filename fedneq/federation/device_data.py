"""Per-device partition files: each device holds only its own partition.

On a server (which has the whole dataset and its loaders), cut a run's
dataset into one file per partition::

    python -m fedneq.federation.device_data sims/configs/deploy-test.toml partitions/

writes ``partitions/partition-<i>.safetensors`` for every partition ``i`` of
``[run] num_clients``: the train / probe / local-test split that
:func:`fedneq.task.client_data` gives partition ``i`` (the same seeded split
as in simulation), as tensors, with the model's input shape and class count
and a fingerprint of the config keys that decide the split (JSON metadata).
Copy each file to its device and start the SuperNode with
``--node-config "... data-file='/home/pi/partition-0.safetensors'"``: the
client then reads only that file, never the dataset, so the device needs
neither the dataset nor its loaders (scikit-learn, flwr-datasets, torchvision;
``pip install fedneq[client]``).

A file is checked against the run when it is read
(:func:`check_partition_file`): another partition, dataset, seed or split
setting is an error naming what differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedneq.config import Config
from fedneq.data.arrays import ArrayDataset
from fedneq.task import ClientData

__all__ = [
    "PartitionFile", "check_partition_file", "partition_file_identity", "read_partition_file",
    "split_fingerprint", "write_partition_files",
]  # fmt: skip

_SPLITS = ("train", "probe", "test")


@dataclass(frozen=True)
class PartitionFile:
    """A device's partition as read from its file."""

    data: ClientData
    partition_id: int
    num_classes: int
    in_channels: int
    shape: tuple[int, ...]  # (C, H, W) of one input
    fingerprint: str  # split_fingerprint of the config it was cut with


def split_fingerprint(config: Config, partition_id: int) -> str:
    """What decides partition ``partition_id``'s data: dataset, seed, split settings."""
    d = config.data
    keys = {
        "partition_id": partition_id,
        "num_partitions": config.run.num_clients,
        "seed": config.run.seed,
        "data": {k: getattr(d, k) for k in (
            "dataset", "image_size", "partition", "alpha", "classes_per_client",
            "min_partition_size", "probe_size", "test_fraction", "classes", "train_limit",
        )},
    }  # fmt: skip
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def write_partition_files(config: Config, out_dir: str | Path) -> list[Path]:
    """One ``partition-<i>.safetensors`` per partition of ``config``; returns their paths."""
    from fedneq.task import client_data, load_task  # the dataset loaders: server side only

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(config)
    paths = []
    for pid in range(config.run.num_clients):
        data = client_data(config, pid)
        tensors = {}
        for split in _SPLITS:
            part: ArrayDataset = getattr(data, split)
            tensors[f"{split}.x"] = part.x.contiguous()
            tensors[f"{split}.y"] = part.y.contiguous()
        meta = {
            "partition_id": str(pid),
            "num_classes": str(task.num_classes),
            "in_channels": str(task.in_channels),
            "shape": json.dumps(list(task.train.image_shape)),
            "fingerprint": split_fingerprint(config, pid),
            "dataset": config.data.dataset,
        }
        path = out / f"partition-{pid}.safetensors"
        tmp = out / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(st_save(tensors, metadata=meta))
        os.replace(tmp, path)
        paths.append(path)
    return paths


_META_KEYS = ("partition_id", "num_classes", "in_channels", "shape", "fingerprint")


def _metadata(path: Path, header: bytes) -> dict[str, str]:
    """The JSON metadata of a partition file, from its first bytes (safetensors' header)."""
    try:
        header_len = int.from_bytes(header[:8], "little")
        meta = json.loads(header[8 : 8 + header_len]).get("__metadata__", {})
    except (ValueError, AttributeError):
        meta = None
    missing = [k for k in _META_KEYS if k not in meta] if isinstance(meta, dict) else list(_META_KEYS)
    if missing:
        raise ValueError(f"{path} is not a fedneq partition file: metadata misses {missing}")
    return meta


def partition_file_identity(path: str | Path) -> tuple[int, str]:
    """``(partition id, split fingerprint)`` of a partition file, reading its header only."""
    path = Path(path)
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if not 0 < header_len <= 1 << 20:
            raise ValueError(f"{path} is not a fedneq partition file (no safetensors header)")
        meta = _metadata(path, header_len.to_bytes(8, "little") + f.read(header_len))
    return int(meta["partition_id"]), meta["fingerprint"]


def read_partition_file(path: str | Path) -> PartitionFile:
    """Read a file written by :func:`write_partition_files` (no pickle: safetensors + JSON)."""
    path = Path(path)
    raw = path.read_bytes()
    tensors = st_load(raw)
    meta = _metadata(path, raw)
    data = ClientData(
        *(ArrayDataset(tensors[f"{split}.x"], tensors[f"{split}.y"]) for split in _SPLITS)
    )
    return PartitionFile(
        data=data,
        partition_id=int(meta["partition_id"]),
        num_classes=int(meta["num_classes"]),
        in_channels=int(meta["in_channels"]),
        shape=tuple(json.loads(meta["shape"])),
        fingerprint=meta["fingerprint"],
    )


def check_partition_file(part: PartitionFile, config: Config, partition_id: int, path: Path) -> None:
    """Raise ``ValueError`` if ``part`` is not partition ``partition_id`` of ``config``'s split."""
    if part.partition_id != partition_id:
        raise ValueError(
            f"node config data-file={str(path)!r} holds partition {part.partition_id}, but the "
            f"node is partition-id={partition_id}"
        )
    if part.fingerprint != split_fingerprint(config, partition_id):
        raise ValueError(
            f"node config data-file={str(path)!r} was cut for another run (dataset, seed, "
            "num_clients or [data] split settings differ): cut it again with "
            "`python -m fedneq.federation.device_data <config> <folder>`"
        )


def main(argv: Sequence[str] | None = None) -> None:
    from fedneq.config import load_config

    parser = argparse.ArgumentParser(
        prog="python -m fedneq.federation.device_data",
        description="Cut a run's dataset into one file per device (partition).",
    )
    parser.add_argument("config", help="the run's TOML config (a path)")
    parser.add_argument("out_dir", help="folder for partition-<i>.safetensors")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    for path in write_partition_files(config, args.out_dir):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
