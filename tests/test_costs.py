"""Tests of the cost model: hand-computed FLOPs and bytes, invariants, measurements."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import bn_chain
from torch import nn

from fedneq.costs import (
    mask_cost,
    measure_saved_bytes,
    neuron_memory_costs,
    profile_model,
    upload_nbytes,
)
from fedneq.federation.wire import encode, payload_nbytes, tensor_table
from fedneq.neurons import NeuronMap, TrainMask, enumerate_neurons

B = 2  # batch size of the hand computations


tiny = bn_chain


# Per sample, input 3x8x8, every conv output 4x8x8:
CONV_MACS = 3 * 3 * 3 * 8 * 8  # 1728 per output channel
DW_MACS = 3 * 3 * 8 * 8  # 576: k*k*H*W, not C_in*k*k*H*W
FC_MACS = 4
FWD = 2 * (4 * CONV_MACS + 4 * DW_MACS + 5 * FC_MACS)  # 18472
# forward + every weight gradient + input gradients of the layers above conv0
FULL_TOTAL = FWD + FWD + 2 * (4 * DW_MACS + 5 * FC_MACS)
ACT = 4 * 8 * 8  # one 4x8x8 activation, per sample
BN_STATS = 2 * 2 * 4 * 4  # two BatchNorms keep mean and inv-std of 4 channels (float32), per batch


@pytest.fixture
def tiny_setup() -> tuple[nn.Module, NeuronMap, dict[str, torch.Tensor]]:
    model = tiny()
    neuron_map = enumerate_neurons(model)
    return model, neuron_map, model.state_dict()


def neurons(neuron_map: NeuronMap, *ids: int) -> TrainMask:
    sel = neuron_map.empty_mask()
    sel[list(ids)] = True
    return TrainMask(sel)


def layer_mask(neuron_map: NeuronMap, first_layer: int) -> TrainMask:
    """Every neuron of layers ``first_layer`` and after."""
    sel = neuron_map.empty_mask()
    sel[neuron_map.layers[first_layer].offset :] = True
    return TrainMask(sel)


def test_tiny_profile_is_hand_computed(tiny_setup):
    model, neuron_map, _ = tiny_setup
    profile = profile_model(model, neuron_map, (3, 8, 8))
    assert [lay.name for lay in profile.layers] == ["0", "3", "8"]
    assert [lay.macs_per_neuron for lay in profile.layers] == [CONV_MACS, DW_MACS, FC_MACS]
    assert [lay.in_shape for lay in profile.layers] == [(3, 8, 8), (4, 8, 8), (4,)]
    assert [lay.out_shape for lay in profile.layers] == [(4, 8, 8), (4, 8, 8), (5,)]
    assert profile.layers[0].order < profile.layers[1].order < profile.layers[2].order
    assert profile.extra_layers == ()
    expected = torch.tensor([2 * CONV_MACS] * 4 + [2 * DW_MACS] * 4 + [2 * FC_MACS] * 5)
    assert torch.equal(profile.neuron_fwd_flops(), expected)
    assert profile.fwd_flops == FWD


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_neuron_costs_k_by_k(k):
    model = nn.Sequential(nn.Conv2d(6, 6, k, padding=k // 2, groups=6, bias=False))
    dense = nn.Sequential(nn.Conv2d(6, 6, k, padding=k // 2, bias=False))
    depthwise = profile_model(model, enumerate_neurons(model), (6, 10, 10)).layers[0]
    full = profile_model(dense, enumerate_neurons(dense), (6, 10, 10)).layers[0]
    assert depthwise.macs_per_neuron == k * k * 10 * 10
    assert full.macs_per_neuron == 6 * k * k * 10 * 10


def test_full_mask(tiny_setup):
    model, neuron_map, state = tiny_setup
    mask = TrainMask(~neuron_map.empty_mask())
    cost = mask_cost(profile_model(model, neuron_map, (3, 8, 8)), mask, state, batch_size=B)
    assert cost.fwd_flops == FWD
    assert cost.bwd_weight_flops == FWD  # every row of every layer
    assert cost.bwd_input_flops == 2 * (4 * DW_MACS + 5 * FC_MACS)  # none for the first layer
    assert cost.total_flops == FULL_TOTAL
    assert cost.flops_saved == 0.0
    params = sum(p.numel() for p in model.parameters())
    assert cost.trainable_params == params
    assert cost.gradient_bytes == cost.optimizer_state_bytes == 4 * params  # sgd-momentum
    assert cost.weight_bytes == 4 * params
    # input 3x8x8; BN0 input; ReLU0 output (= dw input); BN1 input; ReLU1 output; fc input 4
    saved = B * 4 * (3 * 8 * 8 + 4 * ACT + 4) + BN_STATS
    assert cost.saved_activation_bytes == saved
    assert cost.training_memory_bytes == 4 * params * 3 + saved


def test_single_depthwise_neuron(tiny_setup):
    model, neuron_map, state = tiny_setup
    mask = neurons(neuron_map, 4)  # row 0 of the depthwise conv
    cost = mask_cost(profile_model(model, neuron_map, (3, 8, 8)), mask, state, batch_size=B)
    assert cost.bwd_weight_flops == 2 * DW_MACS
    assert cost.bwd_input_flops == 2 * 5 * FC_MACS  # only the linear above it
    assert cost.trainable_params == 9 + 2  # 3x3 weight row + BN weight and bias
    # dw input (ReLU0 output), BN1 input, ReLU1 output; the frozen fc keeps nothing
    assert cost.saved_activation_bytes == B * 4 * 3 * ACT + BN_STATS // 2
    assert cost.flops_saved == pytest.approx(1 - (FWD + 2 * DW_MACS + 10 * FC_MACS) / FULL_TOTAL)


def test_only_last_layer_needs_nothing_below_it(tiny_setup):
    model, neuron_map, state = tiny_setup
    cost = mask_cost(
        profile_model(model, neuron_map, (3, 8, 8)), layer_mask(neuron_map, 2), state, batch_size=B
    )
    assert cost.bwd_input_flops == 0
    assert cost.bwd_weight_flops == 2 * 5 * FC_MACS
    assert cost.saved_activation_bytes == B * 4 * 4  # the linear's input, nothing else


def test_batchnorm_bias_only_starts_backward_at_the_batchnorm(tiny_setup):
    model, neuron_map, state = tiny_setup
    mask = TrainMask(neuron_map.empty_mask(), frozenset({"4.bias"}))
    cost = mask_cost(profile_model(model, neuron_map, (3, 8, 8)), mask, state, batch_size=B)
    assert cost.trainable_params == 4
    assert cost.bwd_weight_flops == 0
    assert cost.bwd_input_flops == 2 * 5 * FC_MACS
    assert cost.saved_activation_bytes == B * 4 * 2 * ACT + BN_STATS // 2


def test_empty_mask_costs_only_the_forward(tiny_setup):
    model, neuron_map, state = tiny_setup
    cost = mask_cost(
        profile_model(model, neuron_map, (3, 8, 8)),
        TrainMask(neuron_map.empty_mask()),
        state,
        batch_size=B,
    )
    assert (cost.trainable_params, cost.bwd_weight_flops, cost.bwd_input_flops) == (0, 0, 0)
    assert cost.saved_activation_bytes == cost.gradient_bytes == cost.optimizer_state_bytes == 0
    assert cost.upload_bytes == 0
    assert cost.flops_saved == pytest.approx(1 - FWD / FULL_TOTAL)


def test_head_only_saves_most():
    model = tiny()
    neuron_map = enumerate_neurons(model, always_trained=("8",))
    state = model.state_dict()
    profile = profile_model(model, neuron_map, (3, 8, 8))
    assert [lay.name for lay in profile.extra_layers] == ["8"]  # the head still costs FLOPs
    head = mask_cost(profile, neuron_map.train_mask(neuron_map.empty_mask()), state, batch_size=B)
    assert head.trainable_params == 25
    assert head.flops_saved == pytest.approx(1 - (FWD + 2 * 5 * FC_MACS) / FULL_TOTAL)
    full = mask_cost(profile, neuron_map.train_mask(~neuron_map.empty_mask()), state, batch_size=B)
    assert full.flops_saved == 0.0
    for i in range(neuron_map.num_neurons):
        one = mask_cost(
            profile, neuron_map.train_mask(neurons(neuron_map, i).neurons), state, batch_size=B
        )
        assert head.flops_saved > one.flops_saved
        assert head.training_memory_bytes < one.training_memory_bytes


def test_optimizer_state_and_bytes_per_value(tiny_setup):
    model, neuron_map, state = tiny_setup
    profile = profile_model(model, neuron_map, (3, 8, 8))
    mask = neurons(neuron_map, 0, 4)  # 29 + 11 parameters
    by_opt = {
        opt: mask_cost(profile, mask, state, batch_size=B, optimizer=opt).optimizer_state_bytes
        for opt in ("sgd", "sgd-momentum", "adamw")
    }
    assert by_opt == {"sgd": 0, "sgd-momentum": 4 * 40, "adamw": 8 * 40}
    half = mask_cost(profile, mask, state, batch_size=B, bytes_per_value=2)
    full = mask_cost(profile, mask, state, batch_size=B)
    assert half.gradient_bytes * 2 == full.gradient_bytes == 4 * 40
    assert half.upload_bytes == full.upload_bytes  # the wire is float32 whatever the training dtype


def test_upload_bytes_hand_computed_and_equal_to_the_wire(tiny_setup):
    model, neuron_map, state = tiny_setup
    mask = TrainMask(neurons(neuron_map, 4).neurons, frozenset({"8.weight", "8.bias"}))
    # 1 id; dw row 9 + BN weight, bias, running mean, running var; 2 tensor ids; 20 + 5 values
    assert upload_nbytes(neuron_map, mask, state) == 4 * (1 + 13 + 2 + 25)
    arrays = encode(state, neuron_map, mask, tensor_table(state))
    assert upload_nbytes(neuron_map, mask, state) == payload_nbytes(arrays)


def test_upload_bytes_equal_to_the_wire_on_mobilenet(mobilenet):
    model, neuron_map = mobilenet
    state = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    sel = torch.rand(neuron_map.num_neurons, generator=gen) < 0.1
    mask = neuron_map.train_mask(sel)
    assert upload_nbytes(neuron_map, mask, state) == payload_nbytes(
        encode(state, neuron_map, mask, tensor_table(state))
    )


def test_neuron_memory_costs_hand_computed(tiny_setup):
    model, neuron_map, _ = tiny_setup
    profile = profile_model(model, neuron_map, (3, 8, 8))
    costs = neuron_memory_costs(profile, batch_size=B, optimizer="sgd-momentum")
    assert costs.shape == (13,) and costs.dtype == torch.int64
    assert int(costs[0]) == 29 * 4 * 2 + B * 4 * 3 * 8 * 8
    assert int(costs[4]) == 11 * 4 * 2 + B * 4 * ACT
    assert int(costs[8]) == 5 * 4 * 2 + B * 4 * 4
    adam = neuron_memory_costs(profile, batch_size=B, optimizer="adamw")
    assert int(adam[4]) == 11 * 4 * 3 + B * 4 * ACT


def test_more_neurons_never_cost_less():
    model = tiny()
    neuron_map = enumerate_neurons(model, always_trained=("8",))
    state = model.state_dict()
    profile = profile_model(model, neuron_map, (3, 8, 8))
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        order = torch.randperm(neuron_map.num_neurons, generator=gen)
        sel = neuron_map.empty_mask()
        previous = mask_cost(profile, neuron_map.train_mask(sel), state, batch_size=B)
        for i in order:
            sel = sel.clone()
            sel[i] = True
            cost = mask_cost(profile, neuron_map.train_mask(sel), state, batch_size=B)
            assert cost.trainable_params > previous.trainable_params
            assert cost.bwd_weight_flops > previous.bwd_weight_flops
            assert cost.bwd_input_flops >= previous.bwd_input_flops
            assert cost.saved_activation_bytes >= previous.saved_activation_bytes
            assert cost.training_memory_bytes > previous.training_memory_bytes
            assert cost.upload_bytes > previous.upload_bytes
            assert cost.flops_saved <= previous.flops_saved
            previous = cost
        assert cost.flops_saved == 0.0


def test_estimate_equals_measured_saved_bytes_on_tiny(tiny_setup):
    model, neuron_map, state = tiny_setup
    profile = profile_model(model, neuron_map, (3, 8, 8))
    x = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = [layer_mask(neuron_map, i) for i in range(3)] + [
        neurons(neuron_map, i) for i in (0, 5, 12)
    ]
    masks.append(TrainMask(neuron_map.empty_mask(), frozenset({"4.bias"})))
    for mask in masks:
        estimate = mask_cost(profile, mask, state, batch_size=B).saved_activation_bytes
        assert estimate == measure_saved_bytes(model, neuron_map, mask, x)


def test_profile_and_measure_leave_the_model_as_they_found_it(tiny_setup):
    model, neuron_map, _ = tiny_setup
    model.train()
    model[4].eval()  # a mixed mode must come back as it was
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_model(model, neuron_map, (3, 8, 8))
    measure_saved_bytes(model, neuron_map, layer_mask(neuron_map, 0), torch.randn(B, 3, 8, 8))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert [m.training for m in model] == [True] * 4 + [False] + [True] * 4
    assert [p.requires_grad for p in model.parameters()] == [False] + [True] * 7
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched


class HeadFirst(nn.Module):
    """Registers its modules in the reverse of their execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.conv = nn.Conv2d(2, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def test_order_follows_execution_not_registration():
    model = HeadFirst()
    neuron_map = enumerate_neurons(model)
    assert [lay.name for lay in neuron_map.layers] == ["head", "conv"]
    profile = profile_model(model, neuron_map, (2, 5, 5))
    head, conv = profile.layers
    assert conv.order < head.order
    sel = neuron_map.empty_mask()
    sel[neuron_map.layer("head").slice] = True
    cost = mask_cost(profile, TrainMask(sel), model.state_dict(), batch_size=1)
    assert cost.bwd_input_flops == 0  # the head runs last: nothing above it
    sel = ~sel
    cost = mask_cost(profile, TrainMask(sel), model.state_dict(), batch_size=1)
    assert cost.bwd_input_flops == head.fwd_flops


def test_validation_errors(tiny_setup):
    model, neuron_map, state = tiny_setup
    profile = profile_model(model, neuron_map, (3, 8, 8))
    mask = TrainMask(neuron_map.empty_mask())
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        mask_cost(profile, mask, state, batch_size=0)
    with pytest.raises(ValueError, match="bytes_per_value"):
        mask_cost(profile, mask, state, batch_size=1, bytes_per_value=0)
    with pytest.raises(ValueError, match="optimizer must be one of .* got 'adam'"):
        mask_cost(profile, mask, state, batch_size=1, optimizer="adam")
    with pytest.raises(ValueError, match="optimizer"):
        neuron_memory_costs(profile, batch_size=1, optimizer="adam")
    with pytest.raises(ValueError, match=r"mask.neurons must have shape \(13,\), got \(3,\)"):
        mask_cost(profile, TrainMask(torch.zeros(3, dtype=torch.bool)), state, batch_size=1)
    with pytest.raises(KeyError, match="nope"):
        upload_nbytes(neuron_map, TrainMask(neuron_map.empty_mask(), frozenset({"nope"})), state)
    with pytest.raises(ValueError, match="input_shape must be"):
        profile_model(model, neuron_map, (3, 0, 8))
    with pytest.raises(ValueError, match="input_shape must be"):
        profile_model(model, neuron_map, [3, 8, 8])


def test_layers_that_do_not_run_once_are_rejected():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    model = Twice()
    neuron_map = enumerate_neurons(model)
    with pytest.raises(ValueError, match=r"\['fc'\] run more than once"):
        profile_model(model, neuron_map, (3,))
    model.forward = lambda x: model.unused(x)  # fc never runs now
    with pytest.raises(ValueError, match=r"selectable layers \['fc'\] did not run"):
        profile_model(model, neuron_map, (3,))


# --------------------------------------------------------------------------- torchvision models


@pytest.fixture(scope="module")
def mobilenet() -> tuple[nn.Module, NeuronMap]:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    return model, enumerate_neurons(model)


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, NeuronMap]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    return model, enumerate_neurons(model)


