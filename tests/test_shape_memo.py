"""What training computes once per model and mask: results bit-identical with or without it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same_state, train_plainly
from test_training import OPTIMIZERS, tiny_cnn, toy_data
from torch import nn

from fedneq.costs import profile_model
from fedneq.neurons import enumerate_neurons
from fedneq.training.loop import OptimizerConfig, train_masked, train_step
from fedneq.training.masking import RowFreezer
from fedneq.training.memory import StepMemoryMeter
from fedneq.training.schedule import batch_slices
from fedneq.training.shape_memo import clear_memo, lookup, mask_key, memo


def _train(model, nmap, mask, *, measure: bool, opt: OptimizerConfig, profile=None):
    return train_masked(
        model, toy_data(50), neuron_map=nmap, masks=mask, epochs=2, batch_size=16,
        optimizer=opt, generator=torch.Generator().manual_seed(3), cost_profile=profile,
        measure_memory=measure,
    )  # fmt: skip


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "half"])
def test_warm_memo_and_measuring_leave_training_bit_identical(opt, dense) -> None:
    base = tiny_cnn()
    nmap = enumerate_neurons(base, always_trained=("11",))
    neurons = torch.ones(nmap.num_neurons, dtype=torch.bool)
    if not dense:
        neurons[::2] = False
    mask = nmap.train_mask(neurons)
    profile = profile_model(base, nmap, (1, 6, 6))
    clear_memo()
    cold, warm, unmeasured = (copy.deepcopy(base) for _ in range(3))
    first = _train(cold, nmap, mask, measure=True, opt=opt, profile=profile)
    # the same model object again: every figure now comes from the memo
    cold.load_state_dict(base.state_dict())
    again = _train(cold, nmap, mask, measure=True, opt=opt, profile=profile)
    _train(unmeasured, nmap, mask, measure=False, opt=opt, profile=profile)
    _train(warm, nmap, mask, measure=True, opt=opt, profile=profile)
    assert_same_state(cold, unmeasured)
    assert_same_state(cold, warm)
    assert first.epochs == again.epochs  # costs, measured memory, trainable counts
    if dense:  # an all-selected mask is plain training, whatever the memo holds
        reference = copy.deepcopy(base)
        train_plainly(reference, toy_data(50), opt, epochs=2, batch_size=16, seed=3)
        assert_same_state(reference, cold)


def test_measuring_each_kind_of_step_once_finds_the_peak_of_measuring_every_step() -> None:
    base = tiny_cnn()
    nmap = enumerate_neurons(base, always_trained=("11",))
    neurons = torch.zeros(nmap.num_neurons, dtype=torch.bool)
    neurons[-5:] = True
    mask = nmap.train_mask(neurons)
    opt = OptimizerConfig("sgd", lr=0.1, momentum=0.9)
    clear_memo()
    model = copy.deepcopy(base)
    result = _train(model, nmap, mask, measure=True, opt=opt)
    # every step measured, by hand: same batches (50 examples -> 4 batches of 13/13/12/12)
    reference = copy.deepcopy(base)
    optim = opt.build(list(reference.parameters()))
    g = torch.Generator().manual_seed(3)
    data = toy_data(50)
    peaks = []
    for _ in range(2):
        reference.train()
        with RowFreezer(reference, nmap, mask, backward="sparse", batch_size=16) as freezer:
            meter = StepMemoryMeter(reference, optim)
            order = torch.randperm(len(data), generator=g)
            for batch in batch_slices(len(order), 16):
                idx = order[batch]
                with meter.step():
                    train_step(reference, data.x[idx], data.y[idx], optim, freezer)
            assert meter.steps == 4
            peaks.append(meter.peak)
    assert [e.measured for e in result.epochs] == peaks
    assert_same_state(reference, model)


def test_memo_keys_and_lifetime() -> None:
    model = tiny_cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    a = nmap.train_mask(torch.ones(nmap.num_neurons, dtype=torch.bool))
    b = nmap.train_mask(torch.zeros(nmap.num_neurons, dtype=torch.bool))
    assert mask_key(a) != mask_key(b)
    assert mask_key(a) == mask_key(nmap.train_mask(torch.ones(nmap.num_neurons, dtype=torch.bool)))
    calls = []
    assert memo(model, "k", lambda: calls.append(1) or 7) == 7
    assert memo(model, "k", lambda: calls.append(1) or 8) == 7
    assert calls == [1]
    assert lookup(tiny_cnn(), "k") is None  # per model
    clear_memo(model)
    assert lookup(model, "k") is None


def test_a_fixed_structure_walks_its_module_tree_once() -> None:
    from fedneq.training.shape_memo import (
        MAX_ENTRIES,
        fix_structure,
        memo,
        named_tensors,
        parameters,
    )

    free, fixed = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), nn.Sequential(nn.Linear(2, 3))
    assert named_tensors(free) is not named_tensors(free)  # walked on every call
    free[0] = nn.Linear(2, 3)
    assert named_tensors(free)["0.weight"] is free[0].weight and parameters(free)[0] is free[0].weight
    fix_structure(fixed)
    assert named_tensors(fixed) is named_tensors(fixed)
    assert named_tensors(fixed)["0.weight"] is fixed[0].weight
    assert parameters(fixed) == [fixed[0].weight, fixed[0].bias]
    parameters(fixed).append(None)  # a copy: the remembered list is not changed
    assert len(parameters(fixed)) == 2
    for i in range(MAX_ENTRIES + 1):  # a full memo starts over; the declaration stays
        memo(fixed, ("filler", i), lambda: 0)
    assert named_tensors(fixed) is named_tensors(fixed)
    clear_memo(fixed)
    assert named_tensors(fixed) is not named_tensors(fixed)
