"""Server strategies: neuron-wise averaging, the FedAvg baseline, server momentum, registry.

``check_contract`` holds every registered strategy, built-in or a user's, to
what the server relies on; the contract test runs it over ``list_strategies()``.
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from helpers import LocalGrid, small_cnn
from torch import nn

import strategies
from fedneq.federation.protocol import ARRAYS_RECORD, CONFIG_RECORD, SERVER_ROUND_KEY, WIDTH_METHODS
from fedneq.federation.wire import (
    SparseUpdate,
    decode,
    dense_arrays,
    encode,
    encode_blocks,
    full_mask,
    pack_model,
    payload_nbytes,
    tensor_table,
    to_array_record,
    unpack_model,
)
from fedneq.neurons import NeuronMap, TrainMask, enumerate_neurons
from fedneq.training.submodel import Block
from strategies import ServerInputs
from strategies.base import SparseStrategy
from strategies.fedavg import DenseFedAvg
from strategies.neuron_avg import NeuronAvg, average_rows, neuron_average
from strategies.registry import get_strategy, list_strategies, register_strategy
from strategies.robust import screen_sizes
from strategies.server_momentum import ServerMomentum
from strategies.sparse_fedavg import sparse_fedavg
from strategies.width_avg import FedRolex, FjORD, HeteroFL

# --- fixtures ------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("task_identity")


class Setup:
    def __init__(self) -> None:
        model = small_cnn()
        self.state = model.state_dict()
        self.nm = enumerate_neurons(model, always_trained=("head",))
        self.table = tensor_table(self.state)

    def perturbed(self, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {
            k: v + torch.randn(v.shape, generator=g) if k in self.table else v.clone()
            for k, v in self.state.items()
        }

    def random_mask(self, seed: int, p: float = 0.5) -> TrainMask:
        g = torch.Generator().manual_seed(seed)
        return self.nm.train_mask(torch.rand(self.nm.num_neurons, generator=g) < p)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return Setup()


def train_messages(strategy: FedAvg, state: dict[str, torch.Tensor], n: int, config: ConfigRecord | None = None) -> list[Message]:
    """Real train messages from ``strategy.configure_train`` to nodes 0..n-1."""
    grid = LocalGrid(range(n))
    # fedneq's strategies take the packed global model; Flower's FedAvg (the reference) a record per tensor
    record = ArrayRecord(state) if type(strategy) is FedAvg else pack_model(state)
    messages = strategy.configure_train(1, record, config or ConfigRecord(), grid)
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def reply(to: Message, arrays: ArrayRecord, num_examples: int, loss: float) -> Message:
    """A reply declaring the full budget (the strategies check what a reply trains against it)
    and one local step, as a real client declares them."""
    full = Setup().nm.selectable_params
    metrics = {"num-examples": num_examples, "loss": loss, "budget-params": full, "local-epochs": 1,
               "local-steps": 1}  # fmt: skip
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=to)


def sparse_update(rows: dict[str, list[bool]], values: dict[str, list]) -> SparseUpdate:
    return SparseUpdate(
        values={k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()},
        rows={k: torch.tensor(r) for k, r in rows.items()},
    )


def kwargs(setup: Setup, **extra) -> dict:
    return {"neuron_map": setup.nm, "table": setup.table, "min_train_nodes": 1, "min_available_nodes": 1} | extra


# --- neuron_average: hand-computed -----------------------------------------------

GLOBAL = {"a": torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), "b": torch.tensor([10.0, 20.0, 30.0])}
NAN = float("nan")  # values of unsent rows must be ignored


def overlapping_updates() -> list[SparseUpdate]:
    """Two updates of GLOBAL: u1 sends a rows 0, 1 and b row 1; u2 sends a rows 1, 2."""
    u1 = sparse_update(
        {"a": [True, True, False], "b": [False, True, False]},
        {"a": [[1, 2], [3, 4], [NAN, NAN]], "b": [NAN, 25, NAN]},
    )
    u2 = sparse_update({"a": [False, True, True]}, {"a": [[NAN, NAN], [7, 8], [5, 6]]})
    return [u1, u2]


def test_neuron_average_overlapping_masks_weighted_by_examples() -> None:
    out = neuron_average(GLOBAL, overlapping_updates(), [1.0, 3.0])
    # row 1 of a: (1*[3,4] + 3*[7,8]) / 4 = [6, 7]; b only from u1 on row 1
    assert torch.equal(out["a"], torch.tensor([[1.0, 2.0], [6.0, 7.0], [5.0, 6.0]]))
    assert torch.equal(out["b"], torch.tensor([10.0, 25.0, 30.0]))
    assert out["a"].dtype == torch.float32
    assert torch.equal(GLOBAL["a"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))  # not mutated


def test_neuron_average_disjoint_masks_and_untouched_rows() -> None:
    u1 = sparse_update({"a": [True, False, False]}, {"a": [[4, 4], [NAN, NAN], [NAN, NAN]]})
    u2 = sparse_update({"a": [False, False, True]}, {"a": [[NAN, NAN], [NAN, NAN], [-1, 9]]})
    avg = average_rows(GLOBAL, [u1, u2], [5.0, 1.0])
    # disjoint: each row is its only sender's value whatever the weights; row 1 keeps global
    assert torch.equal(avg.values["a"], torch.tensor([[4.0, 4.0], [1.0, 1.0], [-1.0, 9.0]]))
    assert torch.equal(avg.values["b"], GLOBAL["b"]) and avg.values["b"] is not GLOBAL["b"]
    assert torch.equal(avg.rows["a"], torch.tensor([True, False, True])) and "b" not in avg.rows
    assert torch.equal(avg.weights["a"], torch.tensor([5.0, 0.0, 1.0], dtype=torch.float64))


def test_sparse_fedavg_counts_clients_that_did_not_send_a_row_as_unchanged() -> None:
    u1, u2 = overlapping_updates()
    out = sparse_fedavg(GLOBAL, [u1, u2], [1.0, 3.0])
    # a row 0: (1*[1,2] + 3*[0,0]) / 4; row 1 sent by both: (1*[3,4] + 3*[7,8]) / 4 = [6, 7];
    # row 2: (1*[2,2] + 3*[5,6]) / 4; b row 1: (1*25 + 3*20) / 4 = 21.25, rows 0, 2 untouched
    expected_a = torch.tensor([[0.25, 0.5], [6.0, 7.0], [4.25, 5.0]])
    assert torch.equal(out["a"], expected_a)
    assert torch.equal(out["b"], torch.tensor([10.0, 21.25, 30.0]))
    assert torch.equal(GLOBAL["a"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))  # not mutated
    # only zero-weight clients: nothing moves
    assert torch.equal(sparse_fedavg(GLOBAL, [u1, u2], [0.0, 0.0])["a"], GLOBAL["a"])
    with pytest.raises(ValueError, match="weights must be finite"):
        sparse_fedavg(GLOBAL, [u1, u2], [1.0, -1.0])


def test_neuron_average_zero_weight_sender_leaves_row_global() -> None:
    u1 = sparse_update({"b": [True, True, False]}, {"b": [0, 0, NAN]})
    u2 = sparse_update({"b": [False, True, False]}, {"b": [NAN, 40, NAN]})
    avg = average_rows(GLOBAL, [u1, u2], [0.0, 2.0])
    assert torch.equal(avg.values["b"], torch.tensor([10.0, 40.0, 30.0]))
    assert torch.equal(avg.rows["b"], torch.tensor([False, True, False]))


@pytest.mark.parametrize(
    ("weights", "message"), [([1.0], "1 entries for 2 updates"), ([1.0, -2.0], "finite and >= 0")]
)
def test_neuron_average_rejects_bad_weights(weights: list[float], message: str) -> None:
    u = sparse_update({"b": [True, False, False]}, {"b": [1, 2, 3]})
    with pytest.raises(ValueError, match=message):
        neuron_average(GLOBAL, [u, u], weights)


def test_neuron_average_rejects_unknown_key_and_wrong_rows() -> None:
    with pytest.raises(ValueError, match="'c', which is not in the global state"):
        neuron_average(GLOBAL, [sparse_update({"c": [True]}, {"c": [1]})], [1.0])
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        neuron_average(GLOBAL, [sparse_update({"b": [True, True]}, {"b": [1, 2]})], [1.0])


# --- NeuronAvg through Flower messages -----------------------------------------------


def test_full_budget_neuron_avg_equals_flower_fedavg(setup: Setup) -> None:
    clients = [setup.perturbed(s) for s in (1, 2, 3)]
    examples, losses = [10, 30, 60], [0.5, 1.0, 2.0]

    flower = FedAvg(min_train_nodes=1, min_available_nodes=1)
    msgs = train_messages(flower, setup.state, 3)
    dense_float = [{k: c[k] for k in setup.table} for c in clients]
    ref_arrays, ref_metrics = flower.aggregate_train(
        1, [reply(m, ArrayRecord(d), n, ls) for m, d, n, ls in zip(msgs, dense_float, examples, losses, strict=True)]
    )
    ref = ref_arrays.to_torch_state_dict()

    for encoder in (lambda c: encode(c, setup.nm, full_mask(setup.nm), setup.table), lambda c: dense_arrays(c, setup.table)):
        strategy = NeuronAvg(**kwargs(setup))
        msgs = train_messages(strategy, setup.state, 3)
        replies = [
            reply(m, to_array_record(encoder(c)), n, ls) for m, c, n, ls in zip(msgs, clients, examples, losses, strict=True)
        ]
        arrays, metrics = strategy.aggregate_train(1, replies)
        got = unpack_model(arrays)
        assert list(got) == list(setup.state)  # every key, state_dict order
        for key in setup.table:
            assert got[key].dtype == torch.float32
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)
        assert torch.equal(got["bn1.num_batches_tracked"], setup.state["bn1.num_batches_tracked"])
        assert dict(metrics) == pytest.approx(dict(ref_metrics))
        assert metrics["loss"] == pytest.approx((10 * 0.5 + 30 * 1.0 + 60 * 2.0) / 100)


def naive_neuron_average(
    global_state: dict[str, torch.Tensor], clients: list[dict[str, torch.Tensor]], rows: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Row-by-row reference: weighted mean over the clients that trained the row."""
    out = {k: v.clone() for k, v in global_state.items()}
    for key, t in out.items():
        for i in range(t.shape[0] if t.dim() else 0):
            senders = [(c[key][i].double(), w) for c, r, w in zip(clients, rows, weights, strict=True) if key in r and r[key][i]]
            if senders and sum(w for _, w in senders) > 0:
                t[i] = (sum(v * w for v, w in senders) / sum(w for _, w in senders)).to(t.dtype)
    return out


