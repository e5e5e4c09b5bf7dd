"""Memory as the device's limit: measured step memory, byte-budgeted selectors, device limits.

* :func:`measure_step_memory` is hand-checked on a tiny model, and on masks
  the memory-limited selectors choose it stays within 10 % of the cost
  model's estimate (small CNN and MobileNetV2, both backward modes);
* ``velocity-per-byte`` and ``velocity-region`` never exceed either limit by
  the cost model, the region selector picks the best start layer, and both
  leave frozen neurons bit-identical through real training;
* the default fleet's smallest classes are memory-bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedneq.costs import CostProfile, mask_cost, profile_model
from fedneq.data.arrays import ArrayDataset
from fedneq.federation.devices import DeviceProfile, default_fleet
from fedneq.models import get_model
from fedneq.neurons import NeuronMap, enumerate_neurons
from fedneq.selection import (
    MemoryMeter,
    get_selector,
    memory_bound,
    resolve_memory_limit,
    select_ordered,
)
from fedneq.training.loop import OptimizerConfig, measure_step_memory, train_masked
from fedneq.training.memory import StepMemory, StepMemoryMeter

NEW = ("velocity-per-byte", "velocity-region", "velocity-per-param-truncated")


def _setup(name: str, size: int) -> tuple[nn.Module, NeuronMap, CostProfile]:
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, in_channels=3)
    head = "head" if name == "small-cnn" else "classifier"
    neuron_map = enumerate_neurons(model, always_trained=(head,))
    return model, neuron_map, profile_model(model, neuron_map, (3, size, size))


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, NeuronMap, CostProfile]:
    return _setup("small-cnn", 16)


@pytest.fixture(scope="module")
def mobilenet() -> tuple[nn.Module, NeuronMap, CostProfile]:
    return _setup("mobilenet_v2", 32)


# --------------------------------------------------------------------------- measured memory


def test_step_memory_is_hand_computed() -> None:
    """Linear(4 -> 3) -> ReLU -> Linear(3 -> 2), batch 5, SGD with momentum, the first frozen."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meter = StepMemoryMeter(model, opt)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    with meter.step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    weights = 4 * (12 + 3 + 6 + 2)
    trained = 4 * (6 + 2)  # the second Linear: its gradient, then its momentum
    # the ReLU's output (5 x 3, also the second Linear's input, one storage),
    # the log-softmax of the loss (5 x 2), the int64 targets (5) and nll_loss's scalar
    # total weight
    saved = 4 * 15 + 4 * 10 + 8 * 5 + 4
    assert meter.peak == StepMemory(weights, trained, trained, saved)
    assert meter.peak.peak_bytes == weights + 2 * trained + saved
    with pytest.raises(ValueError, match="optimizer must be"):
        StepMemoryMeter(model, "sgd")  # type: ignore[arg-type]


def test_measuring_does_not_change_the_model(small) -> None:
    model, nm, profile = small
    before = copy.deepcopy(model.state_dict())
    mask = nm.train_mask(~nm.empty_mask())
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    measured = measure_step_memory(model, nm, mask, x, y, profile=profile)
    assert measured.gradient_bytes == measured.weight_bytes  # everything trains
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def _limit(meter: MemoryMeter, share: float) -> int:
    return resolve_memory_limit(meter, fraction=share)


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["sparse", "masked"])
@pytest.mark.parametrize("fixture", ["small", "mobilenet"])
def test_measured_peak_within_ten_percent_of_the_estimate(fixture, backward, request) -> None:
    model, nm, profile = request.getfixturevalue(fixture)
    size = profile.layers[0].in_shape[-1]
    batch = 8
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    meter = MemoryMeter(profile, model, batch_size=batch, dense_grads=True)
    for share in (0.0, 0.1, 0.4):
        limit = _limit(meter, share)
        for name in (*NEW, "random"):
            sel = get_selector(
                name, neuron_map=nm, model=model, budget=0.3, rule="fill",
                memory_limit_bytes=limit, cost_profile=profile, batch_size=batch, dense_grads=True,
            )  # fmt: skip
            mask = sel.select(torch.rand(nm.num_neurons, generator=gen), gen)
            assert mask.neurons.any()
            estimate = mask_cost(
                profile, mask, model.state_dict(), batch_size=batch, dense_grads=True
            ).training_memory_bytes
            assert estimate <= limit
            measured = measure_step_memory(model, nm, mask, x, y, backward=backward, profile=profile)
            assert abs(measured.peak_bytes / estimate - 1) <= 0.10, (share, name)


