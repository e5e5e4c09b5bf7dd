"""Update validation: a bad reply is rejected with a reason, the good ones are still aggregated.

Every case is a raw Flower reply (``Message(content, reply_to=train_msg)``)
from one bad client next to two good ones. The bad client sends neurons no
good client sends, with values far off; after the round those neurons must
still hold their global values, and the new global model must be finite and
bit-identical to aggregating the good replies alone.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from helpers import LocalGrid
from safetensors.torch import load as st_load
from tiny_sim import tiny_config

from fedneq.config import Config
from fedneq.federation.client import client_round
from fedneq.federation.client_app import app
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.wire import (
    decode,
    encode,
    pack_model,
    tensor_table,
    to_array_record,
    unpack_model,
)
from fedneq.models import get_model, model_head
from fedneq.neurons import NeuronMap, enumerate_neurons
from fedneq.task import build_model, client_data, load_task
from sims.server.knowledge import (
    budget_limits,
    server_knowledge,
    set_round_inputs,
    set_run_inputs,
    set_server_knowledge,
)
from sims.server.results import read_csv
from sims.server.round_loop import run_federation
from strategies import get_strategy
from strategies.base import SparseStrategy
from strategies.budget import BudgetLimit, trained_params
from strategies.fedavg import DenseFedAvg
from strategies.metrics import aggregate_metrics
from strategies.neuron_avg import NeuronAvg
from strategies.robust import clip_factors, oversized_updates, update_rms

GOOD_NODES, BAD_NODE = (1, 2), 3


pytestmark = pytest.mark.usefixtures("task_identity")


class Model:
    """fedneq's small-cnn (digits: 1 channel, 10 classes) and its neuron map.

    Layers: features.0.0 (neurons 0-15, cost 11), features.1.0 (16-47, cost
    146), features.2.0 (48-111, cost 290); head always trained.
    """

    def __init__(self, never_trained: tuple[str, ...] = ()) -> None:
        model = get_model("small-cnn", num_classes=10, in_channels=1, seed=0)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.nm: NeuronMap = enumerate_neurons(
            model, always_trained=(model_head("small-cnn"),), never_trained=never_trained
        )
        self.table = tensor_table(self.state)

    def mask(self, ids: list[int]):
        neurons = torch.zeros(self.nm.num_neurons, dtype=torch.bool)
        neurons[ids] = True
        return self.nm.train_mask(neurons)

    def trained(self, shift: float) -> dict[str, torch.Tensor]:
        return {k: v + shift if k in self.table else v.clone() for k, v in self.state.items()}

    def cost(self, ids: list[int]) -> int:
        return int(self.nm.costs()[ids].sum())


@pytest.fixture(scope="module")
def m() -> Model:
    return Model()


GOOD_IDS = ([0, 1, 16, 48], [1, 2, 17, 49])  # the two good clients overlap on neuron 1
BAD_IDS = [5, 20, 60, 61]  # neurons only the bad client sends


def strategy_for(m: Model, cls: type[SparseStrategy] = NeuronAvg, **options) -> SparseStrategy:
    strategy = cls(m.nm, m.table, min_train_nodes=1, min_available_nodes=1, **options)
    strategy.set_server_inputs(sample=lambda _grid, _round: [*GOOD_NODES, BAD_NODE])
    return strategy


def train_messages(strategy: SparseStrategy, m: Model) -> dict[int, Message]:
    """The real train messages of round 1, by destination node."""
    messages = strategy.configure_train(1, pack_model(m.state), ConfigRecord(), grid=None)
    return {msg.metadata.dst_node_id: msg for msg in messages}


def metrics_for(m: Model, ids: list[int], num_examples: int, **extra) -> dict:
    return {"num-examples": num_examples, "train-loss": 0.5, "budget-params": m.cost(ids),
            "local-epochs": 1} | extra  # fmt: skip


def reply(
    to: Message,
    arrays: dict[str, np.ndarray] | ArrayRecord | None,
    metrics: dict | None,
    device: str | None = None,
) -> Message:
    records = {}
    if device is not None:
        records["info"] = ConfigRecord({"device": device})
    if arrays is not None:
        records["arrays"] = arrays if isinstance(arrays, ArrayRecord) else to_array_record(arrays)
    if metrics is not None:
        records["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(records), reply_to=to)


def good_replies(m: Model, msgs: dict[int, Message]) -> list[Message]:
    return [
        reply(msgs[node], encode(m.trained(0.1 * (i + 1)), m.nm, m.mask(ids), m.table), metrics_for(m, ids, 10 * (i + 1)))
        for i, (node, ids) in enumerate(zip(GOOD_NODES, GOOD_IDS, strict=True))
    ]  # fmt: skip


def bad_parts(m: Model) -> tuple[dict[str, np.ndarray], dict]:
    return encode(m.trained(100.0), m.nm, m.mask(BAD_IDS), m.table), metrics_for(
        m, BAD_IDS, 1000, **{"train-loss": 1e6}
    )


def good_only(m: Model) -> dict[str, torch.Tensor]:
    strategy = strategy_for(m)
    msgs = train_messages(strategy, m)
    arrays, _ = strategy.aggregate_train(1, good_replies(m, msgs))
    return unpack_model(arrays)


def run_round(
    m: Model, bad: Message | Callable[[Message], Message], strategy: SparseStrategy | None = None
):
    strategy = strategy or strategy_for(m)
    msgs = train_messages(strategy, m)
    bad_msg = bad(msgs[BAD_NODE]) if callable(bad) else bad
    arrays, metrics = strategy.aggregate_train(1, [*good_replies(m, msgs), bad_msg])
    return strategy, unpack_model(arrays), metrics


def assert_only_the_good_aggregated(
    m: Model, strategy: SparseStrategy, got: dict[str, torch.Tensor], reason: str
) -> None:
    ((node, why),) = strategy.last_rejected.items()
    assert node == BAD_NODE and reason in why, why
    assert strategy.summaries[-1].num_results == 2
    expected = good_only(m)
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), key
    only_bad = torch.zeros(m.nm.num_neurons, dtype=torch.bool)
    only_bad[BAD_IDS] = True
    for layer in m.nm.layers:
        rows = only_bad[layer.slice]
        for key in layer.tensors:
            assert torch.equal(got[key][rows], m.state[key][rows]), key


# --- malformed wire arrays ---------------------------------------------------------


def _set(key: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def mutate(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = fn(arrays[key].copy())

    return mutate


def _poke(key: str, index: int, value) -> Callable[[dict], None]:
    def fn(a: np.ndarray) -> np.ndarray:
        a[index] = value
        return a

    return _set(key, fn)


WIRE_CASES = {
    "nan value": (_poke("neuron_values", 3, np.nan), "non-finite"),
    "inf in a whole tensor": (_poke("tensor_values", 0, np.inf), "non-finite"),
    "float64 values": (_set("neuron_values", lambda a: a.astype(np.float64)), "must have dtype float32"),
    "int64 indices": (_set("neurons", lambda a: a.astype(np.int64)), "must have dtype int32"),
    "2-D rows": (_set("neuron_values", lambda a: a.reshape(1, -1)), "must be 1-D"),
    "row shape short by one": (_set("neuron_values", lambda a: a[:-1]), "has 744 values, expected 745"),
    "neuron past the last layer": (_poke("neurons", -1, 112), "allowed range is [0, 112)"),
    "negative neuron": (_poke("neurons", 0, -1), "allowed range is [0, 112)"),
    "duplicated neuron": (_poke("neurons", 1, 5), "duplicated"),
    "unsorted neurons": (_set("neurons", lambda a: a[::-1].copy()), "not sorted ascending"),
    "tensor outside the table": (_set("tensors", lambda a: np.append(a, np.int32(17)).astype(np.int32)), "allowed range is [0, 17)"),
    "missing key": (lambda a: a.pop("tensors"), "missing ['tensors']"),
    "extra key": (lambda a: a.update(extra=np.zeros(1, np.float32)), "extra ['extra']"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WIRE_CASES))
def test_malformed_wire_arrays_are_rejected(m: Model, case: str) -> None:
    mutate, reason = WIRE_CASES[case]
    arrays, metrics = bad_parts(m)
    mutate(arrays)
    strategy, got, agg = run_round(m, lambda to: reply(to, arrays, metrics))
    assert_only_the_good_aggregated(m, strategy, got, reason)
    assert agg["train-loss"] == 0.5  # the bad reply's metrics are not averaged in


# --- bad metrics and records ---------------------------------------------------------


def _metric(key: str, value) -> Callable[[dict], None]:
    return lambda metrics: metrics.update({key: value}) if value is not None else metrics.pop(key)


METRIC_CASES = {
    "zero examples": (_metric("num-examples", 0), "'num-examples' must be an integer >= 1"),
    "negative examples": (_metric("num-examples", -5), "'num-examples' must be an integer >= 1"),
    "fractional examples": (_metric("num-examples", 2.5), "'num-examples' must be an integer >= 1"),
    "missing examples": (_metric("num-examples", None), "missing metric 'num-examples'"),
    "nan loss": (_metric("train-loss", float("nan")), "metric 'train-loss' is not finite"),
    "inf in a list metric": (_metric("per-epoch", [0.1, float("inf")]), "metric 'per-epoch' is not finite"),
    "missing budget": (_metric("budget-params", None), "missing metric 'budget-params'"),
    "fractional budget": (_metric("budget-params", 2000.0), "'budget-params' must be an integer in [1, 23408]"),
    "budget above the model": (_metric("budget-params", 23409), "'budget-params' must be an integer in [1, 23408]"),
    "zero epochs": (_metric("local-epochs", 0), "'local-epochs' must be an integer >= 1"),
    # BAD_IDS cost 11 + 146 + 290 + 290 = 737 parameters
    "one parameter over budget": (_metric("budget-params", 736), "trains 737 selectable parameters"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(METRIC_CASES))
def test_bad_metrics_are_rejected(m: Model, case: str) -> None:
    mutate, reason = METRIC_CASES[case]
    arrays, metrics = bad_parts(m)
    mutate(metrics)
    strategy, got, agg = run_round(m, lambda to: reply(to, arrays, metrics))
    assert_only_the_good_aggregated(m, strategy, got, reason)
    assert agg["train-loss"] == 0.5


def _raw(data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype="int32", shape=(4,), stype=stype, data=data)


def test_missing_extra_and_unreadable_records_are_rejected(m: Model) -> None:
    arrays, metrics = bad_parts(m)
    pickled = np.empty(4, dtype=object)
    cases = {
        "no arrays": (lambda to: reply(to, None, metrics), "got 0 and 1"),
        "no metrics": (lambda to: reply(to, arrays, None), "got 1 and 0"),
        "two metric records": (lambda to: Message(
            RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics),
                        "more": MetricRecord({"x": 1})}), reply_to=to), "got 1 and 2"),
        "raw bytes": (_with(m, "neurons", _raw(b"\0" * 16, stype="raw")), "cannot be read as numpy"),
        "truncated": (_with(m, "neurons", _raw(b"")), "EOFError"),
        "pickled objects": (_with(m, "neurons", _raw(_npy(pickled))), "cannot be read as numpy"),
    }  # fmt: skip
    for bad, reason in cases.values():
        strategy, got, _ = run_round(m, bad)
        assert_only_the_good_aggregated(m, strategy, got, reason)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


def _with(m: Model, key: str, array: Array) -> Callable[[Message], Message]:
    arrays, metrics = bad_parts(m)
    record = to_array_record(arrays)
    record[key] = array
    return lambda to: reply(to, record, metrics)


# --- budgets -------------------------------------------------------------------------


def test_trained_params_by_hand(m: Model) -> None:
    arrays = encode(m.state, m.nm, m.mask([0, 16, 48]), m.table)
    assert trained_params(arrays, m.nm, m.table, m.state) == 11 + 146 + 290  # the head is outside
    index = {k: i for i, k in enumerate(m.table)}
    whole = ["features.1.0.weight", "features.2.1.bias", "head.weight"]
    arrays["tensors"] = np.array(sorted(index[k] for k in whole), dtype=np.int32)
    # a whole tensor counts its rows whose neuron was not sent: features.1.0.weight 31 more
    # rows of 144 (neuron 16 is sent), the BatchNorm bias of features.2 63 more neurons
    # (48 is sent); the always-trained head counts 0
    assert trained_params(arrays, m.nm, m.table, m.state) == 447 + 31 * 144 + 63
    # ... unless the run trains that tensor outside the budget (a static scheme's biases)
    free = ("features.2.1.bias",)
    assert trained_params(arrays, m.nm, m.table, m.state, free) == 447 + 31 * 144
    # a running statistic travels only with its neuron (or every one, bn_stats = "all")
    arrays["tensors"] = np.array([index["features.2.1.running_mean"]], dtype=np.int32)
    with pytest.raises(ValueError, match="running statistic 'features.2.1.running_mean' whole"):
        trained_params(arrays, m.nm, m.table, m.state)
    assert trained_params(arrays, m.nm, m.table, m.state, ["features.2.1.running_mean"]) == 447


def test_a_reply_at_its_budget_is_accepted_one_over_is_not(m: Model) -> None:
    arrays, metrics = bad_parts(m)
    for budget, epochs, accepted in (
        (737, 1, True),
        (736, 1, False),
        (369, 2, True),
        (368, 2, False),
    ):
        strategy = strategy_for(m)
        msgs = train_messages(strategy, m)
        bad = reply(
            msgs[BAD_NODE], arrays, metrics | {"budget-params": budget, "local-epochs": epochs}
        )
        strategy.aggregate_train(1, [bad])
        assert (BAD_NODE not in strategy.last_rejected) == accepted, (budget, epochs)


def test_a_declared_budget_beyond_the_device_class_is_rejected(m: Model) -> None:
    arrays, metrics = bad_parts(m)  # declares exactly its 737 parameters, 1 epoch
    for limit, reason in ((BudgetLimit(736, 1), "more than its device is assigned (736 parameters"),
                          (BudgetLimit(737, 1), None)):  # fmt: skip
        strategy = strategy_for(m)
        strategy.set_server_inputs(budget_limits={BAD_NODE: limit})
        msgs = train_messages(strategy, m)
        strategy.aggregate_train(1, [reply(msgs[BAD_NODE], arrays, metrics)])
        assert (
            (reason in strategy.last_rejected[BAD_NODE]) if reason else not strategy.last_rejected
        )
    strategy = strategy_for(m)
    strategy.set_server_inputs(budget_limits={BAD_NODE: BudgetLimit(10_000, 1)})
    _, got, _ = run_round(m, lambda to: reply(to, arrays, metrics | {"local-epochs": 2}), strategy)
    assert_only_the_good_aggregated(
        m, strategy, got, "local-epochs=2, more than its device is assigned"
    )


def test_a_never_trained_tensor_sent_whole_is_rejected() -> None:
    frozen = Model(never_trained=("features.0",))  # features.0.0 / .1 are never trained
    index = {k: i for i, k in enumerate(frozen.table)}
    for key in ("features.0.0.weight", "features.0.1.running_mean"):
        arrays, metrics = (
            encode(frozen.trained(100.0), frozen.nm, frozen.mask([0]), frozen.table),
            {},
        )
        ids = sorted([index[key], *arrays["tensors"].tolist()])
        arrays["tensors"] = np.array(ids, dtype=np.int32)
        arrays["tensor_values"] = np.concatenate(
            [frozen.trained(100.0)[frozen.table[i]].flatten().numpy() for i in ids]
        )
        metrics = {"num-examples": 5, "budget-params": 1000, "local-epochs": 1}
        strategy = NeuronAvg(frozen.nm, frozen.table, reference_state=frozen.state)
        msg = Message(RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)}),
                      reply_to=train_messages(strategy_for(frozen), frozen)[BAD_NODE])  # fmt: skip
        assert strategy.aggregate_train(1, [msg]) == (None, None)
        assert (
            f"sends tensor {key!r} whole, but it is never trained"
            in strategy.last_rejected[BAD_NODE]
        )


def test_real_client_replies_pass_the_checks_the_server_applies() -> None:
    """The client's declaration and the server's count agree (velocity with 2 epochs, full budget)."""
    config = Config().replace(
        run={"num_clients": 4, "clients_per_round": 4},
        data={"dataset": "digits", "classes": "all", "partition": "iid", "probe_size": 8},
        fleet={"local_epochs": 2, "batch_size": 32},
    )
    torch.manual_seed(0)
    model, nm = build_model(config, load_task(config))
    state = model.state_dict()
    node_of = {pid: 10 + pid for pid in range(4)}
    profiles = {pid: config.device(pid) for pid in range(4)}
    examples = {pid: len(client_data(config, pid).train) for pid in range(4)}
    for cls, full in ((NeuronAvg, False), (DenseFedAvg, True)):
        strategy = cls(nm, tensor_table(state), min_train_nodes=1, min_available_nodes=1)
        set_server_knowledge(strategy, config, 1, node_of, profiles, examples)
        strategy.set_server_inputs(sample=lambda _grid, _round: list(node_of.values()))
        msgs = {
            m.metadata.dst_node_id: m
            for m in strategy.configure_train(1, pack_model(state), ConfigRecord(), None)
        }
        replies = []
        for pid, node in node_of.items():
            out = client_round(config, pid, 2, state, None, full_budget=full)
            assert out.metrics["budget-params"] == (nm.selectable_params if full else
                                                    config.device(pid).budget_params(nm.selectable_params))  # fmt: skip
            assert out.metrics["local-epochs"] == 2
            assert out.metrics["num-examples"] == examples[pid]
            replies.append(reply(msgs[node], out.arrays, out.metrics, device=out.device))
        arrays, _ = strategy.aggregate_train(1, replies)
        assert strategy.last_rejected == {} and arrays is not None, strategy.last_rejected
        assert strategy.server_inputs.budget_limits[10].params == (
            nm.selectable_params if full else replies[0].content["metrics"]["budget-params"]
        )
    # a node the operator gave its own budget is held to it
    sparse = NeuronAvg(nm, tensor_table(state))
    custom = budget_limits(config, sparse, 1, {0: 10}, {0: DeviceProfile("custom", budget=0.5)})
    assert custom == {10: BudgetLimit(nm.selectable_params // 2, 1)}


def test_equal_local_steps_real_replies_pass_fednova_and_label_split_on_what_the_server_knows() -> None:
    """Under [fleet] local_steps every client declares exactly those steps and the passes they
    took; the server counts the same from its knowledge, and its labels are the client's."""
    config = Config().replace(
        run={"num_clients": 4, "clients_per_round": 4},
        data={"dataset": "digits", "classes": "all", "partition": "dirichlet", "alpha": 0.3,
              "probe_size": 8},
        fleet={"batch_size": 16, "local_steps": 5},
    )  # fmt: skip
    torch.manual_seed(0)
    model, nm = build_model(config, load_task(config))
    state = model.state_dict()
    node_of = {pid: 10 + pid for pid in range(4)}
    knowledge = server_knowledge(config)
    strategy = get_strategy("fednova", neuron_map=nm, table=tensor_table(state), label_split=True,
                            min_train_nodes=1, min_available_nodes=1)  # fmt: skip
    set_run_inputs(strategy, config, nm)
    set_round_inputs(strategy, config, 1, list(node_of.values()), node_of, knowledge)
    assert strategy.server_inputs.head_tensors == {"head.weight", "head.bias"}
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, pack_model(state), ConfigRecord(), None)}
    replies = []
    for pid, node in node_of.items():
        data = client_data(config, pid)
        assert knowledge.labels[pid] == set(data.train.y.tolist())  # the server's labels are the client's
        out = client_round(config, pid, 1, state, None)
        per_pass = math.ceil(len(data.train) / 16)
        assert out.metrics["local-steps"] == 5 == knowledge.steps[pid]
        assert out.metrics["local-epochs"] == math.ceil(5 / per_pass)
        replies.append(reply(msgs[node], out.arrays, out.metrics, device=out.device))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_rejected == {} and arrays is not None, strategy.last_rejected
    assert {c.tensor for c in strategy.last_coverage} >= {"head.weight", "head.bias"}
    assert all(c.clients == 4 for c in strategy.last_coverage)


