"""The client's round: budget respected, untrained neurons untouched, velocity kept in Context.state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedneq.config import Config
from fedneq.federation.client import client_evaluate, client_round
from fedneq.federation.client_app import app, node_identity
from fedneq.federation.protocol import CONFIG_KEY
from fedneq.federation.wire import (
    WireFormatError,
    decode,
    pack_model,
    tensor_table,
    unpack_model,
)
from fedneq.selection import Budget
from fedneq.task import build_model, load_task
from strategies.neuron_avg import neuron_average


def tiny_config(**run) -> Config:
    return Config().replace(
        run={"num_clients": 4, "clients_per_round": 4, "rounds": 2, **run},
        data={"dataset": "digits", "classes": "all", "partition": "iid", "probe_size": 8},
        fleet={"local_epochs": 2, "batch_size": 32},
    )


pytestmark = pytest.mark.usefixtures("task_identity")


def global_model(config: Config):
    task = load_task(config)
    torch.manual_seed(0)
    model, nmap = build_model(config, task)
    return {k: v.clone() for k, v in model.state_dict().items()}, nmap


@pytest.mark.parametrize("partition_id", [0, 1, 2, 3])
def test_client_respects_its_budget_and_leaves_untrained_neurons_alone(partition_id: int) -> None:
    config = tiny_config()
    state, nmap = global_model(config)
    reply = client_round(config, partition_id, 1, state, None)
    device = config.device(partition_id)
    budget = Budget.parse(device.budget).resolve(nmap.selectable_params)
    head = sum(state[k].numel() for k in nmap.always_trained)
    assert reply.device == device.name
    assert reply.metrics["trainable-params"] - head <= budget
    assert reply.metrics["used-initializer"] == 1  # no velocity at first participation

    update = decode(reply.arrays, nmap, tensor_table(state), state)
    new = neuron_average(state, [update], [float(reply.metrics["num-examples"])])
    sent = torch.zeros(nmap.num_neurons, dtype=torch.bool)
    sent[torch.as_tensor(reply.arrays["neurons"], dtype=torch.long)] = True
    changed = 0
    for layer in nmap.layers:
        for key in layer.tensors:
            rows_sent = sent[layer.slice]
            assert torch.equal(new[key][~rows_sent], state[key][~rows_sent]), key
            changed += int((new[key][rows_sent] != state[key][rows_sent]).any())
    assert changed > 0, "the client's selected neurons did not train"
    for key in nmap.always_trained:
        assert not torch.equal(new[key], state[key])


def test_budget_bytes_scale_with_the_device_class() -> None:
    config = tiny_config()
    state, _ = global_model(config)
    by_device = {}
    for pid in range(4):
        reply = client_round(config, pid, 1, state, None)
        by_device.setdefault(reply.device, []).append(reply.metrics["upload-bytes"])
    budgets = {d.name: d.budget for d, _ in config.fleet.fleet().classes}
    ordered = sorted(by_device, key=lambda name: budgets[name])
    means = [sum(by_device[d]) / len(by_device[d]) for d in ordered]
    assert means == sorted(means) and means[0] < means[-1]


def _train_message(config: Config, state, server_round: int) -> Message:
    content = RecordDict(
        {
            "arrays": pack_model(state),
            "config": ConfigRecord({CONFIG_KEY: config.to_json(), "server-round": server_round}),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


def test_context_state_carries_velocity_across_rounds() -> None:
    config = tiny_config()
    state, _ = global_model(config)
    context = Context(1, 1, {"partition-id": 2, "num-partitions": 4}, RecordDict(), {})
    first = app(_train_message(config, state, 1), context)
    assert first.content["metrics"]["used-initializer"] == 1
    kept = context.state["velocity"]
    assert isinstance(kept, ArrayRecord) and len(kept) > 0
    kept_bytes = sum(a.numpy().nbytes for a in kept.values())
    assert first.content["metrics"]["state-bytes"] == kept_bytes
    second = app(_train_message(config, state, 2), context)
    assert second.content["metrics"]["used-initializer"] == 0  # velocity, not the initializer
    fresh = Context(1, 1, {"partition-id": 2, "num-partitions": 4}, RecordDict(), {})
    assert app(_train_message(config, state, 2), fresh).content["metrics"]["used-initializer"] == 1


def test_a_global_model_of_another_shape_is_refused_by_name() -> None:
    config = tiny_config()
    state, _ = global_model(config)
    key = next(k for k in state if k.endswith(".weight"))
    wrong = dict(state, **{key: torch.zeros(3, *state[key].shape[1:])})  # another width
    context = Context(1, 1, {"partition-id": 0, "num-partitions": 4}, RecordDict(), {})
    with pytest.raises(WireFormatError, match=f"'{key}' is float32 of shape \\(3,"):
        app(_train_message(config, wrong, 1), context)
    per_tensor = Message(
        RecordDict({"arrays": ArrayRecord(state), "config": _train_message(config, state, 1).content["config"]}),
        dst_node_id=1, message_type="train",
    )  # fmt: skip
    with pytest.raises(WireFormatError, match="not a packed model"):
        app(per_tensor, context)


def test_evaluate_message_scores_the_packed_global_model() -> None:
    config = tiny_config()
    state, _ = global_model(config)
    content = RecordDict(
        {"arrays": pack_model(state), "config": _train_message(config, state, 1).content["config"]}
    )
    msg = Message(content, dst_node_id=1, message_type="evaluate")
    context = Context(1, 1, {"partition-id": 1, "num-partitions": 4}, RecordDict(), {})
    metrics = app(msg, context).content["metrics"]
    assert dict(metrics) == client_evaluate(config, 1, state)
    assert metrics["num-examples"] > 0


def test_query_reports_partition_and_device() -> None:
    config = tiny_config()
    msg = Message(RecordDict({"config": ConfigRecord({CONFIG_KEY: config.to_json()})}), dst_node_id=1,
                  message_type="query")  # fmt: skip
    context = Context(1, 1, {"partition-id": 3, "num-partitions": 4}, RecordDict(), {})
    reply = app(msg, context)
    assert reply.content["metrics"]["partition-id"] == 3
    assert reply.content["info"]["device"] == config.device(3).name


def test_node_identity_errors_name_the_problem(tmp_path: Path) -> None:
    config = tiny_config()
    with pytest.raises(ValueError, match=r"missing \['partition-id'\]"):
        node_identity({"num-partitions": 4}, config)
    with pytest.raises(ValueError, match="num-partitions=5 differs"):
        node_identity({"partition-id": 0, "num-partitions": 5}, config)
    _, pid, device = node_identity({"partition-id": 1, "num-partitions": 4, "budget": "0.5"}, config)
    assert pid == 1 and device.budget == 0.5
    changed, _, _ = node_identity({"partition-id": 1, "num-partitions": 4, "data-dir": str(tmp_path)}, config)
    assert changed.data.root == str(tmp_path)
    with pytest.raises(ValueError, match="data-dir='/no/data': no such file or folder on this device"):
        node_identity({"partition-id": 1, "num-partitions": 4, "data-dir": "/no/data"}, config)


def test_a_device_with_gradient_filtering_trains_through_the_filter() -> None:
    fleet = {"preset": "custom", "classes": [
        {"name": "filtered", "share": 0.5, "budget": 0.5, "grad_filter_r": 2},
        {"name": "exact", "share": 0.5, "budget": 0.5},
    ], "local_epochs": 1}  # fmt: skip
    base = tiny_config()
    config = base.replace(fleet=fleet, train={"grad_filter_last_k": 1, "grad_filter_fallback": "off"}, data={"image_size": 16})
    state, _ = global_model(config)
    by_device = {}
    for pid in range(4):
        by_device.setdefault(config.device(pid).name, pid)
    filtered = client_round(config, by_device["filtered"], 1, state, None)
    # the same client without the filter: same data, mask and batches, different gradients
    exact_cfg = config.replace(train={"grad_filter_last_k": 0}, fleet={**fleet, "classes": [
        {"name": "filtered", "share": 0.5, "budget": 0.5},
        {"name": "exact", "share": 0.5, "budget": 0.5},
    ]})  # fmt: skip
    exact = client_round(exact_cfg, by_device["filtered"], 1, state, None)
    assert (filtered.arrays["neurons"] == exact.arrays["neurons"]).all()
    assert not (filtered.arrays["neuron_values"] == exact.arrays["neuron_values"]).all()
    with pytest.raises(ValueError, match="grad_filter_last_k"):
        base.replace(fleet=fleet)


def test_a_device_memory_limit_bounds_its_training_memory() -> None:
    config = tiny_config()
    state, nmap = global_model(config)
    free = client_round(config, 0, 1, state, None)
    device = config.device(0)
    limit = int(free.metrics["memory-estimate-bytes"] * 0.995)  # just below what it used
    tight = config.replace(fleet={"preset": "custom", "local_epochs": 2, "batch_size": 32, "classes": [
        {"name": device.name, "share": 1.0, "budget": device.budget, "memory_limit_bytes": limit},
    ]})  # fmt: skip
    reply = client_round(tight, 0, 1, state, None)
    assert reply.metrics["memory-estimate-bytes"] <= limit < free.metrics["memory-estimate-bytes"]
    assert reply.metrics["trainable-params"] <= free.metrics["trainable-params"]


def test_bn_stats_all_uploads_statistics_the_server_accepts_and_averages(task_identity) -> None:
    from flwr.app import MetricRecord
    from helpers import LocalGrid

    from fedneq.federation.wire import to_array_record
    from sims.server.knowledge import free_tensors
    from strategies import get_strategy

    config = tiny_config().replace(train={"bn_stats": "all"})
    state, nmap = global_model(config)
    reply = client_round(config, 0, 1, state, None)
    plain = client_round(tiny_config(), 0, 1, state, None)
    stats = nmap.statistic_tensors()
    table = tensor_table(state)
    sent = {table[i] for i in reply.arrays["tensors"].tolist()}
    assert stats <= sent and not stats & {table[i] for i in plain.arrays["tensors"].tolist()}
    # the whole-tensor part grows by exactly the statistics (4 bytes a value, 4 an index)
    extra = sum(state[k].numel() * 4 + 4 for k in stats)
    whole = lambda a: a["tensors"].nbytes + a["tensor_values"].nbytes  # noqa: E731
    assert whole(reply.arrays) == whole(plain.arrays) + extra

    strategy = get_strategy("neuron-avg", neuron_map=nmap, table=table, reference_state=state,
                            min_available_nodes=1, min_train_nodes=1)  # fmt: skip
    (msg,) = strategy.configure_train(1, pack_model(state), ConfigRecord(), LocalGrid([5]))
    content = RecordDict({"arrays": to_array_record(reply.arrays), "metrics": MetricRecord(reply.metrics)})
    arrays, _ = strategy.aggregate_train(1, [Message(content, reply_to=msg)])
    # statistics sent whole without their neurons: only a run with bn_stats = "all" allows it
    assert "running statistic" in strategy.last_rejected[5]
    strategy.set_server_inputs(free_tensors=free_tensors(config, nmap))  # what this run's server sets
    arrays, _ = strategy.aggregate_train(1, [Message(content, reply_to=msg)])
    assert not strategy.last_rejected
    new = unpack_model(arrays)
    update = decode(reply.arrays, nmap, table, state)
    for key in stats:
        assert torch.equal(new[key], update.values[key]) and not torch.equal(new[key], state[key])