# --------------------------------------------------------------------------- selectors


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("rule", ["prefix", "fill"])
@pytest.mark.parametrize("name", NEW)
def test_new_selectors_keep_both_limits(small, name, rule, dense) -> None:
    model, nm, profile = small
    costs = nm.costs()
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        fraction = float(torch.rand(1, generator=gen)) * 0.5 + 0.01
        batch = int(torch.randint(1, 33, (1,), generator=gen))
        meter = MemoryMeter(profile, model, batch_size=batch, dense_grads=dense)
        limit = _limit(meter, float(torch.rand(1, generator=gen)))
        sel = get_selector(
            name, neuron_map=nm, model=model, budget=fraction, rule=rule,
            memory_limit_bytes=limit, cost_profile=profile, batch_size=batch, dense_grads=dense,
        )  # fmt: skip
        for velocity in (None, torch.randn(nm.num_neurons, generator=gen)):
            mask = sel.select(velocity, gen)
            cost = mask_cost(profile, mask, model.state_dict(), batch_size=batch, dense_grads=dense)
            assert cost.training_memory_bytes <= limit
            assert int(costs[mask.neurons].sum()) <= sel.budget
            assert set(mask.full_tensors) == set(nm.always_trained)


def test_velocity_per_byte_ranks_by_velocity_per_stand_alone_byte(small) -> None:
    model, nm, profile = small
    meter = MemoryMeter(profile, model, batch_size=8, dense_grads=True)
    limit = _limit(meter, 0.5)
    sel = get_selector(
        "velocity-per-byte", neuron_map=nm, model=model, budget=0.2, memory_limit_bytes=limit,
        cost_profile=profile, batch_size=8, dense_grads=True,
    )  # fmt: skip
    velocity = torch.rand(nm.num_neurons, generator=torch.Generator().manual_seed(3))
    score = velocity.double() / meter.neuron_bytes().double()
    order = torch.sort(score, descending=True, stable=True).indices
    from fedneq.selection import MemoryLimit

    expected = select_ordered(order, nm.costs(), sel.budget, "prefix", MemoryLimit(meter, limit))
    assert torch.equal(sel.select(velocity, None).neurons, expected)
    # without a memory limit it ranks as velocity per parameter
    plain = get_selector("velocity-per-byte", neuron_map=nm, model=model, budget=0.2)
    per_param = get_selector("velocity-per-param", neuron_map=nm, model=model, budget=0.2)
    assert torch.equal(plain.select(velocity, None).neurons, per_param.select(velocity, None).neurons)


def _sum_velocity(nm, neurons, velocity) -> float:
    return float(velocity.abs()[neurons].sum())


def test_velocity_region_picks_the_start_with_the_most_velocity(mobilenet) -> None:
    """Brute force over start layers: the chosen region is the best prefix of velocity/param."""
    model, nm, profile = mobilenet
    batch = 16
    meter = MemoryMeter(profile, model, batch_size=batch, dense_grads=True)
    limit = _limit(meter, 0.15)
    kw = dict(neuron_map=nm, model=model, budget=0.3, memory_limit_bytes=limit,
              cost_profile=profile, batch_size=batch, dense_grads=True)  # fmt: skip
    sel = get_selector("velocity-region", **kw)
    velocity = torch.rand(nm.num_neurons, generator=torch.Generator().manual_seed(0)) ** 4
    mask = sel.select(velocity, None)
    got = _sum_velocity(nm, mask.neurons, velocity)
    layer_of = nm.layer_index()
    per_param = velocity.double() / nm.costs().double()
    order = torch.sort(per_param, descending=True, stable=True).indices
    from fedneq.selection import MemoryLimit

    best = 0.0
    for first in range(len(nm.layers)):
        inside = order[layer_of[order] >= first]  # MobileNetV2 is a chain: layer order = start order
        sel_k = select_ordered(inside, nm.costs(), sel.budget, "prefix", MemoryLimit(meter, limit))
        best = max(best, _sum_velocity(nm, sel_k, velocity))
    assert got == pytest.approx(best)
    # it beats the stand-alone rankings at the same limits
    for other in ("velocity-per-byte", "velocity-per-param", "velocity"):
        rival = get_selector(other, **kw).select(velocity, None)
        assert got >= _sum_velocity(nm, rival.neurons, velocity), other
    # and the region it trained in is deep: the activations of the early layers are not kept
    assert int(layer_of[mask.neurons].min()) > len(nm.layers) // 2


@pytest.mark.parametrize("name", NEW)
def test_frozen_neurons_stay_bit_identical(small, name) -> None:
    model, nm, profile = small
    model = copy.deepcopy(model)
    meter = MemoryMeter(profile, model, batch_size=8, dense_grads=True)
    sel = get_selector(
        name, neuron_map=nm, model=model, budget=0.3, rule="fill",
        memory_limit_bytes=_limit(meter, 0.3), cost_profile=profile, batch_size=8,
        dense_grads=True,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    mask = sel.select(torch.rand(nm.num_neurons, generator=gen), gen)
    assert 0 < int(mask.neurons.sum()) < nm.num_neurons
    data = ArrayDataset(torch.randn(24, 3, 16, 16, generator=gen), torch.randint(0, 10, (24,)))
    before = copy.deepcopy(model.state_dict())
    opt = OptimizerConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01)
    result = train_masked(
        model, data, neuron_map=nm, masks=mask, epochs=2, batch_size=8, optimizer=opt,
        generator=gen, cost_profile=profile, measure_memory=True,
    )  # fmt: skip
    after = model.state_dict()
    changed = 0
    for layer in nm.layers:
        rows = mask.neurons[layer.slice]
        for key in layer.tensors:
            assert torch.equal(after[key][~rows], before[key][~rows]), key
            changed += int(not torch.equal(after[key][rows], before[key][rows]))
    assert changed > 0
    for epoch in result.epochs:
        assert epoch.measured is not None and epoch.cost is not None
        assert abs(epoch.measured.peak_bytes / epoch.cost.training_memory_bytes - 1) <= 0.1