# --- metric aggregation ----------------------------------------------------------------


def test_metrics_with_different_keys_do_not_crash_the_round(m: Model) -> None:
    strategy = strategy_for(m)
    msgs = train_messages(strategy, m)
    replies = good_replies(m, msgs)  # num-examples 10 and 20, train-loss 0.5 each
    extra = [{"accuracy": 0.8, "per-class": [1.0, 2.0]}, {"per-class": [3.0, 4.0, 5.0], "speed": 2}]
    for msg, more in zip(replies, extra, strict=True):
        metrics = msg.content["metrics"]
        for key, value in more.items():
            metrics[key] = value
    with pytest.raises(ValueError):  # what Flower's own averaging does with these replies
        aggregate_metricrecords([r.content for r in replies], "num-examples")
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    # accuracy and speed: only one reply each; per-class: lists of different lengths -> dropped
    assert dict(metrics) == pytest.approx(
        {
            "train-loss": 0.5,
            "budget-params": 458.0,
            "local-epochs": 1.0,
            "accuracy": 0.8,
            "speed": 2.0,
        }
    )


def test_aggregate_metrics_by_hand_and_like_flower_on_equal_keys() -> None:
    first = {"n": 1, "loss": 2.0, "acc": [0.0, 1.0]}
    second = {"n": 3, "loss": 4.0, "acc": [1.0, 1.0]}
    records = [RecordDict({"m": MetricRecord(r)}) for r in (first, second | {"only": 7})]
    assert dict(aggregate_metrics(records, "n")) == {
        "loss": (2 + 12) / 4,
        "acc": [0.75, 1.0],
        "only": 7.0,
    }
    same = [RecordDict({"m": MetricRecord(r)}) for r in (first, second)]
    assert dict(aggregate_metrics(same, "n")) == dict(aggregate_metricrecords(same, "n"))


