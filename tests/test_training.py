"""Masked training: frozen neurons are bit-identical; an all-selected mask is plain training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_state, train_plainly
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fedneq.data.arrays import ArrayDataset
from fedneq.federation.wire import encode, tensor_table
from fedneq.models import get_model
from fedneq.neurons import enumerate_neurons
from fedneq.training.evaluation import evaluate
from fedneq.training.loop import OptimizerConfig, label_log_prior, train_masked
from fedneq.training.masking import RowFreezer
from fedneq.training.schedule import batch_slices


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def toy_data(n: int = 64) -> ArrayDataset:
    g = torch.Generator().manual_seed(1)
    return ArrayDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


OPTIMIZERS = [
    OptimizerConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
    OptimizerConfig("adamw", lr=0.01, weight_decay=0.1),
]


def _rows_of_neuron(neuron_map, state, idx: int) -> dict[str, torch.Tensor]:
    layer = next(lay for lay in neuron_map.layers if lay.offset <= idx < lay.offset + lay.num_neurons)
    i = idx - layer.offset
    return {key: state[key][i].clone() for key in layer.tensors}


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.name)
def test_frozen_neurons_are_bit_identical(opt: OptimizerConfig) -> None:
    model = tiny_cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    selected = torch.zeros(nmap.num_neurons, dtype=torch.bool)
    selected[[1, 6, 9, 12]] = True  # rows in three layers, each layer partially selected
    mask = nmap.train_mask(selected)
    before = copy.deepcopy(model.state_dict())
    train_masked(model, toy_data(), neuron_map=nmap, masks=mask, epochs=3, batch_size=16,
                 optimizer=opt, generator=torch.Generator().manual_seed(0))  # fmt: skip
    after = model.state_dict()
    for idx in range(nmap.num_neurons):
        rows_before = _rows_of_neuron(nmap, before, idx)
        rows_after = _rows_of_neuron(nmap, after, idx)
        for key in rows_before:
            same = torch.equal(rows_before[key], rows_after[key])
            if selected[idx] and key.endswith("weight") and "running" not in key:
                assert not same, f"selected neuron {idx} {key} did not train"
            elif not selected[idx]:
                assert same, f"frozen neuron {idx} {key} changed"
    # the always-trained head trained; nothing else outside neurons exists here
    assert not torch.equal(before["11.weight"], after["11.weight"])


def test_reselection_keeps_frozen_rows_of_each_epoch() -> None:
    model = tiny_cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    masks = [torch.zeros(nmap.num_neurons, dtype=torch.bool) for _ in range(2)]
    masks[0][0] = True
    masks[1][5] = True
    before = copy.deepcopy(model.state_dict())
    seen = []

    def mask_for(epoch: int):
        seen.append(epoch)
        return nmap.train_mask(masks[epoch])

    result = train_masked(model, toy_data(), neuron_map=nmap, masks=mask_for, epochs=2,
                          optimizer=OPTIMIZERS[0], generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert seen == [0, 1]
    after = model.state_dict()
    assert torch.equal(result.mask.neurons, masks[0] | masks[1])
    for idx in range(nmap.num_neurons):
        if idx not in (0, 5):
            for key, row in _rows_of_neuron(nmap, before, idx).items():
                assert torch.equal(row, _rows_of_neuron(nmap, after, idx)[key])
    assert [e.selected_neurons for e in result.epochs] == [1, 1]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: o.name)
def test_all_selected_mask_equals_plain_training(opt: OptimizerConfig) -> None:
    model = tiny_cnn()
    reference = copy.deepcopy(model)
    nmap = enumerate_neurons(model, always_trained=("11",))
    mask = nmap.train_mask(torch.ones(nmap.num_neurons, dtype=torch.bool))
    data = toy_data()
    train_masked(model, data, neuron_map=nmap, masks=mask, epochs=2, batch_size=16,
                 optimizer=opt, generator=torch.Generator().manual_seed(3))  # fmt: skip
    # plain training: same batches, same optimizer, no masking machinery
    train_plainly(reference, data, opt, epochs=2, batch_size=16, seed=3)
    assert_same_state(reference, model)


def test_row_freezer_remove_restores_requires_grad_and_hooks() -> None:
    model = tiny_cnn()
    nmap = enumerate_neurons(model)
    selected = torch.zeros(nmap.num_neurons, dtype=torch.bool)
    selected[0] = True
    with RowFreezer(model, nmap, nmap.train_mask(selected)) as freezer:
        trainable = {id(p) for p in freezer.trainable_parameters()}
        assert id(model[0].weight) in trainable and id(model[6].weight) not in trainable
        assert model[0].weight._backward_hooks
    assert all(p.requires_grad for p in model.parameters())
    assert not model[0].weight._backward_hooks


def test_training_reports_trainable_params_and_rejects_bad_input() -> None:
    model = tiny_cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    selected = torch.zeros(nmap.num_neurons, dtype=torch.bool)
    selected[0] = True  # conv 1x3x3 + bias + BN weight/bias = 12 params
    result = train_masked(model, toy_data(), neuron_map=nmap, masks=nmap.train_mask(selected),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.trainable_params == 12 + (6 * 3 + 3)
    assert result.examples == 64
    with pytest.raises(ValueError, match="epochs"):
        train_masked(model, toy_data(), neuron_map=nmap, masks=nmap.train_mask(selected), epochs=0,
                     generator=torch.Generator())  # fmt: skip
    with pytest.raises(ValueError, match="optimizer name"):
        OptimizerConfig("lion")
    loss, acc = evaluate(model, toy_data())
    assert loss > 0 and 0 <= acc <= 1


@given(n=st.integers(0, 500), batch_size=st.integers(1, 64))
def test_batch_slices_cover_the_epoch_in_near_equal_batches(n: int, batch_size: int) -> None:
    slices = batch_slices(n, batch_size)
    sizes = [s.stop - s.start for s in slices]
    assert len(slices) == math.ceil(n / batch_size)
    assert [s.start for s in slices] == [sum(sizes[:i]) for i in range(len(sizes))]  # contiguous
    assert sum(sizes) == n and all(0 < size <= batch_size for size in sizes)
    if sizes:
        assert max(sizes) - min(sizes) <= 1
        assert min(sizes) >= min(n, batch_size // 2)  # never a degenerate last batch
    reference = torch.tensor_split(torch.arange(n), len(slices)) if slices else ()
    assert sizes == [len(t) for t in reference]


def test_every_example_trains_and_no_batch_is_degenerate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(  # BatchNorm on 1x1 maps, as in MobileNetV2 at 32x32
        nn.Conv2d(1, 4, 6), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)
    )
    nmap = enumerate_neurons(model, always_trained=("4",))
    mask = nmap.train_mask(torch.ones(nmap.num_neurons, dtype=torch.bool))
    data = toy_data(34)  # fixed batches of 16 would leave a last batch of 2
    result = train_masked(model, data, neuron_map=nmap, masks=mask, batch_size=16, epochs=2,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.examples == 68
    assert [e.smallest_batch for e in result.epochs] == [11, 11]  # 12 + 11 + 11
    assert result.smallest_batch == 11


@pytest.mark.parametrize("backward", ["masked", "sparse"])
def test_bn_stats_all_updates_every_running_statistic_but_no_frozen_parameter(backward: str) -> None:
    model = tiny_cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    selected = torch.zeros(nmap.num_neurons, dtype=torch.bool)
    selected[0] = True
    before = copy.deepcopy(model.state_dict())
    result = train_masked(model, toy_data(), neuron_map=nmap, masks=nmap.train_mask(selected),
                          generator=torch.Generator().manual_seed(0), bn_stats="all",
                          backward=backward)  # fmt: skip
    after = model.state_dict()
    stats = nmap.statistic_tensors()
    assert stats == {f"{bn}.{s}" for bn in ("1", "4", "7") for s in ("running_mean", "running_var")}
    assert stats <= result.mask.full_tensors  # sent whole
    frozen_layer = nmap.layer("6")  # no neuron of the last conv is selected
    for key in frozen_layer.tensors:
        same = torch.equal(before[key], after[key])
        assert same == (key in frozen_layer.param_tensors), key  # params frozen, statistics moved
    assert result.trainable_params == 12 + (6 * 3 + 3)  # statistics are not parameters
    with pytest.raises(ValueError, match="bn_stats should be one of"):
        train_masked(model, toy_data(), neuron_map=nmap, masks=nmap.train_mask(selected),
                     generator=torch.Generator(), bn_stats="some")  # fmt: skip


def _update_norm(n: int) -> float:
    """Norm of one full-budget epoch's update of MobileNetV2 (32x32) on ``n`` examples."""
    model = get_model("mobilenet_v2", num_classes=5, in_channels=1, width_mult=0.5, seed=0)
    nmap = enumerate_neurons(model, always_trained=("classifier",))
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(3)
    data = ArrayDataset(torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g))
    train_masked(model, data, neuron_map=nmap, batch_size=32, generator=torch.Generator().manual_seed(0),
                 masks=nmap.train_mask(torch.ones(nmap.num_neurons, dtype=torch.bool)),
                 optimizer=OptimizerConfig(lr=0.01))  # fmt: skip
    after = model.state_dict()
    return math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k, _ in model.named_parameters()))