# --------------------------------------------------------------------------- device limits


def test_resolve_memory_limit_spans_one_neuron_to_full_training(small) -> None:
    model, nm, profile = small
    meter = MemoryMeter(profile, model, batch_size=8, dense_grads=True)
    low, full = int(meter.alone_bytes().min()), meter.mask_bytes(~nm.empty_mask())
    assert resolve_memory_limit(meter, fraction=0.0) == low
    assert resolve_memory_limit(meter, fraction=1.0) == full
    assert resolve_memory_limit(meter, fraction=0.5) == low + (full - low) // 2
    assert resolve_memory_limit(meter, 12345) == 12345
    assert resolve_memory_limit(meter) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_memory_limit(meter, 1, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        resolve_memory_limit(meter, fraction=1.5)
    with pytest.raises(ValueError, match="memory_fraction"):
        DeviceProfile("x", budget=0.1, memory_fraction=-0.1)
    with pytest.raises(ValueError, match="both memory_limit_bytes and memory_fraction"):
        DeviceProfile("x", budget=0.1, memory_limit_bytes=10, memory_fraction=0.1)
    # memory-bound: the budget-only selection would break the limit
    everything = ~nm.empty_mask()
    assert memory_bound(meter, everything, full - 1)
    assert not memory_bound(meter, everything, full)
    assert not memory_bound(meter, everything, None)


def test_default_fleet_smallest_classes_are_memory_bound(mobilenet) -> None:
    """mcu and pi-zero on MobileNetV2: the velocity selection their budget allows does not fit.

    (On the 3-layer small CNN of the default run, the mcu's 1 % budget is
    often too small for a single neuron of the layers it may open: there the
    parameter budget binds first; see docs/RESULTS.md.)
    """
    model, nm, profile = mobilenet
    classes = {p.name: p for p, _ in default_fleet().classes}
    assert classes["phone"].memory_fraction is None and classes["phone"].memory_limit_bytes is None
    for name in ("mcu", "pi-zero"):
        device = classes[name]
        meter = MemoryMeter(profile, model, batch_size=device.batch_size, dense_grads=True)
        limit = resolve_memory_limit(meter, device.memory_limit_bytes, device.memory_fraction)
        assert limit is not None and limit < meter.mask_bytes(~nm.empty_mask())
        kw = dict(neuron_map=nm, model=model, budget=device.budget, cost_profile=profile,
                  batch_size=device.batch_size, dense_grads=True)  # fmt: skip
        for seed in range(3):
            velocity = torch.rand(nm.num_neurons, generator=torch.Generator().manual_seed(seed))
            free = get_selector("velocity", **kw).select(velocity, None).neurons
            assert memory_bound(meter, free, limit), (name, seed)
            limited = get_selector("velocity", memory_limit_bytes=limit, **kw).select(velocity, None)
            assert 0 < meter.mask_bytes(limited.neurons) <= limit
            assert limited.neurons.any()


def test_measured_memory_follows_the_mask_when_it_changes_between_epochs(small) -> None:
    """Optimizer state of what an epoch no longer trains is freed: the estimate still holds."""
    model, nm, profile = small
    model = copy.deepcopy(model)
    layer = nm.layer_index()
    first = layer == 0  # a whole early layer: large activations and gradients
    last = (layer == len(nm.layers) - 1) & (torch.arange(nm.num_neurons) % 2 == 0)
    masks = [nm.train_mask(first), nm.train_mask(last)]
    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,)))
    result = train_masked(
        model, data, neuron_map=nm, masks=lambda epoch: masks[epoch], epochs=2, batch_size=8,
        generator=gen, cost_profile=profile, measure_memory=True,
    )  # fmt: skip
    small_epoch = result.epochs[1]
    assert small_epoch.cost.training_memory_bytes < result.epochs[0].cost.training_memory_bytes
    for epoch in result.epochs:
        assert abs(epoch.measured.peak_bytes / epoch.cost.training_memory_bytes - 1) <= 0.1
        # gradients and optimizer state: exactly the current mask's whole tensors
        assert epoch.measured.gradient_bytes == epoch.cost.gradient_bytes
        assert epoch.measured.optimizer_state_bytes == epoch.cost.optimizer_state_bytes