# --- the server loop with a bad client ----------------------------------------------------


@pytest.mark.slow
def test_the_server_loop_survives_a_bad_client_and_records_it(tmp_path: Path) -> None:
    """run_federation over the real ClientApp; node 100 (partition 0) corrupts every reply.

    The transport is in-process (a real SuperLink needs a deployment). Round 3
    also loses partition 2 (it raises), which puts it below min_replies=3: sent
    twice, then skipped, and the bad reply of the skipped round is still
    checked and recorded as rejected.
    """
    config = tiny_config(tmp_path, run={"num_clients": 3, "clients_per_round": 3, "min_replies": 3})
    contexts = {
        100 + pid: Context(
            1, 100 + pid, {"partition-id": pid, "num-partitions": 3}, RecordDict(), {}
        )
        for pid in range(3)
    }
    corrupt = {
        1: lambda a, m: a.update(neuron_values=np.full_like(a["neuron_values"], np.nan)),
        2: lambda a, m: m.update({"budget-params": 1}),
        3: lambda a, m: m.clear(),
    }

    def client(msg: Message) -> Message:
        node, rnd = msg.metadata.dst_node_id, msg.content["config"].get("server-round", 0)
        if node == 102 and rnd == 3:
            return Message(Error(code=0, reason="partition 2 went away"), reply_to=msg)
        out = app(msg, contexts[node])
        if node != 100 or msg.metadata.message_type != "train":
            return out
        arrays = {k: v.numpy() for k, v in out.content["arrays"].items()}
        metrics = dict(out.content["metrics"])
        corrupt[rnd](arrays, metrics)
        return reply(msg, arrays, metrics or None)

    rounds = run_federation(LocalGrid(contexts, client), config, tmp_path / "run")
    # round 3: partition 1 replied, but the round was not aggregated
    expected = [(2, 0, 1, 0), (2, 0, 1, 0), (1, 1, 1, 1)]  # replied, failed, rejected, skipped
    assert [(r["replied"], r["failed"], r["rejected"], r["skipped"]) for r in rounds] == expected
    bad = [c for c in read_csv(tmp_path / "run" / "clients.csv") if c["partition_id"] == "0"]
    assert [c["status"] for c in bad] == ["rejected"] * 3
    for row, reason in zip(
        bad, ("non-finite", "more than its declared budget", "got 1 and 0"), strict=True
    ):
        assert reason in row["reason"] and row["upload_bytes"] == "", row
    final = st_load(
        (tmp_path / "run" / "checkpoint" / "round-00003" / "global.safetensors").read_bytes()
    )
    assert all(bool(torch.isfinite(v).all()) for v in final.values() if v.is_floating_point())
    assert rounds[2]["accuracy"] == rounds[1]["accuracy"]  # skipped: the model is unchanged