def test_a_client_whose_size_leaves_a_remainder_of_2_does_not_explode_on_mobilenet() -> None:
    # Why it matters: BatchNorm in train mode on MobileNetV2's 1x1 maps turns a batch of 2
    # into a gradient thousands of times a normal batch's
    model = get_model("mobilenet_v2", num_classes=5, in_channels=1, width_mult=0.5, seed=0).train()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(34, 1, 32, 32, generator=g), torch.randint(0, 5, (34,), generator=g)

    def grad_norm(idx: slice) -> float:
        model.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        return math.sqrt(sum(float((p.grad**2).sum()) for p in model.parameters()))

    assert grad_norm(slice(32, 34)) > 100 * grad_norm(slice(0, 32))
    # 98 = 3 x 32 + 2 examples train in batches of 25, 25, 24, 24: an update like 96's
    normal, remainder_2 = _update_norm(96), _update_norm(98)
    assert remainder_2 < 2 * normal, (remainder_2, normal)


def test_bn_stats_frozen_trains_batchnorm_in_eval_mode() -> None:
    model = tiny_cnn()
    nmap = enumerate_neurons(model, always_trained=("11",), statistics=False)
    assert not nmap.statistic_tensors()  # the statistics belong to no neuron: never sent
    selected = torch.zeros(nmap.num_neurons, dtype=torch.bool)
    selected[[0, 5]] = True  # a neuron of the first conv and one of the depthwise conv
    before = copy.deepcopy(model.state_dict())
    seen_modes: list[bool] = []
    hook = model[1].register_forward_pre_hook(lambda mod, _: seen_modes.append(mod.training))
    result = train_masked(model, toy_data(33), neuron_map=nmap, masks=nmap.train_mask(selected),
                          batch_size=32, generator=torch.Generator().manual_seed(0),
                          bn_stats="frozen")  # fmt: skip
    hook.remove()
    assert seen_modes and not any(seen_modes)  # BatchNorm ran in eval mode throughout
    assert model[0].training  # the rest of the model trained in train mode
    after = model.state_dict()
    for key in before:
        if "running" in key or "num_batches" in key:
            assert torch.equal(before[key], after[key]), key  # statistics untouched
    assert not torch.equal(before["1.weight"][0], after["1.weight"][0])  # selected BN affine trains
    assert torch.equal(before["1.weight"][1:], after["1.weight"][1:])
    assert not torch.equal(before["4.bias"][1], after["4.bias"][1])
    assert result.smallest_batch == 16  # 17 + 16: even a batch of 1 would be safe in eval mode
    # the sent rows carry no statistics either
    arrays = encode(model.state_dict(), nmap, result.mask, tensor_table(model.state_dict()))
    assert arrays["neuron_values"].size == (9 + 1 + 2) + (9 + 1 + 2)  # weight, bias, BN affine


