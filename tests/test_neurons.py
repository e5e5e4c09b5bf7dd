"""Neuron enumeration: exact parameter accounting, depthwise cost, BatchNorm attachment."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2, resnet18

from fedneq.models import get_model, model_head
from fedneq.neurons import enumerate_neurons


def _accounted(model: nn.Module, nmap) -> int:
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    return nmap.selectable_params + sum(sizes[n] for n in nmap.always_trained + nmap.never_trained)


@pytest.mark.parametrize(
    "build,head",
    [
        (lambda: mobilenet_v2(), "classifier"),
        (lambda: mobilenet_v2(width_mult=0.5), "classifier"),
        (lambda: mobilenet_v2(width_mult=1.4), "classifier"),
        (lambda: resnet18(), "fc"),
        (lambda: get_model("small-cnn", num_classes=10, in_channels=1), "head"),
    ],
    ids=["mobilenet_v2", "mobilenet_v2-0.5", "mobilenet_v2-1.4", "resnet18", "small-cnn"],
)
def test_every_parameter_is_accounted_for_exactly_once(build, head) -> None:
    model = build()
    total = sum(p.numel() for p in model.parameters())
    nmap = enumerate_neurons(model, always_trained=(head,))
    assert nmap.total_params == total
    assert _accounted(model, nmap) == total
    # no parameter tensor is claimed twice
    claimed = [k for layer in nmap.layers for k in layer.param_tensors]
    claimed += list(nmap.always_trained) + list(nmap.never_trained)
    assert sorted(claimed) == sorted(n for n, _ in model.named_parameters())
    assert int(nmap.costs().sum()) == nmap.selectable_params
    # with the head selectable too, nothing is left over in these models
    everything = enumerate_neurons(model)
    assert everything.selectable_params == total and not everything.never_trained


def test_mobilenet_v2_layers_and_batchnorm_attachment() -> None:
    model = mobilenet_v2()
    nmap = enumerate_neurons(model, always_trained=("classifier",))
    assert len(nmap.layers) == 52  # every Conv2d; the Linear head is always-trained
    assert all(layer.bn is not None for layer in nmap.layers)
    conv_weights = sum(layer.weight_row_numel * layer.num_neurons for layer in nmap.layers)
    assert conv_weights == 2_189_760  # DESIGN.md: MobileNetV2's conv-weight parameters
    stem = nmap.layer("features.0.0")
    assert stem.tensors == (
        "features.0.0.weight", "features.0.1.weight", "features.0.1.bias",
        "features.0.1.running_mean", "features.0.1.running_var",
    )  # fmt: skip
    assert stem.cost == 3 * 3 * 3 + 2


def test_depthwise_neuron_costs_k_by_k() -> None:
    model = mobilenet_v2()
    nmap = enumerate_neurons(model)
    dw = nmap.layer("features.2.conv.1.0")  # block 2's 3x3 depthwise conv, 96 channels
    assert model.get_submodule("features.2.conv.1.0").groups == 96
    assert dw.weight_row_numel == 3 * 3
    assert dw.cost == 3 * 3 + 2  # + its BatchNorm's weight and bias
    grouped = nn.Sequential(nn.Conv2d(8, 4, 5, groups=2, bias=True))
    (layer,) = enumerate_neurons(grouped).layers
    assert layer.cost == (8 // 2) * 5 * 5 + 1


def test_resnet18_downsample_batchnorm_and_neuron_order() -> None:
    nmap = enumerate_neurons(resnet18(), always_trained=("fc",))
    down = nmap.layer("layer2.0.downsample.0")
    assert down.bn == "layer2.0.downsample.1"
    offsets = [layer.offset for layer in nmap.layers]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert nmap.num_neurons == sum(layer.num_neurons for layer in nmap.layers)


def test_row_masks_follow_the_selected_neurons() -> None:
    model = get_model("small-cnn", num_classes=3, in_channels=1)
    nmap = enumerate_neurons(model, always_trained=(model_head("small-cnn"),))
    selected = nmap.empty_mask()
    first = nmap.layers[0]
    selected[first.offset + 2] = True
    state = model.state_dict()
    rows = nmap.row_masks(nmap.train_mask(selected), state)
    for key in first.tensors:
        assert rows[key].tolist() == [i == 2 for i in range(first.num_neurons)]
    assert all(rows[k].all() for k in nmap.always_trained)
    assert set(rows) == set(first.tensors) | set(nmap.always_trained)
    assert nmap.mask_params(nmap.train_mask(selected), state, [n for n, _ in model.named_parameters()]) == (
        first.cost + sum(state[k].numel() for k in nmap.always_trained)
    )


def test_bad_models_and_prefixes_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="no selectable layer"):
        enumerate_neurons(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="no selectable layer"):
        enumerate_neurons(nn.Sequential(nn.Linear(3, 2)), always_trained=("0",))
    with pytest.raises(ValueError, match="always_trained prefix 'head'"):
        enumerate_neurons(nn.Sequential(nn.Linear(3, 2)), always_trained=("head",))
    nmap = enumerate_neurons(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="shape"):
        nmap.train_mask(torch.ones(5, dtype=torch.bool))