# --- exploded updates ------------------------------------------------------------------


def test_an_exploded_but_well_formed_reply_is_rejected(m: Model) -> None:
    """Honest metrics and budget, finite values: only the update's size gives it away."""
    arrays, metrics = bad_parts(m)  # shifted by 100 against the good replies' 0.1 and 0.2
    strategy, got, agg = run_round(m, lambda to: reply(to, arrays, metrics))
    assert_only_the_good_aggregated(m, strategy, got, "more than max_update_ratio=10")
    assert strategy.last_update_rms == pytest.approx({1: 0.1, 2: 0.2, BAD_NODE: 100.0}, rel=1e-3)
    assert agg["train-loss"] == 0.5
    # the same reply passes with the rule off, and an absolute bound catches it alone
    lenient = strategy_for(m, max_update_ratio=None)
    lenient.aggregate_train(1, [reply(train_messages(lenient, m)[BAD_NODE], arrays, metrics)])
    assert not lenient.last_rejected
    strict = strategy_for(m, max_update_rms=50.0)
    strict.aggregate_train(1, [reply(train_messages(strict, m)[BAD_NODE], arrays, metrics)])
    assert "exceeds max_update_rms=50" in strict.last_rejected[BAD_NODE]


def test_a_large_honest_update_is_clipped_to_the_bound_not_dropped(m: Model) -> None:
    """clip_update_ratio scales a far-drifted reply's change down to the bound, keeping it."""
    metrics = metrics_for(m, BAD_IDS, 1000)
    far = encode(m.trained(1.0), m.nm, m.mask(BAD_IDS), m.table)  # RMS 1.0; others 0.1, 0.2
    clipping = strategy_for(m, clip_update_ratio=2.0)  # bound: 2 x median(0.1, 0.2) = 0.3
    strategy, got, _ = run_round(m, lambda to: reply(to, far, metrics), clipping)
    assert not strategy.last_rejected and strategy.last_clip == {BAD_NODE: pytest.approx(0.3)}
    # the same as a reply whose parameters moved by 0.3, its running statistics as sent
    params = set(strategy._size_keys)
    moved = {k: v + (0.3 if k in params else 1.0) if k in m.table else v for k, v in m.state.items()}
    plain = strategy_for(m)
    _, expected, _ = run_round(
        m, lambda to: reply(to, encode(moved, m.nm, m.mask(BAD_IDS), m.table), metrics), plain
    )
    assert not plain.last_clip
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    assert clip_factors([0.1, 0.2, 1.0], ratio=2.0) == pytest.approx([1.0, 1.0, 0.3])
    assert clip_factors([0.1, 0.2, 1.0], ratio=None) == [1.0, 1.0, 1.0]
    assert clip_factors([5.0], ratio=2.0) == [1.0]  # nothing to compare with


