"""Width sub-models (HeteroFL, FjORD, FedRolex): extraction, element blocks, aggregation, client."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from helpers import LocalGrid

from fedneq.federation.wire import (
    SparseUpdate,
    WireFormatError,
    decode,
    encode,
    encode_blocks,
    full_mask,
    pack_model,
    tensor_table,
    to_array_record,
    unpack_model,
    wire_format,
)
from fedneq.models import get_model
from fedneq.neurons import enumerate_neurons
from fedneq.training.submodel import (
    Block,
    ChannelMask,
    dropped_keep,
    extract_submodel,
    kept_channels,
    nested_keep,
    plan_channels,
    submodel_blocks,
    submodel_params,
    width_for_budget,
    write_back,
)
from strategies.budget import trained_params
from strategies.neuron_avg import NeuronAvg
from strategies.registry import get_strategy
from strategies.width_avg import FedRolex, HeteroFL, element_average

pytestmark = pytest.mark.usefixtures("task_identity")


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BatchNorm statistics (so a dropped channel would show), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not torch.is_floating_point(t):
                continue
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
    return model.eval()


MODELS = {
    "small-cnn": lambda: get_model("small-cnn", num_classes=5, in_channels=1),
    "mobilenet_v2": lambda: get_model("mobilenet_v2", num_classes=5, in_channels=3, width_mult=0.35),
}
SHAPES = {"small-cnn": (1, 8, 8), "mobilenet_v2": (3, 32, 32)}


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    return request.param, randomized(MODELS[request.param]())


# --- extraction ------------------------------------------------------------------


@pytest.mark.parametrize(("width", "shift"), [(0.5, 0), (0.3, 5), (0.75, 13), (1.0, 0)])
def test_submodel_equals_full_model_with_dropped_channels_zeroed(model_case, width, shift) -> None:
    name, model = model_case
    x = torch.randn(3, *SHAPES[name], generator=torch.Generator().manual_seed(1))
    plan = plan_channels(model, width, shift)
    sub = extract_submodel(model, plan)
    with torch.no_grad():
        y_sub = sub(x)
        with ChannelMask(model, dropped_keep(model, plan)):
            y_masked = model(x)
        y_full = model(x)  # hooks removed: the full model again
    assert y_sub.shape == (3, 5)
    torch.testing.assert_close(y_sub, y_masked, rtol=1e-4, atol=1e-5)
    if width < 1:
        assert not torch.allclose(y_sub, y_full, atol=1e-3)  # the dropped channels mattered
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    else:
        torch.testing.assert_close(y_sub, y_full)


def test_submodel_is_really_smaller_and_slices_depthwise_convs() -> None:
    model = randomized(MODELS["mobilenet_v2"]())
    plan = plan_channels(model, 0.5)
    sub = extract_submodel(model, plan)
    full_dw, sub_dw = model.features[2].conv[1][0], sub.features[2].conv[1][0]  # depthwise 3x3
    assert full_dw.groups == full_dw.in_channels > 1
    assert sub_dw.groups == sub_dw.in_channels == sub_dw.out_channels == -(-full_dw.out_channels // 2)
    assert sub.features[0][0].in_channels == 3  # the image keeps every channel
    assert sub.classifier[1].out_features == 5  # and the classes
    by_prefix = plan_channels(model, 0.5, head="classifier")  # the head as the config names it
    assert by_prefix.slices["classifier.1"].rows.tolist() == list(range(5))
    with pytest.raises(ValueError, match="names no Conv2d"):
        plan_channels(model, 0.5, head="fc")
    assert submodel_params(model, plan) == sum(p.numel() for p in sub.parameters())
    assert model.training is False and sub.training is False


def test_extraction_update_write_back_round_trip(model_case) -> None:
    _, model = model_case
    full = model.state_dict()
    plan = plan_channels(model, 0.4, 3)
    sub = extract_submodel(model, plan)
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)  # a local update of every sub-model parameter
    keys = [k for k, _ in sub.named_parameters()]
    blocks = submodel_blocks(sub.state_dict(), plan, keys)
    new = write_back(full, blocks)
    changed = 0
    for key, value in new.items():
        diff = value - full[key] if value.is_floating_point() else None
        if key in blocks:
            rows, cols = plan.indices(key)
            touched = torch.zeros(value.shape, dtype=torch.bool)
            if cols is None:
                touched[rows] = True
            else:
                touched[rows[:, None], cols[None, :]] = True
            torch.testing.assert_close(diff[touched], torch.ones(int(touched.sum())))
            assert bool((diff[~touched] == 0).all())  # the other elements are unchanged
            changed += int(touched.sum())
        else:
            assert torch.equal(value, full[key])
    assert changed == sum(p.numel() for p in sub.parameters())
    # extracting the same plan from the written-back model gives the trained sub-model back
    again = extract_submodel(_with_state(model, new), plan).state_dict()
    for key, value in sub.state_dict().items():
        assert torch.equal(again[key], value), key


def _with_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone


def test_fedrolex_window_wraps_and_advances() -> None:
    assert kept_channels(8, 0.5).tolist() == [0, 1, 2, 3]
    assert kept_channels(8, 0.5, shift=6).tolist() == [6, 7, 0, 1]  # wraps around
    assert kept_channels(8, 0.5, shift=7).tolist() == [7, 0, 1, 2]  # one step per round
    assert kept_channels(8, 0.5, shift=14).tolist() == kept_channels(8, 0.5, shift=6).tolist()
    seen = set()
    for r in range(8):
        seen |= set(kept_channels(8, 0.25, shift=r).tolist())
    assert seen == set(range(8))  # the window rolls over every channel
    assert kept_channels(10, 0.01).tolist() == [0]  # at least one channel
    assert kept_channels(10, 0.31).tolist() == [0, 1, 2, 3]  # ceil(p * C)
    with pytest.raises(ValueError, match="width should be in"):
        kept_channels(8, 0.0)


def test_width_for_budget_is_the_largest_width_that_fits() -> None:
    model = MODELS["mobilenet_v2"]()
    nm = enumerate_neurons(model, always_trained=("classifier",))
    names = [k for layer in nm.layers for k in layer.param_tensors]
    full = nm.selectable_params
    assert submodel_params(model, plan_channels(model, 1.0), names) == full
    for fraction in (0.01, 0.05, 0.2, 0.5):
        budget = int(fraction * full)
        p = width_for_budget(model, nm, budget)
        assert submodel_params(model, plan_channels(model, p), names) <= budget
        assert submodel_params(model, plan_channels(model, p + 0.001), names) > budget
        # parameters ~ p^2 of the full model; a little narrower, as ceil(p * C) rounds up
        assert 0.6 * fraction**0.5 <= p <= fraction**0.5
    assert width_for_budget(model, nm, full) == 1.0


def test_nested_keep_and_refusals() -> None:
    model = MODELS["small-cnn"]()
    keep = nested_keep(plan_channels(model, 0.5), plan_channels(model, 0.25))
    assert keep["features.2.0"].tolist() == [True] * 16 + [False] * 16
    with pytest.raises(ValueError, match="the outer one drops"):
        nested_keep(plan_channels(model, 0.25), plan_channels(model, 0.5))
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        plan_channels(grouped, 0.5)
    normed = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="LayerNorm"):
        plan_channels(normed, 0.5)


# --- the wire's element blocks -------------------------------------------------------


@pytest.fixture(scope="module")
def cnn():
    model = randomized(MODELS["small-cnn"]())
    state = model.state_dict()
    return model, enumerate_neurons(model, always_trained=("head",), statistics=False), state, tensor_table(state)


def test_block_wire_round_trip(cnn) -> None:
    model, nm, state, table = cnn
    plan = plan_channels(model, 0.5, 7)
    sub = extract_submodel(model, plan)
    keys = [k for k, _ in sub.named_parameters()]
    blocks = submodel_blocks(sub.state_dict(), plan, keys)
    arrays = encode_blocks(blocks, table, state)
    assert wire_format(arrays) == "blocks"
    update = decode(arrays, nm, table, state)
    expected = write_back(state, blocks)
    assert set(update.values) == set(keys)
    for key in keys:
        assert torch.equal(update.values[key], expected[key])
        assert int(update.elements[key].sum()) == sub.state_dict()[key].numel()
        assert torch.equal(update.rows[key], update.elements[key].flatten(1).any(1) if state[key].dim() > 1 else update.elements[key])
    # the budget counts the neuron layers' elements sent; the head is outside it
    selectable = sum(sub.state_dict()[k].numel() for k in keys if not k.startswith("head."))
    assert trained_params(arrays, nm, table, state) == selectable
    # the bytes sent: every value, every row and column index, 3 ints per tensor (id, counts)
    values = sum(sub.state_dict()[k].numel() for k in keys)
    indices = sum(len(b.rows) + (0 if b.cols is None else len(b.cols)) + 3 for b in blocks.values())
    assert sum(a.nbytes for a in arrays.values()) == 4 * (values + indices)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(block_rows=a["block_rows"][::-1].copy()), "strictly ascending"),
        (lambda a: a.update(block_cols=a["block_cols"] + 100), "allowed range"),
        (lambda a: a.update(block_values=a["block_values"][:-1].copy()), "values, expected"),
        (lambda a: a["block_values"].__setitem__(0, np.nan), "non-finite"),
        (lambda a: a.update(block_tensors=a["block_tensors"].astype(np.int64)), "dtype int32"),
        (lambda a: a.update(block_row_counts=a["block_row_counts"][:-1].copy()), "entries for"),
        (lambda a: a.pop("block_cols"), "reply keys must be exactly"),
    ],
)
def test_block_wire_validation(cnn, change, message) -> None:
    model, nm, state, table = cnn
    plan = plan_channels(model, 0.5)
    blocks = submodel_blocks(extract_submodel(model, plan).state_dict(), plan, ["features.0.0.weight", "features.0.1.bias"])
    arrays = encode_blocks(blocks, table, state)
    change(arrays)
    with pytest.raises(WireFormatError, match=message):
        decode(arrays, nm, table, state)


def test_block_wire_refuses_columns_on_a_vector(cnn) -> None:
    _, nm, state, table = cnn
    arrays = encode_blocks(
        {"features.0.1.bias": Block(torch.tensor([0, 2]), None, torch.tensor([1.0, 2.0]))}, table, state
    )
    arrays["block_col_counts"] = np.array([1], dtype=np.int32)
    arrays["block_cols"] = np.array([0], dtype=np.int32)
    with pytest.raises(WireFormatError, match="takes no columns"):
        decode(arrays, nm, table, state)


# --- aggregation -----------------------------------------------------------------------


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


# --- the client ----------------------------------------------------------------------------


def test_width_client_trains_a_smaller_model_with_less_measured_memory() -> None:
    from fedneq.federation.client import _runtime, client_round
    from fedneq.federation.devices import DeviceProfile
    from sims.cli import load_cli_config

    config = load_cli_config("default", ["model.pretrain_epochs=0", "fleet.local_epochs=1"])
    rt = _runtime(config.to_json())
    state = {k: v.clone() for k, v in rt.model.state_dict().items()}
    replies = {}
    for name, budget in (("small", 0.05), ("full", 1.0)):
        device = DeviceProfile(name, budget=budget, batch_size=16)
        replies[name] = client_round(config, 0, 2, state, None, device=device, width="fedrolex")
    small, full = replies["small"].metrics, replies["full"].metrics
    assert small["width"] < 0.3 and full["width"] == 1.0
    assert small["memory-measured-bytes"] < full["memory-measured-bytes"] / 2
    assert small["memory-estimate-bytes"] < full["memory-estimate-bytes"]
    assert small["train-flops"] < full["train-flops"] / 4 and small["flops-saved"] > 0.7
    assert small["upload-bytes"] < full["upload-bytes"] / 4
    update = decode(replies["small"].arrays, rt.neuron_map, rt.table, state)
    assert trained_params(replies["small"].arrays, rt.neuron_map, rt.table, state) <= small["budget-params"]
    moved = [k for k in update.values if not torch.equal(update.values[k], state[k])]
    assert moved  # it trained


def test_device_width_honours_the_memory_limit() -> None:
    from fedneq.federation.width_client import device_width, submodel_memory_bytes

    model = MODELS["mobilenet_v2"]()
    memory = functools.partial(
        submodel_memory_bytes, model, image_shape=(3, 32, 32), batch_size=16,
        optimizer="sgd-momentum", head="classifier", always_trained=("classifier",),
        statistics=True,
    )  # fmt: skip
    assert memory(0.25) < memory(0.5) < memory(1.0)
    assert device_width(0.7, None, memory) == (0.7, False)  # no limit: the budget decides
    assert device_width(0.7, memory(1.0), memory) == (0.7, False)  # the budget binds
    limit = (memory(0.25) + memory(0.5)) // 2
    width, bound = device_width(0.7, limit, memory)
    assert bound and 0.25 <= width < 0.5
    assert memory(width) <= limit < memory(width + 0.001)  # the widest that fits
    with pytest.raises(ValueError, match="narrowest width sub-model"):
        device_width(0.7, memory(0.001) - 1, memory)


def test_width_client_at_a_memory_limit_is_memory_bound_and_fits_it() -> None:
    from fedneq.federation.client import _runtime, client_round
    from fedneq.federation.devices import DeviceProfile
    from sims.cli import load_cli_config

    config = load_cli_config("default", ["model.pretrain_epochs=0", "fleet.local_epochs=1"])
    rt = _runtime(config.to_json())
    state = {k: v.clone() for k, v in rt.model.state_dict().items()}
    # one batch of its 10 training examples: the estimate prices the batch the peak holds
    free = client_round(
        config, 0, 2, state, None, device=DeviceProfile("free", budget=1.0, batch_size=10),
        width="heterofl",
    ).metrics  # fmt: skip
    limit = free["memory-estimate-bytes"] // 2
    device = DeviceProfile("tight", budget=1.0, batch_size=10, memory_limit_bytes=limit)
    tight = client_round(config, 0, 2, state, None, device=device, width="heterofl").metrics
    assert free["memory-bound"] == 0 and free["memory-limit-bytes"] == 0 and free["width"] == 1.0
    assert tight["memory-bound"] == 1 and tight["memory-limit-bytes"] == limit
    assert tight["width"] < 1.0
    assert tight["memory-estimate-bytes"] <= limit
    # the measured peak of the steps it trained is the estimate's, within 10 %
    assert abs(tight["memory-measured-bytes"] / tight["memory-estimate-bytes"] - 1) <= 0.1
    with pytest.raises(ValueError, match="width method should be one of"):
        client_round(config, 0, 2, state, None, device=device, width="heterofl2")


def test_compare_names_the_width_methods() -> None:
    from sims.cli import load_cli_config
    from sims.compare import method_config

    config = load_cli_config("default", [])
    for method in ("heterofl", "fjord", "fedrolex"):
        assert method_config(config, method).strategy.name == method
    with pytest.raises(ValueError, match="'heterofl'"):
        method_config(config, "heterofl2")


def test_width_strategies_tolerate_the_spread_of_update_sizes_across_widths(cnn) -> None:
    _, nm, _, table = cnn
    assert HeteroFL(nm, table).max_update_ratio == 100.0  # widths 0.08 to 1 differ 10-20x
    assert FedRolex(nm, table, max_update_ratio=None).max_update_ratio is None
    assert NeuronAvg(nm, table).max_update_ratio == 10.0
