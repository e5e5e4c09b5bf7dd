"""The tiny simulation config shared by the fault, resume and determinism tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedneq.config import Config


def tiny_config(tmp_path: Path, base: Config | None = None, **tables: dict[str, Any]) -> Config:
    """``base`` (default: the defaults) shrunk to seconds per round, then ``tables`` applied.

    6 clients, 3 per round, 3 rounds of digits on small-cnn from random
    initialization (no pretraining), 1 local epoch; ``tables`` are config
    tables to override, e.g. ``run={"seed": 3}``.
    """
    config = (base or Config()).replace(
        run={"name": "tiny", "num_clients": 6, "clients_per_round": 3, "rounds": 3, "min_replies": 1,
             "out_dir": str(tmp_path)},
        data={"dataset": "digits", "classes": "all", "partition": "iid", "probe_size": 8},
        model={"name": "small-cnn", "pretrain_epochs": 0, "checkpoint": ""},
        fleet={"local_epochs": 1, "batch_size": 32},
        simulation={"cpus_per_client": 1.0},
    )  # fmt: skip
    return config.replace(**tables) if tables else config