def test_update_size_rules_by_hand(m: Model) -> None:
    assert oversized_updates([1.0, 1.2, 0.9, 50.0], max_ratio=10, max_size=None).keys() == {3}
    assert oversized_updates([1.0, 1.2, 0.9, 9.9], max_ratio=10, max_size=None) == {}
    assert oversized_updates([1.0, 1.2, 0.9, 50.0], max_ratio=None, max_size=1.1).keys() == {1, 3}
    assert oversized_updates([1.0, 20.0], max_ratio=10, max_size=None).keys() == {1}  # 2 replies
    assert oversized_updates([1e9], max_ratio=10, max_size=None) == {}  # nothing to compare with
    assert oversized_updates([0.0, 0.0, 3.0], max_ratio=10, max_size=None) == {}  # reference 0
    # update_rms: sqrt(mean of squared changes) over the parameters sent, buffers left out
    trained = m.trained(0.0)
    trained["features.0.0.weight"][0] += 3.0  # 9 values of neuron 0 move by 3
    trained["features.0.1.running_mean"][0] += 1e6  # a statistic: not counted
    arrays = encode(trained, m.nm, m.mask([0]), m.table)
    update = decode(arrays, m.nm, m.table, m.state)
    keys = [k for layer in m.nm.layers for k in layer.param_tensors]
    # neuron 0 costs 11 parameters: 9 conv weights, BatchNorm weight and bias
    assert update_rms(update, m.state, keys) == pytest.approx(math.sqrt(9 * 3.0**2 / 11))
    with pytest.raises(ValueError, match="max_update_ratio must be a number > 0 or None"):
        NeuronAvg(m.nm, m.table, max_update_ratio=0)


