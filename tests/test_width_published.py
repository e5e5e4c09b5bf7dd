"""The width baselines as published: HeteroFL's static BatchNorm, FedRolex's step, FjORD's
sampling, and the server's per-capacity scoring (sims.server.capacity), on tiny models."""

from __future__ import annotations

import collections

import pytest
import torch
from helpers import WIDTH_MODELS, WIDTH_SHAPES, randomized
from torch import nn

from fedneq.data.arrays import ArrayDataset
from fedneq.federation.protocol import WIDTH_KEY, WIDTH_OPTIONS_KEY
from fedneq.federation.width_client import (
    WidthOptions,
    fjord_levels,
    ordered_dropout,
    width_plan,
)
from fedneq.training.evaluation import evaluate
from fedneq.training.static_bn import query_statistics, untrack_statistics
from fedneq.training.submodel import extract_submodel, plan_channels


def column_data(values: list[float]) -> ArrayDataset:
    x = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return ArrayDataset(x, torch.zeros(len(values), dtype=torch.int64))


def test_query_pass_is_the_cumulative_average_of_batch_statistics_hand_computed() -> None:
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten())
    data = column_data([1.0, 3.0, 5.0, 9.0])
    two = query_statistics(model, data, batch_size=2)
    bn = two[0]
    # batch means 2 and 7 -> 4.5; unbiased batch variances 2 and 8 -> 5
    assert bn.running_mean.item() == pytest.approx(4.5)
    assert bn.running_var.item() == pytest.approx(5.0)
    assert not two.training and bn.momentum == model[0].momentum  # eval mode, momentum restored
    assert model[0].running_mean.item() == 0.0 and model[0].training  # the model itself untouched
    one = query_statistics(model, data, batch_size=4)[0]
    assert one.running_mean.item() == pytest.approx(4.5)
    assert one.running_var.item() == pytest.approx(35.0 / 3.0)  # (3.5² + 1.5² + 0.5² + 4.5²) / 3
    # a last batch of one is folded into the one before: [1, 3] and [5, 9, 11]
    folded = query_statistics(model, column_data([1.0, 3.0, 5.0, 9.0, 11.0]), batch_size=2)[0]
    assert folded.running_mean.item() == pytest.approx((2.0 + 25.0 / 3.0) / 2)
    assert folded.running_var.item() == pytest.approx((2.0 + 28.0 / 3.0) / 2)
    with pytest.raises(ValueError, match="batch_size"):
        query_statistics(model, data, batch_size=1)


def test_untracked_batchnorm_uses_batch_statistics_and_keeps_its_buffers() -> None:
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten())
    model[0].running_mean.fill_(100.0)
    assert untrack_statistics(model) == 1
    model.train()
    out = model(column_data([1.0, 3.0, 5.0, 9.0]).x)
    # (x - 4.5) / sqrt(biased variance 8.75 + eps)
    expected = (torch.tensor([1.0, 3.0, 5.0, 9.0]) - 4.5) / torch.sqrt(torch.tensor(8.75 + 1e-5))
    assert torch.allclose(out.flatten(), expected, atol=1e-6)
    assert model[0].running_mean.item() == 100.0 and model[0].running_var.item() == 1.0


@pytest.mark.parametrize("server_round", [1, 2, 3, 7])
def test_fedrolex_step_minus_one_is_the_codes_torch_roll(server_round: int) -> None:
    model = nn.Sequential(nn.Conv2d(1, 5, 1), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 3))
    code = torch.roll(torch.arange(5), server_round - 1)[:2]  # FedRolex: roll = rounds % C, k = ceil(0.4 * 5)
    rows = width_plan(model, "fedrolex", 0.4, server_round, roll_step=-1).slices["0"].rows
    assert torch.equal(rows, code)
    forward = width_plan(model, "fedrolex", 0.4, server_round).slices["0"].rows
    assert torch.equal(forward, (torch.arange(2) + server_round - 1) % 5)
    static = width_plan(model, "fedrolex", 0.4, server_round, roll_step=0).slices["0"].rows
    assert torch.equal(static, torch.arange(2))  # no rolling: HeteroFL's prefix
    assert torch.equal(width_plan(model, "heterofl", 0.4, server_round).slices["0"].rows, torch.arange(2))


