"""Memory-budgeted selection: the exact memory meter and selectors that keep two limits.

Every mask a selector returns must satisfy both the parameter budget and
``mask_cost(...).training_memory_bytes <= memory_limit_bytes``; the estimate
behind it is checked by hand, against ``mask_cost`` and against the bytes
autograd actually saves (``measure_saved_bytes``).
"""

from __future__ import annotations

import pytest
import torch
from helpers import bn_chain
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedneq.costs import CostProfile, mask_cost, measure_saved_bytes, profile_model
from fedneq.models import get_model
from fedneq.neurons import NeuronMap, TrainMask, enumerate_neurons
from fedneq.selection import MemoryLimit, MemoryMeter, get_selector, select_ordered
from fedneq.selection.sparse_update import StaticScheme, scheme_bias_tensors

B = 2  # batch size of the hand computations


tiny = bn_chain


# Hand computation, input 3x8x8, batch B=2, float32, SGD with momentum (grad + 1 state = 8 B/param).
WEIGHTS = 4 * (108 + 8 + 36 + 8 + 25)  # 185 parameters
HEAD = 8 * 25  # gradient + momentum of the always-trained Linear(4->5)
ACT = B * 4 * 8 * 8 * 4  # one 4x8x8 activation
STATS = 2 * 4 * 4  # a BatchNorm's mean and inv-std of 4 channels, once per batch
LIN_IN = B * 4 * 4  # the Linear's input, kept only when it trains
X = B * 3 * 8 * 8 * 4  # the network input, kept by the first conv


@pytest.fixture
def tiny_setup() -> tuple[nn.Module, NeuronMap, CostProfile]:
    model = tiny()
    neuron_map = enumerate_neurons(model, always_trained=("8",))
    return model, neuron_map, profile_model(model, neuron_map, (3, 8, 8))


def one(neuron_map: NeuronMap, *ids: int) -> torch.Tensor:
    sel = neuron_map.empty_mask()
    sel[list(ids)] = True
    return sel


def priced(profile: CostProfile, model: nn.Module, mask: TrainMask, batch_size: int) -> int:
    return mask_cost(profile, mask, model.state_dict(), batch_size=batch_size).training_memory_bytes


def test_meter_is_hand_computed(tiny_setup) -> None:
    model, nm, profile = tiny_setup
    meter = MemoryMeter(profile, model, batch_size=B)
    # nothing selected: weights, the head's gradient + momentum, the head's input
    assert meter.fixed_bytes == WEIGHTS + HEAD + LIN_IN == 972
    # a depthwise neuron (9 + 2 params): backward from the depthwise conv on: its input
    # (the in-place ReLU's output), the BatchNorm's input and statistics, the ReLU's output
    dw = one(nm, 4)
    assert meter.mask_bytes(dw) == WEIGHTS + HEAD + 8 * 11 + 3 * ACT + STATS + LIN_IN == 7236
    # a first-layer neuron (27 + 2): everything from the network input on
    first = one(nm, 0)
    expected = WEIGHTS + HEAD + 8 * 29 + X + 4 * ACT + 2 * STATS + LIN_IN
    assert meter.mask_bytes(first) == expected == 10996
    # two neurons of one layer share its activations; only their parameters add up
    assert meter.mask_bytes(one(nm, 4, 5)) == 7236 + 8 * 11
    assert meter.neuron_bytes().tolist() == [10996 - 972] * 4 + [7236 - 972] * 4
    for sel in (nm.empty_mask(), dw, first, one(nm, 0, 4, 5, 7)):
        assert meter.mask_bytes(sel) == priced(profile, model, nm.train_mask(sel), B)


