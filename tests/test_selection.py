"""Budgeted selection: budget parsing, the prefix / fill rules and every selector."""

from __future__ import annotations

import pytest
import torch
from helpers import ranked_tiny_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask, enumerate_neurons
from fedneq.selection import (
    Budget,
    Selector,
    get_selector,
    list_selectors,
    select_fill,
    select_ordered,
    select_prefix,
)
from fedneq.selection.sparse_update import StaticScheme

# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1000, Budget(params=1000)),
        (0.25, Budget(fraction=0.25)),
        (1.0, Budget(fraction=1.0)),
        ("5%", Budget(fraction=0.05)),
        (" 8.8 % ", Budget(fraction=0.088)),
        ("1000", Budget(params=1000)),
        ("0.3", Budget(fraction=0.3)),
        (Budget(params=7), Budget(params=7)),
    ],
)
def test_budget_parse(value: object, expected: Budget) -> None:
    assert Budget.parse(value) == expected


def test_budget_resolve_floors_fractions_exactly() -> None:
    assert Budget(params=60).resolve(200) == 60
    assert Budget(fraction=0.3).resolve(200) == 60
    assert Budget(fraction=0.29).resolve(100) == 29  # float 0.29 * 100 = 28.999...
    assert Budget(fraction=0.088).resolve(2_189_760) == 192_698  # 192 698.88 floored
    assert Budget.parse("5%").resolve(30) == 1  # 1.5 floored
    assert Budget(fraction=1.0).resolve(200) == 200


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Budget(), "exactly one of params or fraction"),
        (lambda: Budget(params=5, fraction=0.5), "exactly one of params or fraction"),
        (lambda: Budget(params=0), "params must be >= 1, got 0"),
        (lambda: Budget(params=-3), "params must be >= 1, got -3"),
        (lambda: Budget(fraction=0.0), r"fraction must be in \(0, 1\], got 0.0"),
        (lambda: Budget(fraction=1.5), r"fraction must be in \(0, 1\], got 1.5"),
        (lambda: Budget(params=201).resolve(200), r"params=201 exceeds .* allowed: 1..200"),
        (lambda: Budget(fraction=0.001).resolve(200), r"is 0 parameters; allowed: .*\[1/200, 1\]"),
        (lambda: Budget.parse(2.5), r"fraction in \(0, 1\], got 2.5 \(pass an int"),
        (lambda: Budget.parse("150%"), r"'150%' is not an int"),
        (lambda: Budget.parse("lots"), r"'lots' is not an int"),
        (lambda: Budget.parse(True), "got True"),
        (lambda: Budget.parse(-5), "params must be >= 1, got -5"),
    ],
)
def test_budget_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------- rules


def reference_order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    costs = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    # scores from a small pool too, so that ties are common
    score = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, 2.5, -1.0]))
    scores = draw(st.lists(score, min_size=n, max_size=n))
    budget = draw(st.integers(0, sum(costs) + 10))
    return scores, costs, budget


@settings(max_examples=300, deadline=None, database=None)
@given(problems())
def test_rules_properties(problem) -> None:
    scores, costs, budget = problem
    s = torch.tensor(scores, dtype=torch.float64)
    c = torch.tensor(costs, dtype=torch.int64)
    prefix = select_prefix(s, c, budget)
    fill = select_fill(s, c, budget)
    order = reference_order(scores)

    # never over budget
    assert int(c[prefix].sum()) <= budget
    assert int(c[fill].sum()) <= budget
    # prefix: the first k of the order, and k is the longest that fits
    k = int(prefix.sum())
    assert sorted(order[:k]) == torch.nonzero(prefix).flatten().tolist()
    if k < len(order):
        assert sum(costs[i] for i in order[: k + 1]) > budget
    # fill: a superset of prefix, and no remaining neuron fits in what is left
    assert bool((fill | prefix).eq(fill).all())
    left = budget - int(c[fill].sum())
    assert all(costs[i] > left for i in range(len(costs)) if not fill[i])