def test_sparse_aggregation_matches_row_by_row_reference(setup: Setup) -> None:
    clients = [setup.perturbed(s) for s in (11, 12, 13)]
    masks = [setup.random_mask(s, p) for s, p in ((21, 0.3), (22, 0.5), (23, 0.0))]
    masks[2] = TrainMask(masks[2].neurons, frozenset({"bn2.running_var"}))  # a client sending no neuron
    weights = [5, 2, 3]
    strategy = NeuronAvg(**kwargs(setup))
    strategy.set_server_inputs(free_tensors={"bn2.running_var"})  # as in a run with bn_stats = "all"
    msgs = train_messages(strategy, setup.state, 3)
    replies = [
        reply(m, to_array_record(encode(c, setup.nm, k, setup.table)), w, 0.0)
        for m, c, k, w in zip(msgs, clients, masks, weights, strict=True)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    got = unpack_model(arrays)
    rows = [setup.nm.row_masks(k, c) for k, c in zip(masks, clients, strict=True)]
    expected = naive_neuron_average(setup.state, clients, rows, [float(w) for w in weights])
    sent_somewhere = 0
    for key in setup.state:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)
        sent_somewhere += int(not torch.equal(got[key], setup.state[key]))
    assert sent_somewhere >= 8  # the masks actually changed most tensors
    summary = strategy.summaries[-1]
    assert (summary.num_results, summary.num_failures, summary.num_examples) == (3, 0, 10.0)