# --- trust nothing a client declares ---------------------------------------------------


def test_a_huge_num_examples_is_rejected(m: Model) -> None:
    """In simulation and deployment alike the server knows each partition's size."""
    arrays, metrics = bad_parts(m)
    strategy = strategy_for(m, max_update_ratio=None)  # only the declared weight is wrong
    strategy.set_server_inputs(max_examples={BAD_NODE: 1000, 1: 10, 2: 20})
    bad = metrics | {"num-examples": 10**9}
    _, got, _ = run_round(m, lambda to: reply(to, arrays, bad), strategy)
    assert_only_the_good_aggregated(
        m, strategy, got, "num-examples=1000000000, more than the 1000 examples"
    )
    strategy = strategy_for(m, max_update_ratio=None)
    strategy.set_server_inputs(max_examples={BAD_NODE: 1000})
    run_round(m, lambda to: reply(to, arrays, metrics), strategy)  # exactly its partition: fine
    assert BAD_NODE not in strategy.last_rejected


def test_whole_bias_and_bn_tensors_over_budget_are_rejected(m: Model) -> None:
    """A reply declaring a 1-parameter budget that rewrites every bias / BN tensor whole."""
    index = {k: i for i, k in enumerate(m.table)}
    for whole, reason in (
        ([k for k in m.table if k.endswith(".bias") and not k.startswith("head")],
         "trains 112 selectable parameters, more than its declared budget"),
        ([k for k in m.table if "running_" in k], "running statistic"),
    ):  # fmt: skip
        strategy = strategy_for(m, max_update_ratio=None)

        def bad(to: Message, whole=whole) -> Message:
            arrays = encode(m.trained(0.5), m.nm, m.mask([]), m.table)
            arrays["tensors"] = np.array(sorted(index[k] for k in whole), dtype=np.int32)
            arrays["tensor_values"] = np.concatenate(
                [m.trained(0.5)[k].numpy().ravel() for k in sorted(whole, key=index.get)]
            ).astype(np.float32)
            return reply(to, arrays, metrics_for(m, [], 10, **{"budget-params": 1}))

        _, got, _ = run_round(m, bad, strategy)
        ((node, why),) = strategy.last_rejected.items()
        assert node == BAD_NODE and reason in why, why
        expected = good_only(m)
        assert all(torch.equal(got[k], expected[k]) for k in got)


