"""Flower's own strategies behind fedneq's checks (strategies/flower_adapter.py).

Hand-computed aggregates of three sparse replies over a 3-neuron Linear layer,
the registry's "module:Class" resolution and option checks, state round trips,
fedneq's reply checks in front of the wrapped strategy, and FedAdam through
``python -m sims.run default``, FedMedian, FedTrimmedAvg and Krum with that config.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian
from helpers import LocalGrid, small_cnn
from torch import nn

from fedneq.federation.wire import (
    SparseUpdate,
    encode,
    full_mask,
    pack_model,
    tensor_table,
    to_array_record,
    unpack_model,
)
from fedneq.neurons import enumerate_neurons
from sims.run import main as run_main
from sims.server.results import read_csv
from strategies.flower_adapter import FlowerStrategy, densify, flower_strategy
from strategies.neuron_avg import neuron_average
from strategies.registry import check_strategy, get_strategy, strategy_options
from strategies.sparse_fedavg import sparse_fedavg

FLWR = "flwr.serverapp.strategy:"
NAN = float("nan")  # values outside a reply's sent rows must never be read
# Flower Messages take run/node ids from the identity a Flower runtime sets (the wrapped
# strategies build messages in their configure_train)
identity = pytest.mark.usefixtures("task_identity")

# --- three hand-made sparse replies of a Linear(2, 3): weight (3, 2), bias (3,) ---------

GLOBAL = {
    "0.weight": torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]),
    "0.bias": torch.tensor([10.0, 20.0, 30.0]),
}
WEIGHTS = [1.0, 3.0, 2.0]


def update(rows: dict[str, list[bool]], values: dict[str, list]) -> SparseUpdate:
    return SparseUpdate(
        values={k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()},
        rows={k: torch.tensor(r) for k, r in rows.items()},
    )


def three_updates() -> list[SparseUpdate]:
    """u1 sends weight rows 0, 1 and bias row 1; u2 weight rows 1, 2; u3 weight row 0, bias 0, 2."""
    return [
        update({"0.weight": [True, True, False], "0.bias": [False, True, False]},
               {"0.weight": [[1, 2], [3, 4], [NAN, NAN]], "0.bias": [NAN, 25, NAN]}),
        update({"0.weight": [False, True, True]}, {"0.weight": [[NAN, NAN], [7, 8], [5, 6]]}),
        update({"0.weight": [True, False, False], "0.bias": [True, False, True]},
               {"0.weight": [[-2, 4], [NAN, NAN], [NAN, NAN]], "0.bias": [12, NAN, 36]}),
    ]  # fmt: skip


# what each reply means densified: unsent elements are the global model's
DENSE = [
    {"0.weight": [[1, 2], [3, 4], [2, 2]], "0.bias": [10, 25, 30]},
    {"0.weight": [[0, 0], [7, 8], [5, 6]], "0.bias": [10, 20, 30]},
    {"0.weight": [[-2, 4], [1, 1], [2, 2]], "0.bias": [12, 20, 36]},
]


def linear_strategy(name: str, **options) -> FlowerStrategy:
    model = nn.Sequential(nn.Linear(2, 3))
    model.load_state_dict(GLOBAL)
    return get_strategy(
        FLWR + name, neuron_map=enumerate_neurons(model), table=tensor_table(GLOBAL), **options
    )


def test_densify_fills_unsent_elements_with_the_global_model() -> None:
    for u, dense in zip(three_updates(), DENSE, strict=True):
        got = densify(GLOBAL, u, GLOBAL)
        for key, expected in dense.items():
            assert torch.equal(got[key], torch.tensor(expected, dtype=torch.float32)), key


@identity
def test_fedavg_is_the_weighted_mean_of_densified_replies() -> None:
    out = linear_strategy("FedAvg").aggregate(dict(GLOBAL), three_updates(), WEIGHTS)
    # (1 * dense1 + 3 * dense2 + 2 * dense3) / 6, element by element
    expected_w = torch.tensor([[-3 / 6, 10 / 6], [26 / 6, 30 / 6], [21 / 6, 24 / 6]])
    expected_b = torch.tensor([64 / 6, 125 / 6, 192 / 6])
    torch.testing.assert_close(out["0.weight"], expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["0.bias"], expected_b, rtol=0, atol=1e-6)
    assert out["0.weight"].dtype == torch.float32
    # an unsent element counting as unchanged is fedneq's sparse-fedavg
    reference = sparse_fedavg(GLOBAL, three_updates(), WEIGHTS)
    for key in GLOBAL:
        torch.testing.assert_close(out[key], reference[key], rtol=0, atol=1e-6)


@identity
def test_fedmedian_is_the_median_of_densified_replies_and_leans_to_unchanged() -> None:
    out = linear_strategy("FedMedian").aggregate(dict(GLOBAL), three_updates(), WEIGHTS)
    # weight row 0: median(1, 0, -2), median(2, 0, 4); row 1: median(3, 7, 1), median(4, 8, 1);
    # row 2 only u2 sent: median(2, 5, 2) = 2 = global; bias: one sender per element = global
    assert torch.equal(out["0.weight"], torch.tensor([[0.0, 2.0], [3.0, 4.0], [2.0, 2.0]]))
    assert torch.equal(out["0.bias"], GLOBAL["0.bias"])
    # a strategy built beforehand (min_available_nodes=5 > 3 replies) gives the same, unblocked
    named = linear_strategy("FedMedian")
    built = FlowerStrategy(named.neuron_map, named.table, flower=FedMedian(min_available_nodes=5))
    again = built.aggregate(dict(GLOBAL), three_updates(), WEIGHTS)
    assert all(torch.equal(again[k], out[k]) for k in GLOBAL)


@identity
def test_fedadam_steps_from_the_global_model_by_its_moments() -> None:
    strategy = linear_strategy("FedAdam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    assert strategy.state_dict().keys().isdisjoint({"dict/m_t/0.weight"})  # no moments yet
    before = strategy.state_dict()
    out = strategy.aggregate(dict(GLOBAL), three_updates(), WEIGHTS)
    eta_norm = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # round 1's bias correction
    for key, dense_avg in (
        ("0.weight", [[-3 / 6, 10 / 6], [26 / 6, 30 / 6], [21 / 6, 24 / 6]]),
        ("0.bias", [64 / 6, 125 / 6, 192 / 6]),
    ):
        delta = np.array(dense_avg) - GLOBAL[key].numpy()
        m, v = 0.1 * delta, 0.01 * delta**2
        expected = GLOBAL[key].numpy() + eta_norm * m / (np.sqrt(v) + 1e-3)
        np.testing.assert_allclose(out[key].numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(strategy.state_dict()[f"dict/m_t/{key}"].numpy(), m, rtol=1e-5)
    # the moments are its state: restored whole, and a rollback forgets them again
    after = strategy.state_dict()
    fresh = linear_strategy("FedAdam", eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    fresh.load_state_dict(after)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in after.items())
    strategy.load_state_dict(before)
    assert strategy.flower.m_t is None and strategy.flower.v_t is None
    with pytest.raises(ValueError, match="has no 'x_t'"):
        strategy.load_state_dict({"dict/x_t/0.weight": torch.zeros(3, 2)})


@identity
def test_full_budget_flower_fedavg_matches_neuron_average() -> None:
    """Every element sent: Flower's FedAvg (float32 sums) = fedneq's neuron average (float64)."""
    g = torch.Generator().manual_seed(0)
    full = [
        SparseUpdate(
            values={k: v + torch.randn(v.shape, generator=g) for k, v in GLOBAL.items()},
            rows={k: torch.ones(v.shape[0], dtype=torch.bool) for k, v in GLOBAL.items()},
        )
        for _ in range(3)
    ]
    out = linear_strategy("FedAvg").aggregate(dict(GLOBAL), full, WEIGHTS)
    reference = neuron_average(GLOBAL, full, WEIGHTS)
    for key in GLOBAL:
        torch.testing.assert_close(out[key], reference[key], rtol=0, atol=1e-5)


# --- names and options ---------------------------------------------------------------


def test_the_registry_resolves_flower_strategies_with_their_own_options() -> None:
    assert strategy_options(FLWR + "FedAdam") == ["beta_1", "beta_2", "eta", "eta_l", "tau"]
    assert strategy_options(FLWR + "FedTrimmedAvg") == ["beta"]
    assert strategy_options(FLWR + "Krum") == ["num_malicious_nodes"]
    assert strategy_options(FLWR + "FedMedian") == []
    check_strategy(FLWR + "FedAdam", {"eta": 0.01})
    with pytest.raises(ValueError, match=r"\['etaa'\] are not options .*did you mean 'eta'"):
        check_strategy(FLWR + "FedAdam", {"etaa": 0.01})
    with pytest.raises(ValueError, match="'beta' must be a float .* got 'high'"):
        linear_strategy("FedTrimmedAvg", beta="high")
    with pytest.raises(ValueError, match=r"FedTrimmedAvg\(beta=0.7\) could not be built"):
        linear_strategy("FedTrimmedAvg", beta=0.7)  # Flower's own range check
    strategy = linear_strategy("Krum", num_malicious_nodes=1)
    assert type(strategy).__name__ == "FlowerStrategy[Krum]"
    assert strategy.flower.num_malicious_nodes == 1
    assert strategy.flower.min_available_nodes == 0  # fedneq samples, not Flower
    assert flower_strategy(FedAdam) is flower_strategy(FedAdam)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("collections:OrderedDict", "neither a concrete SparseStrategy subclass nor a Flower strategy"),
        ("flwr.serverapp.strategy:Strategy", "Strategy is abstract"),
        ("flwr.serverapp.strategy:NoSuchStrategy", "has no 'NoSuchStrategy'"),
    ],
)
def test_a_name_that_is_not_a_strategy_class_is_refused(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_strategy(name, {})


# --- fedneq's checks stand in front of the wrapped strategy --------------------------


class SpyMedian(FedMedian):
    """A third-party Flower strategy: FedMedian that records what it was given."""

    seen: list[list[tuple[list[str], dict]]] = []  # per call, per reply: array keys, metrics

    def aggregate_train(self, server_round, replies):
        replies = list(replies)  # FedMedian pops the arrays out of the replies: record them first
        SpyMedian.seen.append(
            [(sorted(m.content["arrays"]), dict(m.content["metrics"])) for m in replies]
        )
        return super().aggregate_train(server_round, replies)


class NeedsThree(FedAvg):
    """A third-party Flower strategy that cannot aggregate fewer than three replies."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if len(replies) < 3:
            raise AggregationError(f"needs 3 replies, got {len(replies)}")
        return super().aggregate_train(server_round, replies)