def test_error_replies_are_skipped_and_counted(setup: Setup) -> None:
    clients = [setup.perturbed(s) for s in (31, 32)]
    strategy = NeuronAvg(**kwargs(setup))
    msgs = train_messages(strategy, setup.state, 3)
    wires = [encode(c, setup.nm, setup.random_mask(s), setup.table) for c, s in zip(clients, (41, 42), strict=True)]
    replies = [
        reply(msgs[0], to_array_record(wires[0]), 4, 1.0),
        Message(Error(code=0, reason="client crashed"), reply_to=msgs[1]),
        reply(msgs[2], to_array_record(wires[1]), 6, 3.0),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    updates = [decode(w, setup.nm, setup.table, setup.state) for w in wires]
    expected = neuron_average(setup.state, updates, [4.0, 6.0])
    got = unpack_model(arrays)
    for key in setup.state:
        assert torch.equal(got[key], expected[key])
    assert metrics["loss"] == pytest.approx(2.2)
    s = strategy.summaries[-1]
    assert (s.server_round, s.num_results, s.num_failures) == (1, 2, 1)
    assert s.upload_bytes == payload_nbytes(wires[0]) + payload_nbytes(wires[1])

    only_errors = [Message(Error(code=0, reason="x"), reply_to=m) for m in msgs]
    assert strategy.aggregate_train(2, only_errors) == (None, None)
    assert (strategy.summaries[-1].num_results, strategy.summaries[-1].num_failures) == (0, 3)


def test_malformed_reply_is_rejected_and_the_others_aggregated(setup: Setup) -> None:
    strategy = NeuronAvg(**kwargs(setup))
    good_msg, bad_msg = train_messages(strategy, setup.state, 2)
    mask = setup.random_mask(5)
    good = encode(setup.state, setup.nm, mask, setup.table)
    bad = encode(setup.state, setup.nm, mask, setup.table)
    bad["neurons"] = bad["neurons"][::-1].copy()
    arrays, _ = strategy.aggregate_train(
        1, [reply(good_msg, to_array_record(good), 3, 0.0), reply(bad_msg, to_array_record(bad), 1, 0.0)]
    )
    (node, reason), = strategy.last_rejected.items()
    assert node == bad_msg.metadata.dst_node_id and "not sorted ascending" in reason
    assert strategy.summaries[-1].num_results == 1
    alone = NeuronAvg(**kwargs(setup))
    (msg,) = train_messages(alone, setup.state, 1)
    expected, _ = alone.aggregate_train(1, [reply(msg, to_array_record(good), 3, 0.0)])
    for key, value in unpack_model(expected).items():
        assert torch.equal(value, unpack_model(arrays)[key]), key


def test_aggregate_before_any_global_model_is_an_error(setup: Setup) -> None:
    strategy = NeuronAvg(**kwargs(setup))
    producer = NeuronAvg(**kwargs(setup))
    (msg,) = train_messages(producer, setup.state, 1)
    wire = encode(setup.state, setup.nm, full_mask(setup.nm), setup.table)
    with pytest.raises(RuntimeError, match="no global model yet"):
        strategy.aggregate_train(1, [reply(msg, to_array_record(wire), 1, 0.0)])
    seeded = NeuronAvg(**kwargs(setup, reference_state=setup.state))
    arrays, _ = seeded.aggregate_train(1, [reply(msg, to_array_record(wire), 1, 0.0)])
    assert torch.equal(unpack_model(arrays)["conv1.weight"], setup.state["conv1.weight"])


def test_train_config_is_merged_into_the_sent_config(setup: Setup) -> None:
    config = ConfigRecord({"lr": 0.1, "full-budget": False})
    dense = train_messages(DenseFedAvg(**kwargs(setup)), setup.state, 2, config)
    sparse = train_messages(NeuronAvg(**kwargs(setup)), setup.state, 2, config)
    for m in dense:
        assert dict(m.content["config"]) == {"lr": 0.1, "full-budget": True, "server-round": 1}
    assert dict(sparse[0].content["config"]) == {"lr": 0.1, "full-budget": False, "server-round": 1}
    assert dict(config) == {"lr": 0.1, "full-budget": False}  # the caller's record is not mutated
    assert torch.equal(unpack_model(dense[0].content["arrays"])["head.weight"], setup.state["head.weight"])


def test_start_runs_rounds_against_the_latest_global(setup: Setup) -> None:
    """Flower's own ``start`` loop: each round decodes against the model it sent."""
    masks = {0: setup.random_mask(51), 1: setup.random_mask(52)}

    def client(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        state = unpack_model(msg.content["arrays"])
        trained = {k: v + (node + 1) if k in setup.table else v for k, v in state.items()}
        return reply(msg, to_array_record(encode(trained, setup.nm, masks[node], setup.table)), node + 1, 0.0)

    strategy = NeuronAvg(**kwargs(setup, min_train_nodes=2, fraction_evaluate=0.0))
    result = strategy.start(LocalGrid([0, 1], client), pack_model(setup.state), num_rounds=2)

    expected = setup.state
    for _ in range(2):
        updates = []
        for node in (0, 1):
            trained = {k: v + (node + 1) if k in setup.table else v for k, v in expected.items()}
            rows = setup.nm.row_masks(masks[node], trained)
            updates.append(SparseUpdate({k: trained[k] for k in rows}, rows))
        expected = neuron_average(expected, updates, [1.0, 2.0])
    got = unpack_model(result.arrays)
    for key in setup.state:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    assert [s.server_round for s in strategy.summaries] == [1, 2]


# --- server momentum ----------------------------------------------------------------


def linear3() -> tuple[dict[str, torch.Tensor], NeuronMap, tuple[str, ...]]:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(1, 3)))
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
        model.fc.bias.zero_()
    state = model.state_dict()
    return state, enumerate_neurons(model), tensor_table(state)