def test_absurd_finite_values_are_rejected_even_alone(m: Model) -> None:
    absurd = m.trained(0.1)
    absurd["features.2.1.running_var"][48 - 48] = 3e38  # a statistic: no update size covers it
    arrays = encode(absurd, m.nm, m.mask([48]), m.table)
    strategy = strategy_for(m)
    _, got, _ = run_round(m, lambda to: reply(to, arrays, metrics_for(m, [48], 10)), strategy)
    assert_only_the_good_aggregated(m, strategy, got, "magnitude 3e+38")
    alone = strategy_for(m)  # no other reply to compare its size with
    alone.aggregate_train(1, [reply(train_messages(alone, m)[BAD_NODE], arrays, metrics_for(m, [48], 10))])
    assert "more than max_abs_value=1e+06" in alone.last_rejected[BAD_NODE]


def test_a_node_claiming_a_device_class_it_was_not_given_is_rejected(m: Model) -> None:
    """The operator's table says mcu; the node says phone and trains a phone's budget."""
    arrays, metrics = bad_parts(m)
    strategy = strategy_for(m, max_update_ratio=None)
    strategy.set_server_inputs(device_classes={1: "pi-4", 2: "pi-4", BAD_NODE: "mcu"})

    def good_with_device(msgs: dict[int, Message]) -> list[Message]:
        return [
            Message(RecordDict({**r.content, "info": ConfigRecord({"device": "pi-4"})}), reply_to=msgs[n])
            for n, r in zip(GOOD_NODES, good_replies(m, msgs), strict=True)
        ]  # fmt: skip

    msgs = train_messages(strategy, m)
    bad = reply(msgs[BAD_NODE], arrays, metrics, device="phone")
    got, _ = strategy.aggregate_train(1, [*good_with_device(msgs), bad])
    assert_only_the_good_aggregated(
        m, strategy, unpack_model(got),
        "declares device 'phone', but the operator's table gives this node the device class 'mcu'",
    )  # fmt: skip
    missing = strategy_for(m)  # a reply that does not say which device it is
    missing.set_server_inputs(device_classes={BAD_NODE: "mcu"})
    missing.aggregate_train(1, [reply(train_messages(missing, m)[BAD_NODE], arrays, metrics)])
    assert "declares device None" in missing.last_rejected[BAD_NODE]


