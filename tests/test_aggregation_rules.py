"""The aggregation and local-work rules that let weak devices help, by hand on 3 clients.

FedNova per element, FedAdam / FedYogi per element, the label split of the
classifier head (sparse rules and width sub-models), coverage counts, the
local steps a reply declares, and equal local steps per device.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedneq.data.arrays import ArrayDataset
from fedneq.federation.wire import SparseUpdate, encode, pack_model, tensor_table, to_array_record
from fedneq.neurons import enumerate_neurons
from fedneq.training.loop import OptimizerConfig, train_masked
from fedneq.training.schedule import local_work
from strategies.adaptive import FedAdam, FedYogi
from strategies.base import ReplyFacts
from strategies.coverage import coverage, coverage_counts
from strategies.fednova import FedNova
from strategies.label_split import split_labels
from strategies.neuron_avg import NeuronAvg
from strategies.rows import average_rows, fednova_average
from strategies.sparse_fedavg import SparseFedAvg
from strategies.width_avg import HeteroFL

pytestmark = pytest.mark.usefixtures("task_identity")

NAN = float("nan")  # values of unsent rows must be ignored
HEAD = frozenset({"fc.weight", "fc.bias"})


def linear3():
    """fc = Linear(1, 3): weight rows 1, 2, 3, bias 0; three neurons, the head of 3 labels."""
    model = nn.Sequential(OrderedDict(flat=nn.Flatten(), fc=nn.Linear(1, 3)))
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
        model.fc.bias.zero_()
    state = model.state_dict()
    return model, state, enumerate_neurons(model), tensor_table(state)


def update(neurons: dict[int, tuple[float, float]]) -> SparseUpdate:
    """Neuron i -> (weight, bias); other rows NaN (ignored)."""
    w, b, rows = torch.full((3, 1), NAN), torch.full((3,), NAN), torch.zeros(3, dtype=torch.bool)
    for i, (wi, bi) in neurons.items():
        w[i, 0], b[i], rows[i] = wi, bi, True
    return SparseUpdate({"fc.weight": w, "fc.bias": b}, {"fc.weight": rows.clone(), "fc.bias": rows.clone()})


def facts(steps=(None, None, None), labels=(None, None, None)) -> list[ReplyFacts]:
    return [ReplyFacts(i, t, None if y is None else frozenset(y)) for i, (t, y) in enumerate(zip(steps, labels, strict=True))]


def col(state: dict[str, torch.Tensor], key: str) -> list[float]:
    return pytest.approx([float(x) for x in state[key].flatten()], rel=1e-6, abs=1e-6)


# --- FedNova ------------------------------------------------------------------------------

# weights 1, 1, 2; local steps 1, 2, 4. Global weight rows (1, 2, 3), bias 0.
NOVA_UPDATES = [
    update({0: (3.0, 1.0), 1: (4.0, 0.0)}),  # client 0: deltas w (2, 2), b (1, 0)
    update({0: (5.0, 2.0), 2: (7.0, 2.0)}),  # client 1: deltas w (4, -, 4), b (2, -, 2)
    update({0: (5.0, 4.0), 1: (6.0, -4.0)}),  # client 2: deltas w (4, 4), b (4, -4)
]
NOVA_WEIGHTS, NOVA_STEPS = [1.0, 1.0, 2.0], [1, 2, 4]


def test_fednova_per_element_by_hand() -> None:
    _, state, nm, table = linear3()
    out = fednova_average(state, NOVA_UPDATES, NOVA_WEIGHTS, NOVA_STEPS, set(table)).values
    # row 0, clients 0,1,2 (W = 4): d = (1*2/1 + 1*4/2 + 2*4/4) / 4 = 1.5; tau = (1 + 2 + 8) / 4 = 2.75
    #   weight 1 + 2.75 * 1.5 = 5.125; bias d = (1/1 + 2/2 + 2*4/4) / 4 = 1 -> 2.75
    # row 1, clients 0,2 (W = 3): d = (2/1 + 2*4/4) / 3 = 4/3; tau = (1 + 8) / 3 = 3 -> 2 + 4 = 6
    #   bias d = (0 + 2*-4/4) / 3 = -2/3 -> -2
    # row 2, client 1 alone: d = 4/2, tau = 2 -> 3 + 4 = 7 (its own value); bias 2
    assert col(out, "fc.weight") == [5.125, 6.0, 7.0]
    assert col(out, "fc.bias") == [2.75, -2.0, 2.0]
    plain = average_rows(state, NOVA_UPDATES, NOVA_WEIGHTS).values  # the steps matter
    assert col(plain, "fc.weight") == [4.5, 16 / 3, 7.0]
    # equal steps: FedNova is the plain mean
    equal = fednova_average(state, NOVA_UPDATES, NOVA_WEIGHTS, [3, 3, 3], set(table)).values
    for key in table:
        torch.testing.assert_close(equal[key], plain[key])


def test_fednova_strategy_mixes_by_the_trainers_share_and_needs_steps() -> None:
    _, state, nm, table = linear3()
    strategy = FedNova(nm, table)
    out = strategy.aggregate_replies(state, NOVA_UPDATES, NOVA_WEIGHTS, facts(steps=NOVA_STEPS))
    # sparse-fedavg's mix with the global value, W = 4: row 0 (c = 4) 5.125, 2.75;
    # row 1 (c = 3): (3*6 + 1*2) / 4 = 5, (3*-2 + 0) / 4 = -1.5; row 2 (c = 1): (7 + 3*3) / 4 = 4, 2/4
    assert col(out, "fc.weight") == [5.125, 5.0, 4.0]
    assert col(out, "fc.bias") == [2.75, -1.5, 0.5]
    # the option on neuron-avg is the unmixed FedNova mean
    nova_avg = NeuronAvg(nm, table, fednova=True)
    out = nova_avg.aggregate_replies(state, NOVA_UPDATES, NOVA_WEIGHTS, facts(steps=NOVA_STEPS))
    assert col(out, "fc.weight") == [5.125, 6.0, 7.0]
    with pytest.raises(ValueError, match="local steps"):
        strategy.aggregate(state, NOVA_UPDATES, NOVA_WEIGHTS)
    with pytest.raises(ValueError, match="steps must hold"):
        fednova_average(state, NOVA_UPDATES, NOVA_WEIGHTS, [1, 0, 2], set(table))
    with pytest.raises(ValueError, match="fednova must be true or false"):
        SparseFedAvg(nm, table, fednova="yes")


def reply(msg: Message, arrays, metrics: dict) -> Message:
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


def test_fednova_reads_the_declared_steps_and_the_server_holds_them_to_its_count() -> None:
    from helpers import LocalGrid

    _, state, nm, table = linear3()
    strategy = FedNova(nm, table, min_train_nodes=1, min_available_nodes=1, budget_key=None)
    strategy.set_server_inputs(local_steps={0: 1, 1: 2, 2: 4})
    msgs = sorted(strategy.configure_train(1, pack_model(state), ConfigRecord(), LocalGrid(range(3))),
                  key=lambda m: m.metadata.dst_node_id)  # fmt: skip
    replies = []
    for i, (msg, upd) in enumerate(zip(msgs, NOVA_UPDATES, strict=True)):
        client = {k: torch.where(upd.rows[k].view(-1, *([1] * (v.dim() - 1))), upd.values[k], v)
                  for k, v in state.items()}  # fmt: skip
        arrays = encode(client, nm, nm.train_mask(upd.rows["fc.weight"]), table)
        metrics = {"num-examples": int(NOVA_WEIGHTS[i]), "local-epochs": 1}
        if i != 2:  # node 2 declares nothing: the server's count stands
            metrics["local-steps"] = NOVA_STEPS[i]
        replies.append(reply(msg, to_array_record(arrays), metrics))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_rejected == {}
    from fedneq.federation.wire import unpack_model

    out = unpack_model(arrays)
    assert col(out, "fc.weight") == [5.125, 5.0, 4.0]
    # a reply that declares other steps than the server counts is rejected
    liar = reply(msgs[0], replies[0].content["arrays"], {"num-examples": 1, "local-epochs": 1, "local-steps": 3})
    strategy.aggregate_train(2, [liar, *replies[1:]])
    assert "server counts 1" in strategy.last_rejected[0]


# --- FedAdam / FedYogi ------------------------------------------------------------------------

# equal weights; sparse-fedavg's pseudo-gradient (W = 3): weight row 0 deltas (2, 4, 0) -> 2,
# row 1 delta 3 from client 0 alone -> 1, row 2 untouched; bias row 0 deltas (1, 1, 1) -> 1,
# row 1 delta 0 -> 0
ADAPTIVE_UPDATES = [
    update({0: (3.0, 1.0), 1: (5.0, 0.0)}),
    update({0: (5.0, 1.0)}),
    update({0: (1.0, 1.0)}),
]
HYPER = {"eta": 0.1, "beta1": 0.5, "beta2": 0.5, "tau": 0.5}  # v starts at tau^2 = 0.25


def step_value(g: float, m: float, v: float) -> float:
    return g + 0.1 * m / (math.sqrt(v) + 0.5)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_adaptive_server_two_rounds_by_hand(cls) -> None:
    _, state, nm, table = linear3()
    strategy = cls(nm, table, **HYPER)
    out = strategy.aggregate(state, ADAPTIVE_UPDATES, [1.0, 1.0, 1.0])
    # m = 0.5 * delta; Adam v = 0.5*0.25 + 0.5*delta^2; Yogi v = 0.25 - 0.5*delta^2*sign(0.25 - delta^2)
    if cls is FedAdam:
        v_w = [0.125 + 0.5 * 4, 0.125 + 0.5 * 1, 0.25]
        v_b = [0.125 + 0.5 * 1, 0.125, 0.25]
    else:
        v_w = [0.25 + 0.5 * 4, 0.25 + 0.5 * 1, 0.25]
        v_b = [0.25 + 0.5 * 1, 0.25, 0.25]
    m_w, m_b = [1.0, 0.5, 0.0], [0.5, 0.0, 0.0]
    assert col(out, "fc.weight") == [step_value(1, 1.0, v_w[0]), step_value(2, 0.5, v_w[1]), 3.0]
    assert col(out, "fc.bias") == [step_value(0, 0.5, v_b[0]), 0.0, 0.0]
    moments = strategy.state_dict()
    assert col(moments, "m/fc.weight") == m_w and col(moments, "v/fc.weight") == v_w
    assert col(moments, "m/fc.bias") == m_b and col(moments, "v/fc.bias") == v_b
    # round 2: only row 2 is trained (delta 3, one client): rows 0, 1 keep their value and moments
    again = strategy.aggregate(out, [update({2: (6.0, 0.0)})], [1.0])
    v2 = 0.125 + 0.5 * 9 if cls is FedAdam else 0.25 + 0.5 * 9
    first = [float(x) for x in out["fc.weight"].flatten()]
    assert col(again, "fc.weight") == [*first[:2], step_value(3, 1.5, v2)]
    after = strategy.state_dict()
    assert col(after, "m/fc.weight") == [1.0, 0.5, 1.5] and col(after, "v/fc.weight") == [*v_w[:2], v2]
    # the moments round-trip through a checkpoint
    twin = cls(nm, table, **HYPER)
    twin.load_state_dict(after)
    assert all(torch.equal(twin.state_dict()[k], after[k]) for k in after)
    with pytest.raises(ValueError, match="in pairs"):
        twin.load_state_dict({"m/fc.weight": after["m/fc.weight"]})


def test_adaptive_server_on_the_senders_mean_and_bad_options() -> None:
    _, state, nm, table = linear3()
    out = FedAdam(nm, table, average="neuron-avg", **HYPER).aggregate(state, ADAPTIVE_UPDATES, [1.0, 1.0, 1.0])
    # row 1's pseudo-gradient is its sender's whole delta 3: m = 1.5, v = 0.125 + 4.5
    assert float(out["fc.weight"][1, 0]) == pytest.approx(step_value(2, 1.5, 4.625))
    for bad, message in (({"eta": 0}, "eta must be"), ({"beta1": 1.0}, "beta1 must be"),
                         ({"beta2": 0}, "beta2 must be"), ({"tau": -1}, "tau must be"),
                         ({"average": "mean"}, "average should be")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            FedYogi(nm, table, **bad)


# --- label split ------------------------------------------------------------------------------

# clients hold labels {0, 1}, {1, 2}, {2}; weights 1, 2, 3; each sends every head row
LABELS = ({0, 1}, {1, 2}, {2})
LABEL_WEIGHTS = [1.0, 2.0, 3.0]


def label_updates(client1_sends_row1: bool = True) -> list[SparseUpdate]:
    c1 = {0: (40.0, 4.0), 2: (60.0, 6.0)} | ({1: (50.0, 5.0)} if client1_sends_row1 else {})
    return [
        update({0: (10.0, 1.0), 1: (20.0, 2.0), 2: (30.0, 3.0)}),
        update(c1),
        update({0: (70.0, 7.0), 1: (80.0, 8.0), 2: (90.0, 9.0)}),
    ]


def test_label_split_by_hand_for_neuron_avg_and_sparse_fedavg() -> None:
    _, state, nm, table = linear3()
    split = NeuronAvg(nm, table, label_split=True)
    split.set_server_inputs(head_tensors=HEAD)
    out = split.aggregate_replies(state, label_updates(), LABEL_WEIGHTS, facts(labels=LABELS))
    # row 0: client 0 alone -> 10; row 1: (1*20 + 2*50) / 3 = 40; row 2: (2*60 + 3*90) / 5 = 78
    assert col(out, "fc.weight") == [10.0, 40.0, 78.0]
    assert col(out, "fc.bias") == [1.0, 4.0, 7.8]
    plain = NeuronAvg(nm, table).aggregate(state, label_updates(), LABEL_WEIGHTS)
    # every client counts: row 1 (1*20 + 2*50 + 3*80) / 6 = 60
    assert col(plain, "fc.weight") == [50.0, 60.0, 70.0]
    # sparse-fedavg: a row's round mean is over its holders; client 1 holds label 1 but did not
    # send row 1 -> (1*20 + 2*2) / 3 = 8, where neuron-avg takes client 0's 20
    sparse = SparseFedAvg(nm, table, label_split=True)
    sparse.set_server_inputs(head_tensors=HEAD)
    out = sparse.aggregate_replies(state, label_updates(False), LABEL_WEIGHTS, facts(labels=LABELS))
    assert col(out, "fc.weight") == [10.0, 8.0, 78.0]
    # a client whose labels the server does not know counts for every row
    out = split.aggregate_replies(state, label_updates(), LABEL_WEIGHTS, facts(labels=(None, *LABELS[1:])))
    assert out["fc.weight"].flatten()[:2].tolist() == [10.0, 40.0]


def test_label_split_for_heterofl_element_blocks() -> None:
    _, state, nm, table = linear3()
    blocks = []
    for u in label_updates():  # the same rows as element blocks (every column of a sent row)
        elements = {k: u.rows[k].view(-1, *([1] * (state[k].dim() - 1))).expand(state[k].shape).clone() for k in u.rows}
        blocks.append(SparseUpdate(u.values, u.rows, elements))
    strategy = HeteroFL(nm, table, label_split=True)
    strategy.set_server_inputs(head_tensors=HEAD)
    out = strategy.aggregate_replies(state, blocks, LABEL_WEIGHTS, facts(labels=LABELS))
    assert col(out, "fc.weight") == [10.0, 40.0, 78.0]
    off = HeteroFL(nm, table)
    off.set_server_inputs(head_tensors=HEAD)
    assert off.aggregate_replies(state, blocks, LABEL_WEIGHTS, facts(labels=LABELS))["fc.weight"][0, 0] == 50.0
    # a head row nobody holding its label sent is dropped from the update
    only = split_labels([blocks[2]], [frozenset({2})], HEAD)[0]
    assert only.rows["fc.weight"].tolist() == [False, False, True]
    assert only.elements["fc.weight"].flatten().tolist() == [False, False, True]
    with pytest.raises(ValueError, match="not rows of a classifier head"):
        split_labels([blocks[0]], [frozenset({5})], HEAD)


# --- coverage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "switch"), [(NeuronAvg, "fednova"), (NeuronAvg, "label_split"),
                                              (SparseFedAvg, "fednova"), (HeteroFL, "label_split")])
def test_a_subclass_aggregate_runs_unless_a_switch_needs_the_reply_facts(base, switch) -> None:
    """A plug-in that overrides only ``aggregate`` is what runs; a facts switch takes over."""
    _, state, nm, table = linear3()

    class Keep(base):
        def aggregate(self, global_state, updates, weights):
            return {k: v.clone() for k, v in global_state.items()}

    off, on = Keep(nm, table), Keep(nm, table, **{switch: True})
    for strategy in (off, on):
        strategy.set_server_inputs(head_tensors=HEAD)
    assert (off.uses_reply_facts, on.uses_reply_facts) == (False, True)
    assert base(nm, table).uses_reply_facts is False
    updates, given = label_updates(), facts(steps=NOVA_STEPS, labels=LABELS)
    kept = off.aggregate_replies(state, updates, LABEL_WEIGHTS, given)
    assert all(torch.equal(kept[k], state[k]) for k in state)  # the subclass's own rule
    moved = on.aggregate_replies(state, updates, LABEL_WEIGHTS, given)
    assert not torch.equal(moved["fc.weight"], state["fc.weight"])  # the facts-aware built-in rule


def test_coverage_counts_on_a_crafted_round() -> None:
    state = {"w": torch.zeros(3, 2), "a": torch.zeros(2, 2), "b": torch.zeros(4)}
    rows = lambda *r: torch.tensor(r)  # noqa: E731
    u0 = SparseUpdate({}, {"w": rows(True, True, False), "b": rows(True, False, False, False),
                           "a": rows(True, False)},
                      {"a": torch.tensor([[True, False], [False, False]])})  # fmt: skip
    u1 = SparseUpdate({}, {"w": rows(True, False, False), "a": rows(True, True)},
                      {"a": torch.tensor([[True, True], [False, True]])})  # fmt: skip
    u2 = SparseUpdate({}, {"w": rows(True, True, True), "a": rows(False, True)})  # neuron rows of "a"
    counts = coverage_counts([u0, u1, u2], state, ["w", "a", "b"])
    assert counts["w"].tolist() == [3, 2, 1]
    assert counts["a"].tolist() == [[2, 1], [1, 2]]
    assert counts["b"].tolist() == [1, 0, 0, 0]
    by_key = {c.tensor: c for c in coverage([u0, u1, u2], state, ["w", "a", "b", "w"])}
    assert list(by_key) == ["w", "a", "b"]
    w, a, b = by_key["w"], by_key["a"], by_key["b"]
    assert (w.elements, w.clients, w.min, w.median, w.mean, w.max, w.uncovered) == (6, 3, 1, 2.0, 2.0, 3, 0.0)
    assert (a.min, a.median, a.mean, a.max, a.uncovered) == (1, 1.5, 1.5, 2, 0.0)
    assert (b.min, b.median, b.mean, b.max, b.uncovered) == (0, 0.0, 0.25, 1, 0.75)


# --- equal local steps ------------------------------------------------------------------------


def test_local_work_counts_passes_and_steps() -> None:
    assert local_work(44, 8, 2) == (2, 12)  # 6 steps a pass
    assert local_work(44, 44, 1, steps=6) == (6, 6)  # a phone's 1 step a pass, 6 passes
    assert local_work(44, 8, 1, steps=6) == (1, 6)
    assert local_work(44, 8, 3, steps=8) == (2, 8)  # the second pass cut after 2 steps
    with pytest.raises(ValueError, match="steps >= 0"):
        local_work(44, 8, 1, steps=-1)


def test_train_masked_takes_exactly_the_steps_asked_for() -> None:
    model, state, nm, _ = linear3()
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(10, 1, 1, 1, generator=g), torch.randint(0, 3, (10,), generator=g))
    masks: list[int] = []

    def mask(epoch: int):
        masks.append(epoch)
        return nm.train_mask(torch.ones(3, dtype=torch.bool))

    result = train_masked(model, data, neuron_map=nm, masks=mask, epochs=5, batch_size=4, steps=7,
                          optimizer=OptimizerConfig(momentum=0.0), generator=g, backward="masked")  # fmt: skip
    # 3 steps a pass (4 + 3 + 3 examples): passes of 3, 3, 1 steps, a mask for each
    assert [e.steps for e in result.epochs] == [3, 3, 1] and result.steps == 7 and masks == [0, 1, 2]
    assert [e.examples for e in result.epochs] == [10, 10, 4]
    plain = train_masked(model, data, neuron_map=nm, masks=mask, epochs=2, batch_size=4,
                         optimizer=OptimizerConfig(momentum=0.0), generator=g, backward="masked")  # fmt: skip
    assert plain.steps == 6 and len(plain.epochs) == 2
    with pytest.raises(ValueError, match="steps should be an int"):
        train_masked(model, data, neuron_map=nm, masks=mask, steps=-2, generator=g)