def linear_update(neurons: dict[int, tuple[float, float]]) -> SparseUpdate:
    """Neuron i -> (weight, bias); other rows NaN (ignored)."""
    w, b, rows = torch.full((3, 1), NAN), torch.full((3,), NAN), torch.zeros(3, dtype=torch.bool)
    for i, (wi, bi) in neurons.items():
        w[i, 0], b[i], rows[i] = wi, bi, True
    return SparseUpdate({"fc.weight": w, "fc.bias": b}, {"fc.weight": rows.clone(), "fc.bias": rows.clone()})


def test_server_momentum_two_rounds_by_hand() -> None:
    state, nm, table = linear3()
    strategy = ServerMomentum(nm, table, beta=0.5, eta=2.0)
    # round 1: avg row0 = (3, 1), row2 = ((1*4 + 3*0)/4, (1*-1 + 3*3)/4) = (1, 2)
    # delta row0 = (2, 1), row2 = (-2, 2); m = delta; new = global + 2 m
    new = strategy.aggregate(state, [linear_update({0: (3, 1), 2: (4, -1)}), linear_update({2: (0, 3)})], [1, 3])
    assert torch.equal(new["fc.weight"].flatten(), torch.tensor([5.0, 2.0, -1.0]))
    assert torch.equal(new["fc.bias"], torch.tensor([2.0, 0.0, 4.0]))
    assert torch.equal(strategy.state_dict()["fc.weight"].flatten(), torch.tensor([2.0, 0.0, -2.0]))
    # round 2: row0 resent unchanged (delta 0), row1 avg = (3, 2) -> delta (1, 2); row2 not sent
    # m row0 = 0.5 * (2, 1) = (1, 0.5); m row1 = (1, 2); m row2 untouched (-2, 2)
    new = strategy.aggregate(new, [linear_update({0: (5, 2), 1: (4, 1)}), linear_update({1: (2, 3)})], [2, 2])
    assert torch.equal(new["fc.weight"].flatten(), torch.tensor([7.0, 4.0, -1.0]))
    assert torch.equal(new["fc.bias"], torch.tensor([3.0, 4.0, 4.0]))
    m = strategy.state_dict()
    assert torch.equal(m["fc.weight"].flatten(), torch.tensor([1.0, 1.0, -2.0]))
    assert torch.equal(m["fc.bias"], torch.tensor([0.5, 2.0, 2.0]))