def test_prefix_vs_fill_by_hand() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    costs = torch.tensor([3, 5, 2, 1])
    # order 0, 1, 2, 3; cumulative cost 3, 8 -> the prefix stops after neuron 0
    assert select_prefix(scores, costs, 6).tolist() == [True, False, False, False]
    # fill: 0 (3 left), skip 1 (5), 2 (1 left), 3 (0 left)
    assert select_fill(scores, costs, 6).tolist() == [True, False, True, True]
    assert select_prefix(scores, costs, 11).tolist() == [True, True, True, True]
    assert select_prefix(scores, costs, 0).tolist() == [False] * 4


def test_ties_go_to_the_lower_index() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0])
    costs = torch.ones(5, dtype=torch.int64)
    assert select_prefix(scores, costs, 2).tolist() == [False, True, True, False, False]
    assert select_prefix(scores, costs, 4).tolist() == [True, True, True, True, False]


def test_select_ordered_only_picks_from_order() -> None:
    costs = torch.tensor([1, 1, 1, 1, 1])
    mask = select_ordered(torch.tensor([3, 1]), costs, 5, "fill")
    assert mask.tolist() == [False, True, False, True, False]


def test_rule_errors() -> None:
    costs = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="1 NaN value"):
        select_prefix(torch.tensor([0.1, float("nan"), 0.3]), costs, 3)
    with pytest.raises(ValueError, match="costs must have 3 entries"):
        select_fill(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match="costs must be a 1-D int64 tensor, got torch.float32"):
        select_prefix(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="costs must be >= 0, got minimum -2"):
        select_prefix(torch.tensor([0.1, 0.2]), torch.tensor([1, -2]), 3)
    with pytest.raises(ValueError, match="budget must be an int >= 0 .* got -1"):
        select_prefix(torch.tensor([0.1, 0.2]), torch.tensor([1, 2]), -1)
    with pytest.raises(ValueError, match=r"rule must be one of \['prefix', 'fill'\], got 'best'"):
        select_ordered(torch.tensor([0]), costs, 3, "best")


# --------------------------------------------------------------------------- selectors


@pytest.fixture
def model() -> nn.Module:
    return ranked_tiny_cnn()


@pytest.fixture
def nm(model: nn.Module) -> NeuronMap:
    neuron_map = enumerate_neurons(model, always_trained=["fc"])
    # neurons 0-3: conv1 (29 each), 4-7: conv2 (11 each), 8-15: conv3 (5 each)
    assert neuron_map.costs().tolist() == [29] * 4 + [11] * 4 + [5] * 8
    assert neuron_map.selectable_params == 200
    return neuron_map