def test_width_options_travel_only_when_set() -> None:
    from helpers import width_cnn

    from strategies import get_strategy

    _, nm, state, table = width_cnn()
    plain = get_strategy("fedrolex", neuron_map=nm, table=table, reference_state=state)
    assert plain.train_config(3) == {WIDTH_KEY: "fedrolex"}  # the messages of before
    rolled = get_strategy("fedrolex", neuron_map=nm, table=table, reference_state=state,
                          roll_step=-1, static_bn=True)  # fmt: skip
    sent = rolled.train_config(3)
    assert WidthOptions.from_json(str(sent[WIDTH_OPTIONS_KEY])) == WidthOptions(True, -1)
    assert WidthOptions.from_json("") == WidthOptions()
    with pytest.raises(ValueError, match="roll_step is an option of fedrolex only"):
        get_strategy("heterofl", neuron_map=nm, table=table, roll_step=2)
    with pytest.raises(ValueError, match="static_bn should be true or false"):
        get_strategy("fjord", neuron_map=nm, table=table, static_bn=1)
    with pytest.raises(ValueError, match="width options"):
        WidthOptions.from_json('{"overlap": 0.5}')


def test_fjord_draws_its_levels_uniformly_once_per_training_batch() -> None:
    full = randomized(WIDTH_MODELS["small-cnn"]())
    plan = plan_channels(full, 0.5, head="head")
    sub = extract_submodel(full, plan)
    levels = fjord_levels(0.5)
    assert levels == (0.2, 0.4, 0.5)  # FjORD's levels up to the device's width, and the width
    x = torch.randn(2, *WIDTH_SHAPES["small-cnn"])
    gen = torch.Generator().manual_seed(0)
    sub.train()
    with ordered_dropout(sub, full, plan, levels, gen, "head") as drawn:
        for _ in range(150):
            sub(x)
        with torch.no_grad():
            sub(x)  # an evaluation forward draws nothing
    assert len(drawn) == 150
    counts = collections.Counter(drawn)  # 50 each expected, sd 5.8
    assert set(counts) == set(levels) and all(30 <= c <= 70 for c in counts.values())


def test_width_submodel_scoring_hand_computed() -> None:
    from sims.server.capacity import WidthEvaluator, capacity_column

    model = randomized(WIDTH_MODELS["small-cnn"]())
    gen = torch.Generator().manual_seed(1)
    test = ArrayDataset(torch.randn(24, *WIDTH_SHAPES["small-cnn"], generator=gen),
                        torch.randint(0, 5, (24,), generator=gen))  # fmt: skip
    query = ArrayDataset(torch.randn(40, *WIDTH_SHAPES["small-cnn"], generator=gen),
                         torch.zeros(40, dtype=torch.int64))  # fmt: skip
    plain = WidthEvaluator("fedrolex", WidthOptions(roll_step=-1), (1.0, 0.5), None, "head")
    accs = plain.width_accuracy(model, test, 3, widths=(0.25,))
    sub = extract_submodel(model, width_plan(model, "fedrolex", 0.25, 3, "head", roll_step=-1))
    assert accs[0.25] == evaluate(sub, test)[1]
    assert accs[1.0] == evaluate(model, test)[1]
    assert plain.columns == (capacity_column(1.0), capacity_column(0.5)) == ("accuracy_w1", "accuracy_w0.5")
    static = WidthEvaluator("heterofl", WidthOptions(static_bn=True), (0.5,), query, "head")
    sub = extract_submodel(model, width_plan(model, "heterofl", 0.5, 3, "head"))
    assert static.width_accuracy(model, test, 3)[0.5] == evaluate(query_statistics(sub, query), test)[1]
    assert static.evaluate(model, test) == evaluate(query_statistics(model, query), test)


