"""Gradient filtering's per-layer fallback, its cost-model pricing and its clients.csv record."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedneq.costs import mask_cost, measure_saved_bytes, profile_model
from fedneq.data.arrays import ArrayDataset
from fedneq.federation.reply_metrics import filter_metrics
from fedneq.neurons import enumerate_neurons
from fedneq.training.filter_probe import (
    FilterChoice,
    choose_filtered,
    clear_probe_cache,
)
from fedneq.training.grad_filter import GradFilterConfig, filter_pricing
from fedneq.training.loop import train_masked
from fedneq.training.masking import RowFreezer
from fedneq.training.sparse_backward import budgeted_conv2d
from sims.server.records import client_row
from sims.server.results import FILTER_COLUMNS, Recorder


def small_map_model() -> nn.Sequential:
    """A depthwise conv on a 4x4 map (2, the probe's loser at r=2) and one on a 3x3 map (5)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),  # 2: 4x4 depthwise
        nn.BatchNorm2d(16),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False),  # 4 -> 2x2: r=2 divides
        nn.Conv2d(16, 16, 2, bias=False),  # 5: 2x2 kernel without padding: never filterable
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def test_a_conv_whose_filtered_backward_is_slower_keeps_the_dense_one() -> None:
    clear_probe_cache()
    model = small_map_model()
    nmap = enumerate_neurons(model, always_trained=("8",))
    mask = nmap.train_mask(~nmap.empty_mask())
    profile = profile_model(model, nmap, (1, 4, 4))
    config = GradFilterConfig(r=2, layers=("2",), fallback="probe")
    with RowFreezer(model, nmap, mask, grad_filter=config, profile=profile, batch_size=4) as fr:
        (choice,) = fr.ops.choices
        assert choice.name == "2" and choice.reason in ("faster", "slower")
        # the probe measured the filtered backward slower here: it was not filtered
        assert choice.filtered == (choice.filtered_s <= 0.9 * choice.dense_s)
        assert not choice.filtered, f"a 4x4 depthwise conv at r=2 won: {choice}"
        assert fr.ops.filtered == () and "forward" not in model[2].__dict__
    # the same conv forced through the filter (fallback off) is filtered
    forced = GradFilterConfig(r=2, layers=("2",))
    with RowFreezer(model, nmap, mask, grad_filter=forced, profile=profile) as fr:
        assert fr.ops.filtered == ("2",)


def test_the_probe_decides_from_its_timings_and_caches_them() -> None:
    clear_probe_cache()
    conv = nn.Conv2d(8, 8, 1, bias=False)
    calls = []

    def slow(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # a real op, made slower
        calls.append(1)
        y = budgeted_conv2d(x, w, grad_filter_r=2)
        for _ in range(30):
            y = y + 0.0
        return y

    first = choose_filtered("c", conv, (8, 4, 4), (8, 4, 4), r=2, batch_size=2,
                            filtered_forward=slow, repeats=2)  # fmt: skip
    assert not first.filtered and first.reason == "slower" and first.speedup < 1
    n = len(calls)
    again = choose_filtered("c", conv, (8, 4, 4), (8, 4, 4), r=2, batch_size=2,
                            filtered_forward=slow, repeats=2)  # fmt: skip
    assert len(calls) == n and again == first  # cached: no second probe
    # a margin that no ratio meets filters nothing; one every ratio meets filters
    assert not choose_filtered("c", conv, (8, 4, 4), (8, 4, 4), r=2, batch_size=2,
                               filtered_forward=slow, margin=0.0).filtered  # fmt: skip
    assert choose_filtered("c", conv, (8, 4, 4), (8, 4, 4), r=2, batch_size=2,
                           filtered_forward=slow, margin=1e9).filtered  # fmt: skip


def test_a_conv_filtering_cannot_handle_falls_back_instead_of_failing() -> None:
    clear_probe_cache()
    model = small_map_model()
    nmap = enumerate_neurons(model, always_trained=("8",))
    mask = nmap.train_mask(~nmap.empty_mask())
    profile = profile_model(model, nmap, (1, 4, 4))
    config = GradFilterConfig(r=4, layers=("4", "5"), fallback="probe")
    with RowFreezer(model, nmap, mask, grad_filter=config, profile=profile) as fr:
        reasons = {c.name: c.reason for c in fr.ops.choices}
        assert "r=4 to divide the output height" in reasons["4"]
        assert "output height x stride == input height" in reasons["5"]
        assert fr.ops.filtered == ()
    with pytest.raises(ValueError, match="r=4 to divide"):  # fallback off: the old error
        with RowFreezer(model, nmap, mask, grad_filter=GradFilterConfig(r=4, layers=("4",))):
            model(torch.randn(2, 1, 4, 4)).sum().backward()
    with pytest.raises(ValueError, match="needs the shapes"):
        RowFreezer(model, nmap, mask, grad_filter=config)  # no profile: no shapes to probe


def test_trained_scope_filters_the_convs_the_mask_trains() -> None:
    model = small_map_model()
    nmap = enumerate_neurons(model, always_trained=("8",))
    neurons = nmap.empty_mask()
    neurons[nmap.layers[2].slice] = True  # conv "4" only
    mask = nmap.train_mask(neurons)
    config = GradFilterConfig(r=2, trained=True)
    with RowFreezer(model, nmap, mask, grad_filter=config) as fr:
        assert fr.ops.filtered == ("4",)
    with pytest.raises(ValueError, match="exactly one of last_k, layers and trained"):
        GradFilterConfig(r=2, last_k=1, trained=True)
    with pytest.raises(ValueError, match="fallback must be one of"):
        GradFilterConfig(r=2, trained=True, fallback="auto")


def test_train_masked_reports_the_filtered_convs() -> None:
    model = small_map_model()
    nmap = enumerate_neurons(model, always_trained=("8",))
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    mask = nmap.train_mask(~nmap.empty_mask())
    result = train_masked(model, data, neuron_map=nmap, masks=mask, epochs=2, batch_size=4,
                          generator=g, grad_filter=GradFilterConfig(r=2, layers=("4",)))  # fmt: skip
    assert result.filtered == ("4",) and all(e.filtered == ("4",) for e in result.epochs)
    assert filter_metrics(nmap, result.filtered) == {"filtered-layers": 1, "filtered-convs": [2]}
    plain = train_masked(model, data, neuron_map=nmap, masks=mask, batch_size=4, generator=g)
    assert plain.filtered == ()


def chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),  # keeps its input (the conv's output), not its output
        nn.Conv2d(8, 8, 3, padding=1, bias=False),  # 2: its input is kept by itself only
        nn.BatchNorm2d(8),
        nn.ReLU(),  # keeps its output: the input of conv 5 too
        nn.Conv2d(8, 8, 1, bias=False),  # 5: filtering adds a patch-mean copy
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