def test_meter_with_a_selectable_linear(tiny_setup) -> None:
    model, _, _ = tiny_setup
    nm = enumerate_neurons(model)  # the head's 5 units are neurons 8..12
    meter = MemoryMeter(profile_model(model, nm, (3, 8, 8)), model, batch_size=B)
    assert meter.fixed_bytes == WEIGHTS  # nothing trains, nothing is saved
    # a head unit (4 + 1 params) keeps only the Linear's input
    assert meter.mask_bytes(one(nm, 8)) == WEIGHTS + 8 * 5 + LIN_IN
    # a depthwise neuron alone: the frozen Linear keeps nothing
    assert meter.mask_bytes(one(nm, 4)) == WEIGHTS + 8 * 11 + 3 * ACT + STATS
    assert meter.mask_bytes(one(nm, 4, 8)) == WEIGHTS + 8 * 16 + 3 * ACT + STATS + LIN_IN
    order = torch.tensor([4, 8, 0, 9])
    assert meter.prefix_bytes(order).tolist() == [
        WEIGHTS + 8 * 11 + 3 * ACT + STATS,
        WEIGHTS + 8 * 16 + 3 * ACT + STATS + LIN_IN,
        WEIGHTS + 8 * 45 + X + 4 * ACT + 2 * STATS + LIN_IN,
        WEIGHTS + 8 * 50 + X + 4 * ACT + 2 * STATS + LIN_IN,
    ]


# --------------------------------------------------------------------------- real models


def _setup(name: str, size: int, head: bool) -> tuple[nn.Module, NeuronMap, CostProfile]:
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, in_channels=3)
    always = (("head" if name == "small-cnn" else "classifier"),) if head else ()
    neuron_map = enumerate_neurons(model, always_trained=always)
    return model, neuron_map, profile_model(model, neuron_map, (3, size, size))


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, NeuronMap, CostProfile]:
    return _setup("small-cnn", 8, head=True)


@pytest.fixture(scope="module")
def small32() -> tuple[nn.Module, NeuronMap, CostProfile]:
    return _setup("small-cnn", 32, head=True)


@pytest.fixture(scope="module")
def mobilenet() -> tuple[nn.Module, NeuronMap, CostProfile]:
    return _setup("mobilenet_v2", 32, head=True)