def test_server_momentum_state_dict_round_trip() -> None:
    state, nm, table = linear3()
    a = ServerMomentum(nm, table, beta=0.5, eta=2.0)
    mid = a.aggregate(state, [linear_update({0: (3, 1), 2: (4, -1)})], [1])
    b = ServerMomentum(nm, table, beta=0.5, eta=2.0)
    b.load_state_dict(a.state_dict())
    nxt = [linear_update({0: (0, 0), 1: (1, 1)})]
    out_a, out_b = a.aggregate(mid, nxt, [1]), b.aggregate(mid, nxt, [1])
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    with pytest.raises(ValueError, match="momentum keys \\['running_mean'\\]"):
        b.load_state_dict({"running_mean": torch.zeros(3)})
    with pytest.raises(ValueError, match="has no state"):
        NeuronAvg(nm, table).load_state_dict({"fc.weight": torch.zeros(3, 1)})


def test_server_momentum_without_momentum_is_neuron_avg_and_buffers_skip_momentum(setup: Setup) -> None:
    clients = [setup.perturbed(s) for s in (61, 62)]
    masks = [setup.random_mask(71), setup.random_mask(72)]
    updates = [
        decode(encode(c, setup.nm, k, setup.table), setup.nm, setup.table, setup.state)
        for c, k in zip(clients, masks, strict=True)
    ]
    plain = neuron_average(setup.state, updates, [1.0, 2.0])
    no_momentum = ServerMomentum(setup.nm, setup.table, beta=0.0, eta=1.0).aggregate(setup.state, updates, [1.0, 2.0])
    for key in setup.state:
        torch.testing.assert_close(no_momentum[key], plain[key], rtol=0, atol=1e-6)

    strong = ServerMomentum(setup.nm, setup.table, beta=0.9, eta=3.0)
    out = strong.aggregate(setup.state, updates, [1.0, 2.0])
    assert torch.equal(out["bn1.running_var"], plain["bn1.running_var"])  # buffers: plain average
    assert not torch.allclose(out["bn1.weight"], plain["bn1.weight"])  # parameters: momentum step
    assert set(strong.state_dict()) <= {k for k in setup.table if "running" not in k}


