"""strategies.width_avg: element-wise averaging of width sub-models (HeteroFL, FjORD, FedRolex)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from helpers import LocalGrid, width_cnn

from fedneq.federation.wire import (
    SparseUpdate,
    encode,
    encode_blocks,
    full_mask,
    pack_model,
    to_array_record,
    unpack_model,
)
from fedneq.neurons import enumerate_neurons
from fedneq.training.submodel import extract_submodel, plan_channels, submodel_blocks
from strategies.budget import trained_params
from strategies.neuron_avg import NeuronAvg
from strategies.registry import get_strategy
from strategies.width_avg import FedRolex, HeteroFL, element_average

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def cnn():
    return width_cnn()


def block_update(values: dict[str, torch.Tensor], elements: dict[str, torch.Tensor]) -> SparseUpdate:
    rows = {k: e.flatten(1).any(1) if e.dim() > 1 else e for k, e in elements.items()}
    return SparseUpdate(values=values, rows=rows, elements=elements)


def test_element_average_of_nested_widths_hand_computed() -> None:
    glob = {"w": torch.zeros(3, 3), "b": torch.tensor([10.0, 20.0, 30.0])}
    nan = float("nan")  # values of unsent elements are ignored
    full = torch.ones(3, 3, dtype=torch.bool)
    small = torch.zeros(3, 3, dtype=torch.bool)
    small[:1, :1] = True  # width 1/3: element (0, 0)
    medium = torch.zeros(3, 3, dtype=torch.bool)
    medium[:2, :2] = True  # width 2/3: the top-left 2 x 2 block
    w_full = torch.arange(9.0).view(3, 3)
    w_small = torch.full((3, 3), nan)
    w_small[0, 0] = 100.0
    w_medium = torch.full((3, 3), nan)
    w_medium[:2, :2] = torch.tensor([[4.0, 8.0], [12.0, 16.0]])
    updates = [
        block_update({"w": w_full, "b": torch.tensor([1.0, 2.0, 3.0])}, {"w": full, "b": torch.ones(3, dtype=torch.bool)}),
        block_update({"w": w_small}, {"w": small}),
        block_update({"w": w_medium, "b": torch.tensor([5.0, 6.0, nan])}, {"w": medium, "b": torch.tensor([True, True, False])}),
    ]
    out = element_average(glob, updates, [1.0, 2.0, 1.0])
    expected = torch.tensor(
        [
            [(0 + 2 * 100 + 4) / 4, (1 + 8) / 2, 2.0],
            [(3 + 12) / 2, (4 + 16) / 2, 5.0],
            [6.0, 7.0, 8.0],
        ]
    )
    assert torch.equal(out["w"], expected)
    assert torch.equal(out["b"], torch.tensor([3.0, 4.0, 3.0]))  # (1+5)/2, (2+6)/2, 3 alone
    # an element nobody sent keeps its global value
    assert torch.equal(element_average(glob, updates[1:2], [1.0])["w"][1], torch.zeros(3))


def block_reply(to: Message, arrays: dict, examples: int, budget: int, loss: float = 1.0) -> Message:
    metrics = {"num-examples": examples, "loss": loss, "budget-params": budget, "local-epochs": 1}
    return Message(RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=to)


def test_heterofl_at_full_width_equals_flower_fedavg(cnn) -> None:
    model, _, state, table = cnn
    nm = enumerate_neurons(model, always_trained=("head",))  # statistics travel: every tensor is sent
    g = torch.Generator().manual_seed(3)
    clients = [{k: v + torch.randn(v.shape, generator=g) if k in table else v for k, v in state.items()} for _ in range(3)]
    examples = [10, 30, 60]
    flower = FedAvg(min_train_nodes=1, min_available_nodes=1)
    msgs = sorted(flower.configure_train(1, ArrayRecord(state), ConfigRecord(), LocalGrid(range(3))), key=lambda m: m.metadata.dst_node_id)
    ref_replies = [
        Message(RecordDict({"arrays": ArrayRecord({k: c[k] for k in table}), "metrics": MetricRecord({"num-examples": n})}), reply_to=m)
        for m, c, n in zip(msgs, clients, examples, strict=True)
    ]
    ref = flower.aggregate_train(1, ref_replies)[0].to_torch_state_dict()

    strategy = HeteroFL(nm, table, min_train_nodes=1, min_available_nodes=1)
    msgs = sorted(strategy.configure_train(1, pack_model(state), ConfigRecord(), LocalGrid(range(3))), key=lambda m: m.metadata.dst_node_id)
    assert msgs[0].content["config"]["width-method"] == "heterofl"  # the client is told to train a width
    plan = plan_channels(model, 1.0)
    replies = [
        block_reply(m, encode_blocks(submodel_blocks(c, plan, table), table, state), n, nm.selectable_params)
        for m, c, n in zip(msgs, clients, examples, strict=True)
    ]
    got = unpack_model(strategy.aggregate_train(1, replies)[0])
    assert strategy.last_rejected == {}
    for key in table:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)


def test_width_strategies_reject_the_other_wire_format(cnn) -> None:
    model, nm, state, table = cnn
    plan = plan_channels(model, 0.5)
    blocks = encode_blocks(submodel_blocks(extract_submodel(model, plan).state_dict(), plan, ["features.0.0.weight"]), table, state)
    neurons = encode(state, nm, full_mask(nm), table)
    one = {"min_train_nodes": 1, "min_available_nodes": 1}
    for strategy, arrays, fmt in ((FedRolex(nm, table, **one), neurons, "neurons"), (NeuronAvg(nm, table, **one), blocks, "blocks")):
        msg = list(strategy.configure_train(1, pack_model(state), ConfigRecord(), LocalGrid([0])))[0]
        with pytest.raises(ValueError, match=f"in the '{fmt}' wire format"):
            strategy.check_reply(block_reply(msg, arrays, 5, nm.selectable_params))


def test_over_budget_width_reply_is_rejected(cnn) -> None:
    model, nm, state, table = cnn
    strategy = get_strategy(
        "fjord", neuron_map=nm, table=table, reference_state=state, min_train_nodes=1, min_available_nodes=1
    )
    msg = list(strategy.configure_train(1, pack_model(state), ConfigRecord(), LocalGrid([0])))[0]
    plan = plan_channels(model, 0.5)
    sub = extract_submodel(model, plan)
    arrays = encode_blocks(submodel_blocks(sub.state_dict(), plan, [k for k, _ in sub.named_parameters()]), table, state)
    needed = trained_params(arrays, nm, table, state)
    strategy.check_reply(block_reply(msg, arrays, 5, needed))  # fits its declared budget
    with pytest.raises(ValueError, match="more than its declared budget"):
        strategy.check_reply(block_reply(msg, arrays, 5, needed - 1))


def test_width_strategies_tolerate_the_spread_of_update_sizes_across_widths(cnn) -> None:
    _, nm, _, table = cnn
    assert HeteroFL(nm, table).max_update_ratio == 100.0  # widths 0.08 to 1 differ 10-20x
    assert FedRolex(nm, table, max_update_ratio=None).max_update_ratio is None
    assert NeuronAvg(nm, table).max_update_ratio == 10.0