def test_balanced_softmax_leaves_the_classes_a_client_lacks_alone() -> None:
    assert torch.equal(label_log_prior(torch.tensor([0, 0, 2, 2, 2])),
                       torch.tensor([math.log(2), -math.inf, math.log(3)]))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randn(40, 1, 6, 6, generator=g), torch.tensor([0, 2] * 20))
    heads = {}
    for loss in ("cross-entropy", "balanced-softmax"):
        model = tiny_cnn()
        nmap = enumerate_neurons(model, always_trained=("11",))
        before = model[11].bias.detach().clone()
        result = train_masked(model, data, neuron_map=nmap, batch_size=8, loss=loss,
                              masks=nmap.train_mask(torch.ones(nmap.num_neurons, dtype=torch.bool)),
                              generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert math.isfinite(result.loss)
        heads[loss] = model[11].bias.detach() - before
    assert heads["cross-entropy"][1] < 0  # plain cross-entropy pushes the absent class down
    assert heads["balanced-softmax"][1] == 0  # the balanced softmax does not touch it
    with pytest.raises(ValueError, match="loss should be one of"):
        train_masked(tiny_cnn(), data, neuron_map=nmap, masks=nmap.train_mask(nmap.empty_mask()),
                     generator=torch.Generator(), loss="focal")  # fmt: skip


def test_fedprox_adds_the_proximal_gradient_and_keeps_frozen_rows_bit_identical() -> None:
    """prox_mu: each step's gradient gains mu * (w - w_start); frozen neurons still do not move."""
    opt = OptimizerConfig("sgd", lr=0.1, momentum=0.9, prox_mu=0.5)
    data = toy_data()
    model, reference, plain = tiny_cnn(), tiny_cnn(), tiny_cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    every = nmap.train_mask(torch.ones(nmap.num_neurons, dtype=torch.bool))
    train_masked(model, data, neuron_map=nmap, masks=every, epochs=2, batch_size=16,
                 optimizer=opt, generator=torch.Generator().manual_seed(3))  # fmt: skip
    # by hand: the same batches, the proximal term in the loss
    start = [p.detach().clone() for p in reference.parameters()]
    optim = opt.build(list(reference.parameters()))
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        order = torch.randperm(len(data), generator=g)
        for idx in torch.tensor_split(order, math.ceil(len(order) / 16)):
            optim.zero_grad()
            prox = sum(((p - s) ** 2).sum() for p, s in zip(reference.parameters(), start, strict=True))
            (F.cross_entropy(reference(data.x[idx]), data.y[idx]) + 0.25 * prox).backward()
            optim.step()
    for (key, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
    # the pull is real: closer to the start than the same training without it
    train_plainly(plain, data, OptimizerConfig("sgd", lr=0.1, momentum=0.9), epochs=2,
                  batch_size=16, seed=3)  # fmt: skip
    dist = lambda m: sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(m.parameters(), start, strict=True))  # noqa: E731
    assert dist(model) < 0.9 * dist(plain)
    # frozen rows stay bit-identical under the pull
    partial = tiny_cnn()
    before = {k: v.clone() for k, v in partial.state_dict().items()}
    half = torch.zeros(nmap.num_neurons, dtype=torch.bool)
    half[::2] = True
    train_masked(partial, data, neuron_map=nmap, masks=nmap.train_mask(half), epochs=2,
                 batch_size=16, optimizer=opt, generator=torch.Generator().manual_seed(3))  # fmt: skip
    after = partial.state_dict()
    for idx in torch.nonzero(~half).flatten().tolist():
        for key, row in _rows_of_neuron(nmap, before, idx).items():
            layer_rows = _rows_of_neuron(nmap, after, idx)
            assert torch.equal(row, layer_rows[key]), (idx, key)
    with pytest.raises(ValueError, match="prox_mu should be >= 0"):
        OptimizerConfig(prox_mu=-1.0)