@identity
def test_rejected_replies_never_reach_the_wrapped_strategy() -> None:
    model = small_cnn()
    state = model.state_dict()
    nmap = enumerate_neurons(model, always_trained=("head",))
    table = tensor_table(state)
    strategy = get_strategy(f"{__name__}:SpyMedian", neuron_map=nmap, table=table,
                            min_train_nodes=1, min_available_nodes=1)  # fmt: skip
    messages = list(strategy.configure_train(1, pack_model(state), ConfigRecord(), LocalGrid(range(3))))
    trained = {k: v + 1 if k in table else v for k, v in state.items()}
    wire = encode(trained, nmap, full_mask(nmap), table)
    exploded = {k: v * 1e9 if v.dtype == np.float32 else v for k, v in wire.items()}
    metrics = {"num-examples": 4, "budget-params": nmap.selectable_params, "local-epochs": 1}

    def reply(to: Message, arrays: dict, **extra) -> Message:
        content = RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics | extra)})
        return Message(content, reply_to=to)

    SpyMedian.seen.clear()
    replies = [reply(messages[0], wire), reply(messages[1], exploded), reply(messages[2], wire, loss=0.5)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(strategy.last_rejected) == [messages[1].metadata.dst_node_id]  # max_abs_value
    (seen,) = SpyMedian.seen
    assert len(seen) == 2
    assert seen[0][0] == sorted(table)  # dense: every floating-point tensor
    assert seen[1][1] == metrics  # the keys every accepted reply reports
    got = unpack_model(arrays)
    for key in state:
        assert torch.equal(got[key], trained[key]), key  # the median of two equal replies
    assert got["bn1.num_batches_tracked"].dtype == torch.int64


@identity
def test_a_round_the_wrapped_strategy_cannot_aggregate_leaves_the_model() -> None:
    model = small_cnn()
    state = model.state_dict()
    nmap = enumerate_neurons(model, always_trained=("head",))
    table = tensor_table(state)
    strategy = get_strategy(f"{__name__}:NeedsThree", neuron_map=nmap, table=table,
                            min_train_nodes=1, min_available_nodes=1)  # fmt: skip
    (message,) = strategy.configure_train(1, pack_model(state), ConfigRecord(), LocalGrid([0]))
    metrics = {"num-examples": 4, "budget-params": nmap.selectable_params, "local-epochs": 1}
    content = RecordDict({
        "arrays": to_array_record(encode(state, nmap, full_mask(nmap), table)),
        "metrics": MetricRecord(metrics),
    })  # fmt: skip
    assert strategy.aggregate_train(1, [Message(content, reply_to=message)]) == (None, None)


# --- through `python -m sims.run default` -----------------------------------------------


FLOWER_RUNS = [("FedAdam", ["eta=0.01"]), ("FedMedian", []), ("FedTrimmedAvg", ["beta=0.2"]),
               ("Krum", ["num_malicious_nodes=1"])]  # fmt: skip


def _flower_sets(tmp_path: Path, name: str, options: list[str]) -> list[str]:
    """``--set`` assignments: the default config, 5 clients all trained, the Flower strategy."""
    return [
        f'strategy.name="{FLWR}{name}"', "run.num_clients=5", "run.clients_per_round=5",
        "run.min_replies=1", f'run.out_dir="{tmp_path}"', "model.pretrain_epochs=0",
        "fleet.local_epochs=1", "simulation.cpus_per_client=1.0",
    ] + [f"strategy.options.{o}" for o in options]  # fmt: skip


def _check_flower_run(out: Path) -> None:
    rounds = read_csv(out / "rounds.csv")
    assert [int(r["round"]) for r in rounds] == [1, 2]
    assert all(int(r["replied"]) == 5 and int(r["committed"]) == 1 for r in rounds)
    strategy_state = (out / "checkpoint" / "round-00002" / "strategy.safetensors").stat().st_size
    assert strategy_state > 0


@pytest.mark.slow
def test_flower_strategies_run_through_sims_run(tmp_path: Path) -> None:
    """FedAdam through ``python -m sims.run default``'s main; FedMedian, FedTrimmedAvg and
    Krum with the config that command builds, in one engine (``simulate_many``: Ray starts
    once for the three instead of three times)."""
    from sims.run import simulate_many
    from sims.server import RunSpec, load_cli_config

    (first, first_options), *rest = FLOWER_RUNS
    argv = ["default", "--rounds", "2", "--out", str(tmp_path / first)]
    for assignment in _flower_sets(tmp_path, first, first_options):
        argv += ["--set", assignment]
    assert run_main(argv) == 0
    _check_flower_run(tmp_path / first)

    specs = [
        RunSpec(load_cli_config("default", [*_flower_sets(tmp_path, name, options), "run.rounds=2"]),
                tmp_path / name)
        for name, options in rest
    ]  # fmt: skip
    assert [s.config.strategy.name for s in specs] == [f"{FLWR}{name}" for name, _ in rest]
    simulate_many(specs)
    for name, _ in rest:
        _check_flower_run(tmp_path / name)
