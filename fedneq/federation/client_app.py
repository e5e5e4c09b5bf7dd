"""The Flower ClientApp: thin glue around :func:`fedneq.federation.client.client_round`.

The run configuration arrives with every message (``config["fedneq-config"]``,
JSON written by the server), so the same ClientApp runs under Flower's
simulation engine, under ``flwr run`` and on a real SuperNode. Which client it
is comes from the node config: ``partition-id`` / ``num-partitions`` (all that
simulation provides), plus on a real SuperNode optionally ``device`` (a fleet
class) or ``budget``, and ``data-dir`` (the dataset root on that device).

The velocity state a client keeps between its participations lives in a
file store (:mod:`fedneq.federation.state_store`): written after every
participation, read back at the next one, never held in memory between them:
the node's own ``state-dir`` when its node config names one (a real device:
the state stays on the device and survives a SuperNode restart), else the
training config's ``client-state-dir`` if that folder exists on this machine
(simulation, single-host deployment: the run's ``client_state/``, so 10 000
clients' states cost the simulation driver nothing). See
:func:`device_state_dir`. Only a node with neither keeps it in
``Context.state["velocity"]`` (which travels with every message in
simulation), tagged with the server's ``client-state-dir`` name
(``Context.state["velocity-run"]``): a node that serves several runs in one
engine (``sims.compare``) never carries one run's velocity into another.

The node config is checked before anything runs (:func:`node_identity`):
unknown keys, a ``partition-id`` that is not an integer in range, a
``data-dir`` that does not exist are errors naming the key and the value.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedneq._validate import did_you_mean
from fedneq.config import Config
from fedneq.federation.client import (
    client_evaluate,
    client_round,
    load_client_state,
    model_layout,
    save_client_state,
)
from fedneq.federation.device_data import (
    PartitionFile,
    check_partition_file,
    partition_file_identity,
    read_partition_file,
)
from fedneq.federation.devices import NODE_DEVICE_KEYS, DeviceProfile, profile_from_node_config
from fedneq.federation.protocol import (
    ARRAYS_RECORD,
    ATTEMPT_KEY,
    CONFIG_KEY,
    CONFIG_RECORD,
    DATA_FINGERPRINT_KEY,
    DATA_PARTITION_KEY,
    DEVICE_KEY,
    ELEMENT_KEY,
    FULL_BUDGET_KEY,
    INFO_RECORD,
    SERVER_ROUND_KEY,
    STATE_DIR_KEY,
    STATE_RUN_KEY,
    WIDTH_KEY,
    WIDTH_OPTIONS_KEY,
)
from fedneq.federation.wire import to_array_record, unpack_model

__all__ = [
    "app",
    "NODE_CONFIG_KEYS",
    "NO_DYNAMO_ENV",
    "device_partition",
    "device_state_dir",
    "node_identity",
    "skip_torch_dynamo",
]

NO_DYNAMO_ENV = "FEDNEQ_NO_DYNAMO"  # "1": a small device's ClientApp process skips torch._dynamo


def skip_torch_dynamo() -> bool:
    """Stand a no-op ``torch._dynamo`` in for the real one, in this process; True if it did.

    ``torch.optim`` imports ``torch._dynamo`` (~70 MB of resident memory with
    the CPU wheel) on an optimizer's first step, only to call
    ``graph_break()`` and ``disable(fn)``, which do nothing outside
    ``torch.compile``. fedneq never compiles, so on a device short of memory
    (``FEDNEQ_NO_DYNAMO=1`` in the SuperNode's environment, docs/DEPLOY.md)
    the ClientApp process uses a stub with those two functions instead.
    ``torch.compile`` is then unavailable in that process. torchvision (for
    MobileNetV2 and ResNet18) imports ``torch._dynamo.utils.is_compile_supported``
    (for ``roi_align``, which fedneq never calls): the stub's ``utils`` answers
    False, compile is not supported. Does nothing if ``torch._dynamo`` is
    already imported.
    """
    import sys
    import types

    import torch

    if "torch._dynamo" in sys.modules:
        return False
    stub = types.ModuleType("torch._dynamo")
    stub.graph_break = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    stub.disable = lambda fn=None, recursive=True, **kwargs: (  # type: ignore[attr-defined]
        fn if fn is not None else (lambda f: f)
    )
    stub.is_compiling = lambda: False  # type: ignore[attr-defined]
    utils = types.ModuleType("torch._dynamo.utils")
    utils.is_compile_supported = lambda device_type: False  # type: ignore[attr-defined]
    stub.utils = utils  # type: ignore[attr-defined]
    sys.modules["torch._dynamo"] = stub
    sys.modules["torch._dynamo.utils"] = utils
    torch._dynamo = stub  # type: ignore[attr-defined]
    return True


if os.environ.get(NO_DYNAMO_ENV) == "1":
    skip_torch_dynamo()

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _parse(config_json: str) -> Config:
    return Config.from_json(config_json)


NODE_CONFIG_KEYS = (
    "partition-id", "num-partitions", "device", "budget", "data-dir", "data-file", "state-dir",
    *NODE_DEVICE_KEYS,
)  # fmt: skip


def _node_int(node_config: Mapping[str, object], key: str) -> int:
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"node config {key}={value!r} ({type(value).__name__}) must be an integer, "
            f'e.g. --node-config "{key}=0" (no quotes around the number)'
        )
    return value


def _node_path(node_config: Mapping[str, object], key: str, *, must_exist: bool) -> Path | None:
    if key not in node_config:
        return None
    value = node_config[key]
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"node config {key}={value!r} must be a non-empty path in quotes, e.g. {key}='/home/pi/data'"
        )
    path = Path(value).expanduser()
    if must_exist and not path.exists():
        raise ValueError(f"node config {key}={value!r}: no such file or folder on this device")
    return path


def node_identity(
    node_config: Mapping[str, object], config: Config
) -> tuple[Config, int, DeviceProfile]:
    """(config adapted to this node, partition id, device profile) of a node.

    Raises ``ValueError`` naming the key, the bad value and what is allowed.
    """
    missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
    if missing:
        raise ValueError(
            f"node config is missing {missing}: start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n> [device=<class>|budget=<b>] '
            f'[data-dir=<path>]"; got keys {sorted(node_config)}'
        )
    unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"unknown node config key(s) {unknown}; known: {list(NODE_CONFIG_KEYS)}"
            + did_you_mean(unknown[0], NODE_CONFIG_KEYS)
        )
    partition_id = _node_int(node_config, "partition-id")
    num_partitions = _node_int(node_config, "num-partitions")
    if num_partitions != config.run.num_clients:
        raise ValueError(
            f"node config num-partitions={num_partitions} differs from the run's "
            f"[run] num_clients={config.run.num_clients}"
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"node config partition-id={partition_id} must be in [0, {num_partitions - 1}] "
            f"(num-partitions={num_partitions})"
        )
    data_dir = _node_path(node_config, "data-dir", must_exist=True)
    if data_dir is not None:
        config = config.replace(data={"root": str(data_dir)})
    _node_path(node_config, "state-dir", must_exist=False)
    _node_path(node_config, "data-file", must_exist=True)
    device = profile_from_node_config(node_config, config.fleet.fleet(), config.run.seed)
    return config, partition_id, device


def device_partition(
    node_config: Mapping[str, object], config: Config, partition_id: int
) -> PartitionFile | None:
    """The node's own partition file (``data-file``), checked against the run; None if none."""
    path = _node_path(node_config, "data-file", must_exist=True)
    if path is None:
        return None
    local = read_partition_file(path)
    check_partition_file(local, config, partition_id, path)
    return local


def device_state_dir(
    node_config: Mapping[str, object], server_config: Mapping[str, object]
) -> Path | None:
    """Where this node keeps its velocity state across a restart, or None.

    The node's own ``state-dir`` (created if missing) when its node config
    names one: the state then lives on the device only, and the folder the
    server names is ignored. Otherwise the server's ``client-state-dir`` if it
    exists on this machine (simulation, single-host deployment).
    """
    own = _node_path(node_config, "state-dir", must_exist=False)
    if own is not None:
        own.mkdir(parents=True, exist_ok=True)
        return own
    named = str(server_config.get(STATE_DIR_KEY, ""))
    return Path(named) if named and Path(named).is_dir() else None


def _config(msg: Message) -> Config:
    try:
        return _parse(str(msg.content[CONFIG_RECORD][CONFIG_KEY]))
    except KeyError as err:
        raise ValueError(
            f"message carries no '{CONFIG_KEY}' in its config record: was it sent by the "
            "fedneq ServerApp?"
        ) from err


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server who this node is: partition id, device class and its data-file's identity.

    The data-file's partition and split fingerprint (read from its header;
    ``-1`` / ``""`` without one) let the server refuse a file cut for another
    run or partition before the first round (:func:`sims.server.discovery.identify`).
    """
    config, partition_id, device = node_identity(context.node_config, _config(msg))
    path = _node_path(context.node_config, "data-file", must_exist=True)
    data_partition, fingerprint = partition_file_identity(path) if path is not None else (-1, "")
    content = RecordDict(
        {
            "metrics": MetricRecord({"partition-id": partition_id}),
            INFO_RECORD: ConfigRecord({
                DEVICE_KEY: device.name,
                DATA_PARTITION_KEY: data_partition,
                DATA_FINGERPRINT_KEY: fingerprint,
            }),
        }
    )  # fmt: skip
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, partition_id, device = node_identity(context.node_config, _config(msg))
    server_config = msg.content[CONFIG_RECORD]
    server_round = int(server_config[SERVER_ROUND_KEY])
    local = device_partition(context.node_config, config, partition_id)
    global_state = unpack_model(msg.content[ARRAYS_RECORD], model_layout(config, local))
    state_dir = device_state_dir(context.node_config, server_config)
    named = str(server_config.get(STATE_DIR_KEY, ""))  # the run the kept velocity belongs to
    velocity_state = None
    if state_dir is not None:  # the store holds it (fedneq.federation.state_store)
        saved = load_client_state(state_dir, partition_id, server_round)
        velocity_state = saved[1] if saved else None
    else:
        kept = context.state.get("velocity")
        owner = context.state.get(STATE_RUN_KEY)
        same_run = isinstance(owner, ConfigRecord) and owner.get("dir", "") == named
        if same_run and isinstance(kept, ArrayRecord) and kept:
            velocity_state = kept.to_torch_state_dict()
    reply = client_round(
        config,
        partition_id,
        server_round,
        global_state,
        velocity_state,
        device=device,
        full_budget=bool(server_config.get(FULL_BUDGET_KEY, False)),
        attempt=int(server_config.get(ATTEMPT_KEY, 0)),
        local=local,
        width=str(server_config.get(WIDTH_KEY, "")),
        element=str(server_config.get(ELEMENT_KEY, "")),
        width_options=str(server_config.get(WIDTH_OPTIONS_KEY, "")),
    )
    content = RecordDict(
        {
            ARRAYS_RECORD: to_array_record(reply.arrays),
            "metrics": MetricRecord(reply.metrics),
            INFO_RECORD: ConfigRecord({DEVICE_KEY: reply.device}),
        }
    )
    if state_dir is None:  # no store: Context.state keeps it (it travels with every message)
        context.state["velocity"] = ArrayRecord(reply.velocity_state)
        context.state[STATE_RUN_KEY] = ConfigRecord({"dir": named})
    elif reply.velocity_state:  # last: only a round that replies keeps it
        save_client_state(state_dir, partition_id, server_round, reply.velocity_state)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on the client's local test split."""
    config, partition_id, _ = node_identity(context.node_config, _config(msg))
    local = device_partition(context.node_config, config, partition_id)
    global_state = unpack_model(msg.content[ARRAYS_RECORD], model_layout(config, local))
    metrics = client_evaluate(config, partition_id, global_state, local)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
