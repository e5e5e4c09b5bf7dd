"""The Flower ClientApp: thin glue around :func:`fedneq.client.client_round`.

The run configuration arrives with every message (``config["fedneq-config"]``,
JSON written by the server), so the same ClientApp runs under Flower's
simulation engine, under ``flwr run`` and on a real SuperNode. Which client it
is comes from the node config: ``partition-id`` / ``num-partitions`` (all that
simulation provides), plus on a real SuperNode optionally ``device`` (a fleet
class) or ``budget``, and ``data-dir`` (the dataset root on that device).

The velocity state a client keeps between its participations lives in
``Context.state["velocity"]``; it travels with every message in simulation, so
it is kept small (pooled mode, float16 probe outputs by default). When the
training config names a ``client-state-dir`` that exists on this machine
(simulation, single-host deployment), the state is also written there after
every participation, and read back from there when ``Context.state`` is empty
(a simulation resumed with fresh nodes): see :func:`fedneq.client.save_client_state`.
A folder that does not exist here (a real device) is ignored. The kept state
is tagged with that folder's name (``Context.state["velocity-run"]``): a node
that serves several runs in one engine (``sims.compare``) never carries one
run's velocity into another.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedneq.client import client_evaluate, client_round, load_client_state, save_client_state
from fedneq.config import Config
from fedneq.devices import DeviceProfile, profile_from_node_config
from fedneq.wire import to_array_record

__all__ = ["app", "ATTEMPT_KEY", "CONFIG_KEY", "STATE_DIR_KEY", "node_identity"]

CONFIG_KEY = "fedneq-config"
ATTEMPT_KEY = "attempt"  # the server's try at this round, 0 first (seeds fault injection)
STATE_DIR_KEY = "client-state-dir"  # where to keep velocity state across a server restart
STATE_RUN_KEY = "velocity-run"  # Context.state: the STATE_DIR_KEY the kept velocity belongs to

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _parse(config_json: str) -> Config:
    return Config.from_json(config_json)


def node_identity(
    node_config: Mapping[str, object], config: Config
) -> tuple[Config, int, DeviceProfile]:
    """(config adapted to this node, partition id, device profile) of a node."""
    missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
    if missing:
        raise ValueError(
            f"node config is missing {missing}: start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n> [device=<class>|budget=<b>] '
            f'[data-dir=<path>]"; got keys {sorted(node_config)}'
        )
    partition_id = int(node_config["partition-id"])  # type: ignore[arg-type]
    num_partitions = int(node_config["num-partitions"])  # type: ignore[arg-type]
    if num_partitions != config.run.num_clients:
        raise ValueError(
            f"node config num-partitions={num_partitions} differs from the run's "
            f"[run] num_clients={config.run.num_clients}"
        )
    if "data-dir" in node_config:
        config = config.replace(data={"root": str(node_config["data-dir"])})
    device = profile_from_node_config(node_config, config.fleet.fleet(), config.run.seed)
    return config, partition_id, device


def _config(msg: Message) -> Config:
    try:
        return _parse(str(msg.content["config"][CONFIG_KEY]))
    except KeyError as err:
        raise ValueError(
            f"message carries no '{CONFIG_KEY}' in its config record: was it sent by the "
            "fedneq ServerApp?"
        ) from err


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server who this node is (partition id and device class)."""
    config, partition_id, device = node_identity(context.node_config, _config(msg))
    content = RecordDict(
        {
            "metrics": MetricRecord({"partition-id": partition_id}),
            "info": ConfigRecord({"device": device.name}),
        }
    )
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, partition_id, device = node_identity(context.node_config, _config(msg))
    server_config = msg.content["config"]
    server_round = int(server_config["server-round"])
    global_state = msg.content["arrays"].to_torch_state_dict()
    named = str(server_config.get(STATE_DIR_KEY, ""))
    state_dir = Path(named) if named and Path(named).is_dir() else None
    kept = context.state.get("velocity")
    owner = context.state.get(STATE_RUN_KEY)
    same_run = isinstance(owner, ConfigRecord) and owner.get("dir", "") == named
    velocity_state = (
        kept.to_torch_state_dict() if same_run and isinstance(kept, ArrayRecord) and kept else None
    )
    if velocity_state is None and state_dir is not None:
        saved = load_client_state(state_dir, partition_id, server_round)
        velocity_state = saved[1] if saved else None
    reply = client_round(
        config,
        partition_id,
        server_round,
        global_state,
        velocity_state,
        device=device,
        full_budget=bool(server_config.get("full-budget", False)),
        attempt=int(server_config.get(ATTEMPT_KEY, 0)),
    )
    content = RecordDict(
        {
            "arrays": to_array_record(reply.arrays),
            "metrics": MetricRecord(reply.metrics),
            "info": ConfigRecord({"device": reply.device}),
        }
    )
    context.state["velocity"] = ArrayRecord(reply.velocity_state)
    context.state[STATE_RUN_KEY] = ConfigRecord({"dir": named})
    if state_dir is not None and reply.velocity_state:  # last: only a round that replies keeps it
        save_client_state(state_dir, partition_id, server_round, reply.velocity_state)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on the client's local test split."""
    config, partition_id, _ = node_identity(context.node_config, _config(msg))
    metrics = client_evaluate(config, partition_id, msg.content["arrays"].to_torch_state_dict())
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