@pytest.mark.parametrize(("beta", "eta", "message"), [(1.0, 1.0, "beta must be in"), (0.9, 0.0, "eta must be > 0")])
def test_server_momentum_rejects_bad_hyperparameters(beta: float, eta: float, message: str) -> None:
    _, nm, table = linear3()
    with pytest.raises(ValueError, match=message):
        ServerMomentum(nm, table, beta=beta, eta=eta)


# --- the contract every registered strategy keeps ------------------------------------


def reply_arrays(strategy: SparseStrategy, nm: NeuronMap, table: tuple[str, ...],
                 state: dict[str, torch.Tensor], neurons: torch.Tensor) -> dict[str, np.ndarray]:
    """``state``'s rows of ``neurons`` ((N,) bool) and the head, in ``strategy.reply_format``."""
    mask = nm.train_mask(neurons)
    if strategy.reply_format == "neurons":
        return encode(state, nm, mask, table)
    assert strategy.reply_format == "blocks", f"no contract reply in the {strategy.reply_format!r} format"
    blocks = {}
    for key, rows in nm.row_masks(mask, state).items():  # every input column of a sent row
        t = state[key]
        cols = torch.arange(t.shape[1]) if t.dim() > 1 else None
        blocks[key] = Block(rows.nonzero().flatten(), cols, t[rows])
    return encode_blocks(blocks, table, state)