def test_mobilenet_v2_macs_at_224():
    model = torchvision.models.mobilenet_v2(weights=None)
    neuron_map = enumerate_neurons(model)
    profile = profile_model(model, neuron_map, (3, 224, 224))
    conv_macs = sum(
        lay.macs_per_neuron * lay.num_neurons
        for lay in profile.layers
        if lay.name.startswith("features")
    )
    assert len([lay for lay in profile.layers if lay.name.startswith("features")]) == 52
    assert conv_macs == pytest.approx(300e6, rel=0.02)  # the paper's ~300 M multiply-adds
    assert profile.fwd_flops == 2 * (conv_macs + 1280 * 1000)
    assert profile.layers[-1].in_shape == (1280,)


def test_resnet18_macs_at_224_and_execution_order():
    model = torchvision.models.resnet18(weights=None)
    neuron_map = enumerate_neurons(model)
    profile = profile_model(model, neuron_map, (3, 224, 224))
    assert profile.fwd_flops / 2 == pytest.approx(1.814e9, rel=0.01)  # torchvision: 1.81 GMACs
    order = {lay.name: lay.order for lay in profile.layers}
    assert order["layer2.0.conv2"] < order["layer2.0.downsample.0"] < order["layer2.1.conv1"]
    assert sorted(order, key=order.get)[0] == "conv1"
    assert sorted(order, key=order.get)[-1] == "fc"
    by_name = {lay.name: lay for lay in profile.layers}
    assert by_name["layer2.0.downsample.0"].in_shape == (64, 56, 56)
    assert by_name["layer2.0.downsample.0"].macs_per_neuron == 64 * 28 * 28