@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("name", ["small-cnn", "mobilenet_v2"])
def test_meter_equals_mask_cost_on_random_masks(name: str, head: bool) -> None:
    model, nm, profile = _setup(name, 32, head)
    g = torch.Generator().manual_seed(1)
    depth = 2 if name == "small-cnn" else 20  # BatchNorm biases of the last convs, as SU schemes
    extras = [()] + ([scheme_bias_tensors(StaticScheme("b", {}, depth), model)] if head else [])
    for extra in extras:
        for optimizer, batch in (("sgd-momentum", 32), ("adamw", 3), ("sgd", 1)):
            meter = MemoryMeter(profile, model, batch_size=batch, optimizer=optimizer, extra=extra)
            for p in (0.0, 0.002, 0.05, 0.5, 1.0):
                sel = torch.rand(nm.num_neurons, generator=g) < p
                mask = nm.train_mask(sel, extra)
                expected = mask_cost(
                    profile, mask, model.state_dict(), batch_size=batch, optimizer=optimizer
                ).training_memory_bytes
                assert meter.mask_bytes(sel) == expected
            # every prefix of a random order, vectorized
            order = torch.randperm(nm.num_neurons, generator=g)
            prefix = meter.prefix_bytes(order)
            for k in (0, 1, 7, nm.num_neurons // 3, nm.num_neurons - 1):
                sel = nm.empty_mask()
                sel[order[: k + 1]] = True
                assert int(prefix[k]) == meter.mask_bytes(sel)
            assert bool((prefix[1:] >= prefix[:-1]).all())  # a growing prefix never costs less


NAMES = ["velocity", "velocity-per-param", "random", "static"]
TINY_SCHEME = StaticScheme("tiny", {1: 0.5, 2: 0.25}, bias_depth=2)  # small-cnn: convs 0, 1, 2


@st.composite
def limits(draw):
    return (
        draw(st.sampled_from(NAMES)),
        draw(st.sampled_from(["prefix", "fill"])),
        draw(st.floats(0.01, 1.0)),  # budget fraction
        draw(st.floats(0.0, 1.05)),  # memory limit: fixed + this share of (everything - fixed)
        draw(st.integers(0, 2**16)),  # seed of the velocity and of the generator
    )


def _fits(meter: MemoryMeter, limit: int, budget: int, costs, sel: torch.Tensor) -> bool:
    return int(costs[sel].sum()) <= budget and meter.mask_bytes(sel) <= limit


@settings(max_examples=60, deadline=None, database=None)
@given(limits())
def test_selected_masks_respect_both_limits(small, case) -> None:
    model, nm, profile = small
    name, rule, fraction, share, seed = case
    extra = scheme_bias_tensors(TINY_SCHEME, model) if name == "static" else ()
    meter = MemoryMeter(profile, model, batch_size=16, extra=extra)
    everything = meter.mask_bytes(~nm.empty_mask())
    limit = meter.fixed_bytes + int(share * (everything - meter.fixed_bytes))
    sel = get_selector(
        name, neuron_map=nm, model=model, budget=fraction, rule=rule, scheme=TINY_SCHEME,
        memory_limit_bytes=limit, cost_profile=profile, batch_size=16,
    )  # fmt: skip
    velocity = torch.randn(nm.num_neurons, generator=torch.Generator().manual_seed(seed))
    mask = sel.select(velocity, torch.Generator().manual_seed(seed))
    costs = nm.costs()

    # both limits, priced by the cost model itself
    assert (
        mask_cost(profile, mask, model.state_dict(), batch_size=16).training_memory_bytes <= limit
    )
    assert int(costs[mask.neurons].sum()) <= sel.budget
    assert set(nm.always_trained) | set(extra) == set(mask.full_tensors)
    # maximal: a fill leaves out only neurons that would break a limit, a prefix stops at one
    candidates = torch.ones(nm.num_neurons, dtype=torch.bool)
    if name == "static":
        candidates = get_selector("static", neuron_map=nm, model=model, budget=1.0,
                                  scheme=TINY_SCHEME).select(None, None).neurons  # fmt: skip
    if rule == "fill":
        for j in torch.nonzero(candidates & ~mask.neurons).flatten().tolist():
            assert not _fits(meter, limit, sel.budget, costs, one(nm, j) | mask.neurons)
    elif name in ("velocity", "random"):
        if name == "velocity":
            order = torch.sort(velocity.abs().double(), descending=True, stable=True).indices
        else:
            order = torch.randperm(nm.num_neurons, generator=torch.Generator().manual_seed(seed))
        # a neuron that cannot fit even alone is no candidate; the prefix stops at one that can
        order = order[meter.alone_bytes()[order] <= limit]
        k = int(mask.neurons.sum())
        assert bool(mask.neurons[order[:k]].all())
        if k < order.numel():
            assert not _fits(meter, limit, sel.budget, costs, mask.neurons | one(nm, int(order[k])))


def test_random_with_memory_is_the_rule_on_the_seeded_shuffle(small) -> None:
    model, nm, profile = small
    meter = MemoryMeter(profile, model, batch_size=16)
    limit = meter.fixed_bytes + (meter.mask_bytes(~nm.empty_mask()) - meter.fixed_bytes) // 3
    kw = dict(memory_limit_bytes=limit, cost_profile=profile, batch_size=16)
    for rule in ("prefix", "fill"):
        sel = get_selector("random", neuron_map=nm, model=model, budget=0.5, rule=rule, **kw)
        for seed in range(3):
            order = torch.randperm(nm.num_neurons, generator=torch.Generator().manual_seed(seed))
            expected = select_ordered(
                order, nm.costs(), sel.budget, rule, MemoryLimit(meter, limit)
            )
            got = sel.select(None, torch.Generator().manual_seed(seed)).neurons
            assert torch.equal(got, expected)
            assert meter.mask_bytes(got) <= limit
        # the velocity selectors' random initializer is the same mask
        vel = get_selector("velocity", neuron_map=nm, model=model, budget=0.5, rule=rule, **kw)
        assert torch.equal(
            vel.select(None, torch.Generator().manual_seed(5)).neurons,
            sel.select(None, torch.Generator().manual_seed(5)).neurons,
        )


# --------------------------------------------------------------------------- measured bytes


@pytest.mark.parametrize("fixture", ["small32", "mobilenet"])
def test_estimate_equals_measured_saved_bytes_for_selected_masks(fixture, request) -> None:
    """Tolerance 0: on these chains the estimate is what autograd keeps, to the byte.

    The masks come from the memory-limited selection (partial layers, gaps
    between selected layers), not only suffixes of layers.
    """
    model, nm, profile = request.getfixturevalue(fixture)
    batch = 8
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    meter = MemoryMeter(profile, model, batch_size=batch)
    span = meter.mask_bytes(~nm.empty_mask()) - meter.fixed_bytes
    checked = partial_layers = 0
    for share in (0.03, 0.2, 0.6):
        limit = meter.fixed_bytes + int(share * span)
        for name, rule in (
            ("velocity-per-param", "prefix"),
            ("velocity", "fill"),
            ("random", "fill"),
        ):
            sel = get_selector(
                name, neuron_map=nm, model=model, budget=0.3, rule=rule,
                memory_limit_bytes=limit, cost_profile=profile, batch_size=batch,
            )  # fmt: skip
            velocity = torch.rand(nm.num_neurons, generator=torch.Generator().manual_seed(checked))
            mask = sel.select(velocity, torch.Generator().manual_seed(checked))
            cost = mask_cost(profile, mask, model.state_dict(), batch_size=batch)
            assert cost.training_memory_bytes <= limit
            assert cost.saved_activation_bytes == measure_saved_bytes(model, nm, mask, x)
            partial_layers += sum(
                0 < int(mask.neurons[lay.slice].sum()) < lay.num_neurons for lay in nm.layers
            )
            checked += 1
    assert checked == 9 and partial_layers > 0


# --------------------------------------------------------------------------- ranking


def test_tight_memory_prefers_deep_cheap_activation_layers(mobilenet) -> None:
    model, nm, profile = mobilenet
    meter = MemoryMeter(profile, model, batch_size=32)
    everything = meter.mask_bytes(~nm.empty_mask())
    limit = meter.fixed_bytes + (everything - meter.fixed_bytes) // 50  # 2 % of the range
    layer = nm.layer_index()
    last = len(nm.layers) - 1  # features.18.0: a 1x1 conv on a 320x1x1 input at 32x32
    kw = dict(neuron_map=nm, model=model, budget=0.1)
    mem = dict(memory_limit_bytes=limit, cost_profile=profile, batch_size=32)
    # the neuron that costs least alone is in the last layer; the first layer's cost most
    alone = meter.neuron_bytes()
    assert int(layer[torch.argmin(alone)]) == last
    assert int(alone[0]) == int(alone.max())
    for velocity in (torch.ones(nm.num_neurons), torch.rand(nm.num_neurons)):
        per_cost = get_selector("velocity-per-param", **kw, **mem).select(velocity, None)
        per_param = get_selector("velocity-per-param", **kw).select(velocity, None)
        by_speed = get_selector("velocity", rule="fill", **kw, **mem).select(velocity, None)
        # per unit of combined cost: only deep neurons, within the limit, budget nearly spent
        assert int(layer[per_cost.neurons].min()) == last
        assert meter.mask_bytes(per_cost.neurons) <= limit
        spent = int(nm.costs()[per_cost.neurons].sum())
        assert spent > 0.4 * get_selector("velocity-per-param", **kw).budget
        # per parameter only: cheap-parameter early neurons, far over the memory limit
        assert int(layer[per_param.neurons].min()) == 0
        assert meter.mask_bytes(per_param.neurons) > 4 * limit
        # |v| with the fill rule keeps the limit but trains fewer parameters
        assert meter.mask_bytes(by_speed.neurons) <= limit
        assert int(nm.costs()[by_speed.neurons].sum()) < spent


# --------------------------------------------------------------------------- static, full, errors


def test_static_and_full_under_a_memory_limit(small) -> None:
    model, nm, profile = small
    biases = scheme_bias_tensors(TINY_SCHEME, model)
    with_biases = MemoryMeter(profile, model, batch_size=16, extra=biases)
    scheme = get_selector("static", neuron_map=nm, model=model, budget=1.0, scheme=TINY_SCHEME)
    whole = scheme.select(None, None)
    need = with_biases.mask_bytes(whole.neurons)
    kw = dict(neuron_map=nm, model=model, budget=1.0, scheme=TINY_SCHEME, cost_profile=profile,
              batch_size=16)  # fmt: skip
    # enough memory: the whole scheme; one byte less: a part of it, biases kept
    assert torch.equal(
        get_selector("static", memory_limit_bytes=need, **kw).select(None, None).neurons,
        whole.neurons,
    )
    part = get_selector("static", memory_limit_bytes=need - 1, rule="fill", **kw).select(None, None)
    assert bool((part.neurons <= whole.neurons).all()) and int(part.neurons.sum()) < int(
        whole.neurons.sum()
    )
    assert part.full_tensors == whole.full_tensors
    assert with_biases.mask_bytes(part.neurons) <= need - 1
    # the biases are part of the fixed cost: a limit that fits the head alone is too small
    plain = MemoryMeter(profile, model, batch_size=16)
    assert plain.fixed_bytes < with_biases.fixed_bytes
    with pytest.raises(ValueError, match=f"allowed: >= {with_biases.fixed_bytes}"):
        get_selector("static", memory_limit_bytes=plain.fixed_bytes, **kw)
    # full: everything, or an error naming what it needs
    needed = plain.mask_bytes(~nm.empty_mask())
    full = get_selector("full", memory_limit_bytes=needed, **kw)
    assert bool(full.select(None, None).neurons.all())
    with pytest.raises(ValueError, match=f"'full' needs {needed} bytes .* allowed: >= {needed}"):
        get_selector("full", memory_limit_bytes=needed - 1, **kw)


def test_bad_memory_limits_raise(tiny_setup) -> None:
    model, nm, profile = tiny_setup
    kw = dict(neuron_map=nm, model=model, budget=0.5, cost_profile=profile, batch_size=B)
    # below weights + head + the head's input: the message names the minimum (972, by hand)
    for name in ("velocity", "velocity-per-param", "random", "full"):
        with pytest.raises(
            ValueError, match=r"memory_limit_bytes=971 is below the 972 bytes .* allowed: >= 972"
        ):
            get_selector(name, memory_limit_bytes=971, **kw)
    # exactly the minimum: only the head trains
    sel = get_selector("velocity", memory_limit_bytes=972, rule="fill", **kw)
    assert not bool(sel.select(torch.ones(nm.num_neurons), None).neurons.any())
    for bad in (0, -5, 1.5e6, True, "1000"):
        with pytest.raises(
            ValueError, match=f"memory_limit_bytes must be None or an int >= 1, got {bad!r}"
        ):
            get_selector("velocity", memory_limit_bytes=bad, **kw)
    with pytest.raises(ValueError, match="memory_limit_bytes needs cost_profile="):
        get_selector("velocity", neuron_map=nm, model=model, budget=0.5, memory_limit_bytes=10**6)
    other = enumerate_neurons(model)  # the head selectable: another neuron map
    with pytest.raises(ValueError, match="different neuron map"):
        get_selector("velocity", **{**kw, "neuron_map": other}, memory_limit_bytes=10**6)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        get_selector("velocity", **{**kw, "batch_size": 0}, memory_limit_bytes=10**6)
    with pytest.raises(ValueError, match=r"optimizer must be one of .*got 'rmsprop'"):
        get_selector("velocity", **kw, optimizer="rmsprop", memory_limit_bytes=10**6)
    with pytest.raises(ValueError, match=r"extra names tensors \['nope.bias'\]"):
        MemoryMeter(profile, model, extra=("nope.bias",))
    with pytest.raises(ValueError, match=r"neurons must be a \(8,\) bool tensor"):
        MemoryMeter(profile, model).mask_bytes(torch.ones(8))
    # no limit given: nothing about memory is checked or needed
    assert get_selector("velocity", neuron_map=nm, model=model, budget=0.5).memory is None
