"""The federated server: the round loop, its records, and the Flower ServerApp around it.

It sits between :mod:`strategies` (the aggregation it drives) and the
experiment drivers (``sims.run``, ``sims.compare``, ...), and imports nothing
else from ``sims``: a deployment's ServerApp needs only this package.

=====================  ==============================================================
``round_loop``         :func:`run_federation`: discovery, then every round played
                       (``play_round`` -> ``RoundOutcome``), recorded, checkpointed
``run_state``          a run's state between rounds; a fresh or resumed start
``run_status``         stop requests, ``status.json``, :class:`RunFailed`
``exchange``           seeded sampling, sending a round (a retry), attributing replies
``discovery``          which node is which partition (discovery, rediscovery)
``device_table``       the operator's device table (deployment)
``knowledge``          what the server knows of each node; every input it gives the strategy
``records``            clients.csv and device_classes.csv rows, the round's log line
``sim_time``           simulated time: reachable partitions, deadline, round duration
``results``            the results folder: tables, plots, claiming a folder
``checkpoint``         per-round checkpoints (safetensors), resume
``initial``            the initial global model (checkpoint, pretrained, random)
``config_files``       a config name or path, ``extends`` and overrides, checked
``server_app``         the Flower ``ServerApp`` (``flwr run``) and run sequences
=====================  ==============================================================

The names below are imported from their modules on first use, so that reading
a results folder (:mod:`sims.server.results`) does not load torch and Flower.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DeviceTable", "RunFailed", "RunSpec", "STATUS_FILE", "build_strategy", "config_path",
    "default_out_dir", "load_cli_config", "make_sequence_app", "read_device_table", "request_stop",
    "run_federation", "sample_partitions", "stop_requested",
]  # fmt: skip

_HOME = {  # exported name -> the module that defines it
    "DeviceTable": "device_table",
    "RunFailed": "run_status",
    "RunSpec": "server_app",
    "STATUS_FILE": "run_status",
    "build_strategy": "run_state",
    "config_path": "config_files",
    "default_out_dir": "server_app",
    "load_cli_config": "config_files",
    "make_sequence_app": "server_app",
    "read_device_table": "device_table",
    "request_stop": "run_status",
    "run_federation": "round_loop",
    "sample_partitions": "exchange",
    "stop_requested": "run_status",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