def check_contract(get: Callable[..., FedAvg], name: str, setup: Setup) -> None:
    """What every strategy ``get(name, ...)`` builds must do, whatever its rule.

    It sends every sampled node the global model and its ``train_config``;
    from replies that leave a neuron of every layer unsent, an error reply
    among them, it returns every global key (same order, shape, dtype, finite
    values) with the unsent neurons' rows and the entries outside the tensor
    table unchanged; replies that change nothing give the global model back;
    its ``state_dict`` loads into a new one; and one that declares
    ``fedavg_at_full_budget`` equals Flower's FedAvg on full-budget replies.
    """
    nm, table, state = setup.nm, setup.table, setup.state

    def build() -> FedAvg:
        return get(name, **kwargs(setup))

    strategy = build()
    assert isinstance(strategy, FedAvg)
    msgs = train_messages(strategy, state, 3)
    assert [m.metadata.dst_node_id for m in msgs] == [0, 1, 2]
    for m in msgs:
        sent = unpack_model(m.content[ARRAYS_RECORD])
        assert list(sent) == list(state) and all(torch.equal(sent[k], state[k]) for k in state)
        config = dict(m.content[CONFIG_RECORD])
        assert config[SERVER_ROUND_KEY] == 1 and config.items() >= strategy.train_config(1).items()

    unsent = torch.zeros(nm.num_neurons, dtype=torch.bool)
    unsent[[layer.offset for layer in nm.layers]] = True  # the first neuron of every layer
    masks = [(setup.random_mask(s).neurons & ~unsent) for s in (101, 102)]
    clients = [setup.perturbed(s) for s in (103, 104)]

    def replies(strategy: FedAvg, msgs: list[Message], clients: list[dict]) -> list[Message]:
        out = [
            reply(m, to_array_record(reply_arrays(strategy, nm, table, c, k)), n, 1.0)
            for m, c, k, n in zip(msgs, clients, masks, (3, 5), strict=False)
        ]
        return [*out, Message(Error(code=0, reason="client crashed"), reply_to=msgs[-1])]

    arrays, metrics = strategy.aggregate_train(1, replies(strategy, msgs, clients))
    assert strategy.last_rejected == {} and arrays is not None and metrics["loss"] == 1.0
    summary = strategy.summaries[-1]
    assert (summary.num_results, summary.num_failures, summary.num_examples) == (2, 1, 8.0)
    got = unpack_model(arrays)
    assert list(got) == list(state)
    for key, value in state.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        assert bool(torch.isfinite(got[key].float()).all()), key
        if key not in table:  # e.g. num_batches_tracked
            assert torch.equal(got[key], value), key
    for layer in nm.layers:
        for key in layer.tensors:
            assert torch.equal(got[key][0], state[key][0]), f"{name} moved unsent row 0 of {key}"

    twin = build()
    twin.load_state_dict(strategy.state_dict())
    assert twin.state_dict().keys() == strategy.state_dict().keys()

    still = build()
    unchanged, _ = still.aggregate_train(1, replies(still, train_messages(still, state, 3), [state, state]))
    for key, value in unpack_model(unchanged).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-6, msg=key)

    if not strategy.fedavg_at_full_budget:
        return
    examples, losses = [10, 30, 60], [0.5, 1.0, 2.0]
    clients = [setup.perturbed(s) for s in (105, 106, 107)]
    flower = FedAvg(min_train_nodes=1, min_available_nodes=1)
    ref_replies = [
        reply(m, ArrayRecord({k: c[k] for k in table}), n, ls)
        for m, c, n, ls in zip(train_messages(flower, state, 3), clients, examples, losses, strict=True)
    ]
    ref_arrays, ref_metrics = flower.aggregate_train(1, ref_replies)
    full = build()
    every = torch.ones(nm.num_neurons, dtype=torch.bool)
    arrays, metrics = full.aggregate_train(1, [
        reply(m, to_array_record(reply_arrays(full, nm, table, c, every)), n, ls)
        for m, c, n, ls in zip(train_messages(full, state, 3), clients, examples, losses, strict=True)
    ])  # fmt: skip
    got, ref = unpack_model(arrays), ref_arrays.to_torch_state_dict()
    for key in table:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=key)
    assert dict(metrics) == pytest.approx(dict(ref_metrics))


@pytest.mark.parametrize("name", list_strategies())
def test_every_registered_strategy_keeps_the_contract(setup: Setup, name: str) -> None:
    check_contract(get_strategy, name, setup)


BUILTINS = ("fedavg", "fedrolex", "fiarse", "fjord", "heterofl", "neuron-avg", "server-momentum", "sparse-fedavg")


def test_the_builtins_are_registered() -> None:
    assert set(list_strategies()) >= set(BUILTINS)
    # the width strategies ask for exactly the methods a client can run
    width = {cls.method for cls in (HeteroFL, FjORD, FedRolex)}
    assert width == set(WIDTH_METHODS) and width <= set(BUILTINS)


NEW_BUILTIN = """
from .base import SparseStrategy
from .neuron_avg import neuron_average
from .registry import register_strategy


@register_strategy("test-one-file")
class OneFile(SparseStrategy):
    fedavg_at_full_budget = True

    def aggregate(self, global_state, updates, weights):
        return neuron_average(global_state, updates, weights)
"""