def test_the_device_table_is_read_and_checked(tmp_path: Path) -> None:
    from sims.server.device_table import read_device_table

    config = Config().replace(run={"num_clients": 3, "clients_per_round": 3})
    good = tmp_path / "devices.csv"
    good.write_text("partition_id,device\n0,mcu\n1,pi-4\n2,0.5\n")
    table = read_device_table(good, config)
    assert [table.profiles[p].name for p in range(3)] == ["mcu", "pi-4", "custom"]
    assert table.profiles[2].budget == 0.5 and table.node_ids == {}
    good.write_text("partition_id,device,node_id\n0,mcu,11\n1,pi-4,\n2,0.5,13\n")
    assert read_device_table(good, config).node_ids == {0: 11, 2: 13}
    for text, message in (
        ("partition_id,device\n0,mcu\n1,pi-4\n", "no row for partition ids [2]"),
        ("partition_id,device\n0,mcu\n0,pi-4\n2,mcu\n", "partition_id 0 appears twice"),
        ("partition_id,device\n0,mcu\n1,toaster\n2,mcu\n", "device 'toaster' should be one of"),
        ("partition_id,device\n0,mcu\n1,mcu\n3,mcu\n", "partition_id '3' should be an integer in [0, 2]"),
        ("pid,device\n", "the header should be 'partition_id,device'"),
        ("partition_id,device,node_id\n0,mcu,x\n", "node_id 'x' should be an integer"),
    ):  # fmt: skip
        good.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_device_table(good, config)
    with pytest.raises(ValueError, match="no such file on the server"):
        read_device_table(tmp_path / "missing.csv", config)