def test_recorder_appends_extra_columns(tmp_path) -> None:
    from sims.server.results import ROUND_COLUMNS, Recorder, read_csv

    rec = Recorder(tmp_path, {}, {"rounds.csv": ("accuracy_w0.5",)})
    rec.add("rounds.csv", [{"round": 1, "accuracy": 0.5, "accuracy_w0.5": 0.25}])
    rec.flush()
    rows = read_csv(tmp_path / "rounds.csv")
    assert list(rows[0]) == [*ROUND_COLUMNS, "accuracy_w0.5"] and rows[0]["accuracy_w0.5"] == "0.25"
    with pytest.raises(ValueError, match="extra_columns names table"):
        Recorder(tmp_path, {}, {"round.csv": ("x",)})


@pytest.mark.slow
def test_static_bn_client_trains_on_batch_statistics_and_sends_none() -> None:
    from fedneq.federation.client import _runtime, client_round
    from fedneq.federation.devices import DeviceProfile
    from fedneq.federation.wire import decode
    from sims.server.config_files import load_cli_config

    config = load_cli_config("default", ["model.pretrain_epochs=0", "fleet.local_epochs=1",
                                         'train.bn_stats="all"'])  # fmt: skip
    rt = _runtime(config.to_json())
    state = {k: v.clone() for k, v in rt.model.state_dict().items()}
    shifted = {k: v + 3.0 if k.endswith("running_mean") else v.clone() for k, v in state.items()}
    device = DeviceProfile("half", budget=0.3, batch_size=8)
    static = WidthOptions(static_bn=True).to_json()

    def update(global_state, options=""):
        reply = client_round(config, 0, 2, global_state, None, device=device, width="heterofl",
                             width_options=options)  # fmt: skip
        return decode(reply.arrays, rt.neuron_map, rt.table, global_state).values

    a, b = update(state, static), update(shifted, static)
    assert not any("running" in k for k in a)  # no statistic is sent
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # batch statistics only
    tracked = update(state)  # bn_stats = "all" without static BatchNorm: statistics travel
    assert any(k.endswith("running_mean") for k in tracked)


def test_device_costs_score_each_class_by_the_model_it_runs() -> None:
    from sims.compare import device_costs

    def row(device, width):
        return {"round": 2, "device": device, "status": "ok", "width": width}

    final = {"round": "2", "accuracy": "0.8", "accuracy_w1": "0.8", "accuracy_w0.25": "0.55"}
    costs = device_costs("heterofl", [row("mcu", "0.25"), row("phone", "1")], final)
    assert {c["device"]: c["own_accuracy"] for c in costs} == {"mcu": 0.55, "phone": 0.8}
    masks = device_costs("velocity", [row("mcu", "")], final)  # a mask device runs the global model
    assert masks[0]["own_accuracy"] == 0.8
    assert device_costs("velocity", [row("mcu", "")])[0]["own_accuracy"] != 0.8  # NaN without final


def test_frontier_scores_a_width_device_by_its_own_sub_model() -> None:
    from fedneq.config import Config
    from sims.frontier import device_accuracy

    config = Config().replace(fleet={"preset": "default"}, run={"num_clients": 20, "seed": 0})
    names = [d.name for d in config.fleet.fleet().assign(20, 0)]
    widths = {"mcu": "0.1", "pi-zero": "0.2", "pi-4": "0.5", "phone": "1"}
    clients = [{"device": n, "width": w} for n, w in widths.items()]
    final = {"accuracy": "0.9", "accuracy_w1": "0.9", "accuracy_w0.5": "0.7",
             "accuracy_w0.2": "0.4", "accuracy_w0.1": "0.2"}  # fmt: skip
    own = {"mcu": 0.2, "pi-zero": 0.4, "pi-4": 0.7, "phone": 0.9}
    local, narrowest = device_accuracy(config, final, clients)
    assert local == pytest.approx(sum(own[n] for n in names) / len(names)) and narrowest == 0.2
    assert device_accuracy(config, final, [{"device": "mcu", "width": ""}]) == (0.9, 0.9)