def test_a_new_builtin_is_one_file_the_contract_test_picks_up(setup: Setup, tmp_path, monkeypatch) -> None:
    """A copy of the package plus one module: listed, built and held to the contract, no other edit."""
    package = Path(strategies.__file__).parent
    shutil.copytree(package, tmp_path / "strategies_copy", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "strategies_copy" / "one_file.py").write_text(NEW_BUILTIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        copy = importlib.import_module("strategies_copy")
        assert set(copy.list_strategies()) >= {*BUILTINS, "test-one-file"}
        assert "test-one-file" not in list_strategies()  # the package's own registry is untouched
        check_contract(copy.get_strategy, "test-one-file", setup)
    finally:
        for module in [m for m in sys.modules if m.split(".")[0] == "strategies_copy"]:
            del sys.modules[module]


# --- what the server tells a strategy, and the rules it applies -----------------------


def test_server_inputs_are_set_through_one_checked_interface(setup: Setup) -> None:
    strategy = NeuronAvg(**kwargs(setup))
    assert strategy.server_inputs == ServerInputs()  # nothing known: every such check is off
    first = strategy.set_server_inputs(max_examples={1: 10}, free_tensors=["bn2.running_var"])
    second = strategy.set_server_inputs(device_classes={1: "mcu"})
    assert second.max_examples == {1: 10} and second.free_tensors == frozenset({"bn2.running_var"})
    assert second.device_classes == {1: "mcu"} and first.device_classes == {}  # a new value each time
    assert strategy.server_inputs is second
    with pytest.raises(TypeError):
        second.max_examples[2] = 1  # read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.sample = None
    with pytest.raises(ValueError, match=r"unknown inputs \['free_tensor'\]; known: \['budget_limits'"):
        strategy.set_server_inputs(free_tensor=[])
    for bad, message in (
        ({"max_examples": {1: -1}}, "max_examples must map node ids .* got 1: -1"),
        ({"budget_limits": {1: 5}}, "to BudgetLimit, got 1: 5"),
        ({"device_classes": {"1": "mcu"}}, "got '1': 'mcu'"),
        ({"free_tensors": "bn2.running_var"}, "set of tensor names"),
        ({"sample": 3}, "None or a callable"),
    ):
        with pytest.raises(ValueError, match=message):
            strategy.set_server_inputs(**bad)
    assert strategy.server_inputs is second  # a refused change changes nothing


def test_screen_sizes_rejects_then_clips_against_the_kept_ones_by_hand() -> None:
    # 100 > 10 x median(1, 1.2, 3) = 12: rejected. Then among 1, 1.2, 3 with clip ratio 2:
    # 3 > 2 x median(1, 1.2) = 2.2 -> factor 2.2 / 3; 1 and 1.2 are within 2 x 2.1 and 2 x 2
    screen = screen_sizes([1.0, 1.2, 100.0, 3.0], max_ratio=10.0, max_size=None, clip_ratio=2.0)
    assert list(screen.rejected) == [2] and "max_update_ratio=10" in screen.rejected[2]
    assert screen.factors == {3: pytest.approx(2.2 / 3)}
    off = screen_sizes([1.0, 100.0], max_ratio=None, max_size=None, clip_ratio=None)
    assert off.rejected == {} and off.factors == {}


# --- registry ------------------------------------------------------------------------


def test_get_strategy_types_and_errors(setup: Setup) -> None:
    assert type(get_strategy("neuron-avg", **kwargs(setup))) is NeuronAvg
    assert type(get_strategy("fedavg", **kwargs(setup))) is DenseFedAvg
    momentum = get_strategy("server-momentum", **kwargs(setup, beta=0.5))
    assert type(momentum) is ServerMomentum and momentum.beta == 0.5
    with pytest.raises(ValueError, match=r"unknown strategy 'fedprox'; known: \[.*'neuron-avg'"):
        get_strategy("fedprox", **kwargs(setup))
    with pytest.raises(ValueError, match=r"unknown options \['beta'\]"):
        get_strategy("neuron-avg", **kwargs(setup, beta=0.5))


def test_register_custom_strategy(setup: Setup, strategy_registry) -> None:
    @register_strategy("test-keep-global")
    class KeepGlobal(SparseStrategy):
        def aggregate(self, global_state, updates, weights):
            return global_state

    check_contract(get_strategy, "test-keep-global", setup)  # a user's strategy keeps it too

    strategy = get_strategy("test-keep-global", **kwargs(setup))
    assert type(strategy) is KeepGlobal and "test-keep-global" in list_strategies()
    msgs = train_messages(strategy, setup.state, 1)
    wire = encode(setup.perturbed(91), setup.nm, full_mask(setup.nm), setup.table)
    arrays, _ = strategy.aggregate_train(1, [reply(msgs[0], to_array_record(wire), 1, 0.0)])
    got = unpack_model(arrays)
    assert all(torch.equal(got[k], setup.state[k]) for k in setup.state)

    with pytest.raises(ValueError, match="already registered"):
        register_strategy("test-keep-global")
    with pytest.raises(ValueError, match="needs a SparseStrategy subclass"):
        register_strategy("test-not-a-strategy")(FedAvg)