@pytest.mark.parametrize("name", ["mobilenet", "resnet"])
def test_estimate_equals_measured_saved_bytes_on_torchvision(name, request):
    model, neuron_map = request.getfixturevalue(name)
    profile = profile_model(model, neuron_map, (3, 32, 32))
    assert [lay.name for lay in profile.layers] == [lay.name for lay in neuron_map.layers]
    state = model.state_dict()
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    n = len(neuron_map.layers)
    for first in (
        0,
        1,
        n // 2,
        n - 2,
        n - 1,
    ):  # a suffix of layers: a chain, so the estimate is exact
        mask = layer_mask(neuron_map, first)
        cost = mask_cost(profile, mask, state, batch_size=B)
        assert cost.saved_activation_bytes == measure_saved_bytes(model, neuron_map, mask, x)
    full = mask_cost(profile, layer_mask(neuron_map, 0), state, batch_size=B)
    assert full.flops_saved == 0.0
    assert full.bwd_input_flops == profile.fwd_flops - profile.layers[0].fwd_flops


def test_resnet_shortcut_estimate_is_an_upper_bound(resnet):
    """One neuron of layer3.0.conv1: the downsample branch runs after it but needs no backward."""
    model, neuron_map = resnet
    profile = profile_model(model, neuron_map, (3, 32, 32))
    mask = neurons(neuron_map, neuron_map.layer("layer3.0.conv1").offset)
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    estimate = mask_cost(profile, mask, model.state_dict(), batch_size=B).saved_activation_bytes
    measured = measure_saved_bytes(model, neuron_map, mask, x)
    # the downsample BatchNorm's input (256x2x2 per sample) and statistics (2x256)
    assert estimate - measured == 4 * (B * 256 * 2 * 2 + 2 * 256)