# conv1 top half and conv3 top quarter by weight norm: neurons 1, 2 and 10, 14
SCHEME = StaticScheme("tiny", {0: 0.5, 2: 0.25}, bias_depth=1)
ALWAYS = {"fc.weight", "fc.bias"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def selected(mask: TrainMask) -> list[int]:
    return torch.nonzero(mask.neurons).flatten().tolist()


def cost(mask: TrainMask, neuron_map: NeuronMap) -> int:
    return int(neuron_map.costs()[mask.neurons].sum())


@pytest.mark.parametrize("name", list_selectors())
@pytest.mark.parametrize("rule", ["prefix", "fill"])
@pytest.mark.parametrize("budget", [0.3, 45, "80%"])
def test_every_selector_respects_its_budget(name, rule, budget, model, nm) -> None:
    sel = get_selector(
        name,
        neuron_map=nm,
        model=model,
        budget=budget,
        rule=rule,
        initializer="static",
        scheme=SCHEME,
    )
    assert isinstance(sel, Selector) and sel.name == name
    assert isinstance(sel.needs_velocity, bool)
    requested = Budget.parse(budget).resolve(nm.selectable_params)
    if name != "full":
        assert sel.budget <= requested
    for seed in range(5):
        velocity = torch.randn(nm.num_neurons, generator=gen(100 + seed))
        for v in (None, velocity):
            mask = sel.select(v, gen(seed))
            assert isinstance(mask, TrainMask)
            assert mask.neurons.shape == (nm.num_neurons,)
            assert cost(mask, nm) <= sel.budget
            assert ALWAYS <= mask.full_tensors


def test_velocity_vs_velocity_per_param(model, nm) -> None:
    v = torch.zeros(16)
    v[0], v[4], v[8] = 1.0, -0.6, 0.5  # costs 29, 11, 5
    # |v|: 0 (1.0), 4 (0.6), 8 (0.5) -> 29 + 11 = 40 fits exactly
    vel = get_selector("velocity", neuron_map=nm, model=model, budget=40)
    assert selected(vel.select(v, gen(0))) == [0, 4]
    # |v|/c: 8 (0.1), 4 (0.055), 0 (0.034) -> 5 + 11, then 29 does not fit
    per = get_selector("velocity-per-param", neuron_map=nm, model=model, budget=40)
    assert selected(per.select(v, gen(0))) == [4, 8]
    # fill skips 0 (29 > 24 left), then zero-velocity neurons in index order: 5, 6 (11 each)
    per_fill = get_selector(
        "velocity-per-param", neuron_map=nm, model=model, budget=40, rule="fill"
    )
    assert selected(per_fill.select(v, gen(0))) == [4, 5, 6, 8]  # 5 + 11 + 11 + 11 = 38
    assert vel.needs_velocity and per.needs_velocity


def test_random_is_seeded(model, nm) -> None:
    sel = get_selector("random", neuron_map=nm, model=model, budget=0.3)
    a, b = sel.select(None, gen(1)), sel.select(None, gen(1))
    assert torch.equal(a.neurons, b.neurons)
    masks = {tuple(sel.select(None, gen(seed)).neurons.tolist()) for seed in range(10)}
    assert len(masks) > 1
    # reference: the prefix of the generator's permutation
    order = torch.randperm(16, generator=gen(7))
    expected = select_ordered(order, nm.costs(), 60, "prefix")
    assert torch.equal(sel.select(None, gen(7)).neurons, expected)
    # velocity is ignored, the generator is not
    assert torch.equal(sel.select(torch.ones(16), gen(7)).neurons, expected)
    assert not sel.needs_velocity


def test_random_initializer_when_no_velocity(model, nm) -> None:
    vel = get_selector("velocity", neuron_map=nm, model=model, budget=0.3, initializer="random")
    rnd = get_selector("random", neuron_map=nm, model=model, budget=0.3)
    for seed in range(5):
        assert torch.equal(vel.select(None, gen(seed)).neurons, rnd.select(None, gen(seed)).neurons)


def test_static_initializer_when_no_velocity(model, nm) -> None:
    # scheme neurons by weight-row norm: 10 (4.0), 1 (2.6), 14 (2.0), 2 (1.56); costs 5, 29, 5, 29
    kw = dict(neuron_map=nm, model=model, budget=30, initializer="static", scheme=SCHEME)
    prefix = get_selector("velocity", **kw)
    assert selected(prefix.select(None, gen(0))) == [10]  # 5, then 34 > 30
    fill = get_selector("velocity-per-param", rule="fill", **kw)
    assert selected(fill.select(None, gen(0))) == [10, 14]  # skips neuron 1
    # the initializer is a subset of the scheme even with room left, and has no bias tensors
    roomy = get_selector("velocity", **{**kw, "budget": 150})
    mask = roomy.select(None, gen(0))
    assert selected(mask) == [1, 2, 10, 14]
    assert mask.full_tensors == ALWAYS
    # once velocity exists, it decides
    v = torch.zeros(16)
    v[5] = 1.0
    assert selected(prefix.select(v, gen(0))) == [5]  # 11, then neuron 0: 40 > 30


def test_static_is_the_scheme_and_never_changes(model, nm) -> None:
    sel = get_selector("static", neuron_map=nm, model=model, budget=1.0, scheme=SCHEME)
    assert sel.budget == 2 * 29 + 2 * 5  # its own cost, not the 200 requested
    first = sel.select(None, gen(0))
    assert selected(first) == [1, 2, 10, 14]
    assert first.full_tensors == ALWAYS | {"conv3.bias"}  # bias depth 1: conv3's own bias
    first.neurons[:] = False  # a caller mutating its mask does not touch the selector
    with torch.no_grad():
        model.conv1.weight.mul_(-3.0).add_(torch.randn_like(model.conv1.weight))
    for seed in range(3):
        again = sel.select(torch.randn(16, generator=gen(seed)), gen(seed))
        assert selected(again) == [1, 2, 10, 14]
        assert again.full_tensors == ALWAYS | {"conv3.bias"}
    assert not sel.needs_velocity


def test_static_under_a_smaller_budget(model, nm) -> None:
    # scheme order: layer order, then norm: 1, 2 (conv1), 10, 14 (conv3)
    prefix = get_selector("static", neuron_map=nm, model=model, budget=40, scheme=SCHEME)
    assert prefix.budget == 40
    assert selected(prefix.select(None, gen(0))) == [1]  # 29, then 58 > 40
    fill = get_selector("static", neuron_map=nm, model=model, budget=40, rule="fill", scheme=SCHEME)
    mask = fill.select(None, gen(0))
    assert selected(mask) == [1, 10, 14]  # 29 + 5 + 5
    assert mask.full_tensors == ALWAYS | {"conv3.bias"}  # biases kept, outside the budget


def test_full_selects_everything(model, nm) -> None:
    sel = get_selector("full", neuron_map=nm, model=model, budget=0.1)
    assert sel.budget == nm.selectable_params == 200
    mask = sel.select(None, gen(0))
    assert bool(mask.neurons.all())
    assert mask.full_tensors == ALWAYS
    assert nm.mask_params(mask, model.state_dict(), [n for n, _ in model.named_parameters()]) == (
        nm.total_params
    )


def test_selector_errors(model, nm) -> None:
    kw = dict(neuron_map=nm, model=model, budget=0.3)
    with pytest.raises(ValueError, match=r"selector must be one of \['full', 'random', 'static'"):
        get_selector("neq", **kw)
    with pytest.raises(ValueError, match=r"rule must be one of \['prefix', 'fill'\], got 'greedy'"):
        get_selector("velocity", rule="greedy", **kw)
    with pytest.raises(ValueError, match=r"initializer must be one of \['random', 'static'\]"):
        get_selector("velocity", initializer="zeros", **kw)
    with pytest.raises(ValueError, match=r"scheme must be one of \['SU-1'"):
        get_selector("static", scheme="SU-9", **kw)
    with pytest.raises(ValueError, match="params=500 exceeds the 200 selectable"):
        get_selector("velocity", neuron_map=nm, model=model, budget=500)
    sel = get_selector("velocity", **kw)
    with pytest.raises(ValueError, match=r"velocity must be a \(16,\) tensor .* got \(15,\)"):
        sel.select(torch.zeros(15), gen(0))
    with pytest.raises(ValueError, match="NaN"):
        sel.select(torch.full((16,), float("nan")), gen(0))
    with pytest.raises(ValueError, match=r"velocity must be a \(16,\) tensor"):
        get_selector("random", **kw).select(torch.zeros(4, 4), gen(0))
    with pytest.raises(ValueError, match="needs a seeded torch.Generator, got None"):
        get_selector("random", **kw).select(None, None)


def test_static_without_a_scheme_trains_the_deepest_convs_within_the_budget() -> None:
    from fedneq.selection.sparse_update import tail_scheme

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6),
        nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    nmap = enumerate_neurons(model, always_trained=("7",))
    last, middle = nmap.layer("4"), nmap.layer("2")  # costs 6+1+2 = 9 and 36+1+2 = 39
    budget = 8 * last.cost + 2 * middle.cost + 5  # the last conv whole, 2 of the middle's 6
    scheme = tail_scheme(model, nmap, budget)
    assert scheme.weights == {1: 2 / 6, 2: 1.0}
    selector = get_selector("static", neuron_map=nmap, model=model, budget=budget)
    mask = selector.select(None, torch.Generator()).neurons
    assert mask[last.slice].all() and int(mask[middle.slice].sum()) == 2
    assert not mask[nmap.layer("0").slice].any()
    chosen = mask[middle.slice].nonzero().flatten()
    norms = model[2].weight.flatten(1).norm(dim=1)
    assert set(chosen.tolist()) == set(norms.topk(2).indices.tolist())  # by weight magnitude
    init = get_selector("velocity", neuron_map=nmap, model=model, budget=budget, initializer="static")
    assert torch.equal(init.select(None, torch.Generator()).neurons, mask)