@pytest.mark.parametrize("layer", ["2", "5"])
def test_cost_model_prices_filtering_as_measured(layer: str) -> None:
    model = chain()
    nmap = enumerate_neurons(model, always_trained=("8",))
    mask = nmap.train_mask(~nmap.empty_mask())
    x = torch.randn(4, 3, 8, 8)
    profile = profile_model(model, nmap, (3, 8, 8))
    state = model.state_dict()
    prices = filter_pricing(model, [layer], 2)
    assert prices[layer].saved_divisor == 4
    assert prices[layer].flop_factor == (0.25 if layer == "5" else 9 / 36)
    dense = mask_cost(profile, mask, state, batch_size=4)
    filt = mask_cost(profile, mask, state, batch_size=4, grad_filter=prices)
    with RowFreezer(model, nmap, mask, grad_filter=GradFilterConfig(r=2, layers=(layer,))):
        measured = measure_saved_bytes(model, nmap, mask, x)
    assert filt.saved_activation_bytes == measured
    layer_input = 4 * 8 * 8 * 8 * 4
    change = -(layer_input - layer_input // 4) if layer == "2" else layer_input // 4
    assert filt.saved_activation_bytes - dense.saved_activation_bytes == change
    conv = profile.layers[[lay.name for lay in profile.layers].index(layer)]
    assert dense.bwd_weight_flops - filt.bwd_weight_flops == round(conv.fwd_flops * 0.75)
    assert filt.flops_saved > dense.flops_saved


def test_clients_csv_records_the_filtered_convs(tmp_path, task_identity) -> None:
    metrics = {"num-examples": 4, "filtered-layers": 2, "filtered-convs": [45, 46]}
    content = RecordDict({"arrays": ArrayRecord({}), "metrics": MetricRecord(metrics)})
    msg = Message(content, dst_node_id=1, message_type="train")
    row = client_row(1, msg, 0, "pi-zero", {}, None)
    assert row["filtered_layers"] == 2 and row["filtered_convs"] == "45 46"
    filtering = Recorder(tmp_path / "a", {"train": {"grad_filter_layers": "trained"}})
    plain = Recorder(tmp_path / "b", {"train": {"grad_filter_last_k": 0}})
    assert filtering.columns["clients.csv"][-2:] == FILTER_COLUMNS
    assert not set(FILTER_COLUMNS) & set(plain.columns["clients.csv"])


def test_choice_speedup() -> None:
    assert FilterChoice("c", True, "faster", 2.0, 1.0).speedup == 2.0
    assert FilterChoice("c", False, "geometry").speedup is None


def test_a_filtering_client_reports_its_filtered_convs(task_identity) -> None:
    from fedneq.config import Config
    from fedneq.federation.client import client_round
    from fedneq.task import build_model, load_task

    fleet = {"preset": "custom", "local_epochs": 1, "batch_size": 32, "classes": [
        {"name": "bound", "share": 1.0, "budget": 0.5, "grad_filter_r": 2}]}  # fmt: skip
    config = Config().replace(
        run={"num_clients": 2, "clients_per_round": 2, "rounds": 1},
        data={"dataset": "digits", "classes": "all", "partition": "iid", "probe_size": 8,
              "image_size": 16},
        train={"grad_filter_layers": "trained", "grad_filter_fallback": "shape"},
        fleet=fleet,
    )  # fmt: skip
    torch.manual_seed(0)
    model, nmap = build_model(config, load_task(config))
    reply = client_round(config, 0, 1, model.state_dict(), None)
    convs = [lay.name for lay in nmap.layers if lay.kind == "conv"]
    filtered = reply.metrics["filtered-convs"]
    assert reply.metrics["filtered-layers"] == len(filtered) > 0
    assert all(0 <= i < len(convs) for i in filtered)
    assert Config().train.grad_filter_fallback == "probe"  # the default: never pay time
