"""Static Sparse Update schemes: the paper's MobileNetV2 counts and the scheme rules."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import ranked_tiny_cnn
from torch import nn

from fedneq.neurons import NeuronMap, enumerate_neurons
from fedneq.selection.sparse_update import (
    SCHEMES,
    StaticScheme,
    conv_modules,
    conv_weight_params,
    get_scheme,
    scheme_bias_tensors,
    scheme_channels,
    scheme_conv_weight_params,
    scheme_mask,
    scheme_neuron_order,
)

# The paper's conv-weight parameter counts (DESIGN.md, section 2).
PAPER_COUNTS = {"SU-1": 192_312, "SU-3": 464_640, "SU-5": 675_840}


@pytest.fixture(scope="module")
def mbv2() -> nn.Module:
    torch.manual_seed(0)  # weights=None: random init, nothing downloaded
    return torchvision.models.mobilenet_v2(weights=None, width_mult=1.0, num_classes=1000)


@pytest.fixture(scope="module")
def mbv2_map(mbv2: nn.Module) -> NeuronMap:
    return enumerate_neurons(mbv2, always_trained=["classifier"])


def selected_weight_params(mask_neurons: torch.Tensor, neuron_map: NeuronMap) -> int:
    """Independent recount: sum of weight-row numel over the selected neurons."""
    return sum(
        layer.weight_row_numel * int(mask_neurons[layer.slice].sum()) for layer in neuron_map.layers
    )


def test_mobilenet_v2_conv_indexing(mbv2: nn.Module) -> None:
    convs = conv_modules(mbv2)
    assert len(convs) == 52
    assert conv_weight_params(mbv2) == 2_189_760
    names = {i: n for i, (n, _) in enumerate(convs)}
    assert names[0] == "features.0.0"  # stem
    assert names[1] == "features.1.conv.0.0"  # block 0: depthwise (no expand)
    assert names[2] == "features.1.conv.1"  # block 0: project
    # block b >= 1 (torchvision features[b + 1]) -> 3b expand, 3b+1 depthwise, 3b+2 project
    for b in range(1, 17):
        assert names[3 * b] == f"features.{b + 1}.conv.0.0"
        assert names[3 * b + 1] == f"features.{b + 1}.conv.1.0"
        assert names[3 * b + 2] == f"features.{b + 1}.conv.2"
        assert convs[3 * b + 1][1].groups == convs[3 * b + 1][1].out_channels  # depthwise
    assert names[51] == "features.18.0"


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_scheme_counts(name: str, mbv2: nn.Module, mbv2_map: NeuronMap) -> None:
    scheme = get_scheme(name)
    assert scheme_conv_weight_params(scheme, mbv2) == PAPER_COUNTS[name]
    mask = scheme_mask(scheme, mbv2, mbv2_map)
    assert selected_weight_params(mask.neurons, mbv2_map) == PAPER_COUNTS[name]
    # bias-only tensors: the BatchNorm biases of the last `bias_depth` convs, plus the head
    biases = mask.full_tensors - set(mbv2_map.always_trained)
    assert len(biases) == scheme.bias_depth
    last = conv_modules(mbv2)[52 - scheme.bias_depth :]
    assert biases == {f"{mbv2_map.layer(n).bn}.bias" for n, _ in last}
    assert set(mbv2_map.always_trained) <= mask.full_tensors


def test_su1_channel_counts_and_depthwise_cost(mbv2: nn.Module, mbv2_map: NeuronMap) -> None:
    counts = {i: int(ch.numel()) for i, ch in scheme_channels(get_scheme("SU-1"), mbv2).items()}
    assert counts == {36: 576, 39: 576, 40: 0, 41: 40, 42: 120, 45: 120, 48: 120, 49: 120}
    depthwise = mbv2_map.layer(conv_modules(mbv2)[49][0])
    assert depthwise.weight_row_numel == 9  # k*k, not C_in*k*k
    assert depthwise.cost == 9 + 2  # + its BatchNorm weight and bias
    mask = scheme_mask(get_scheme("SU-1"), mbv2, mbv2_map)
    assert int(mask.neurons[depthwise.slice].sum()) == 120  # 120 * 9 = 1080 weight params


def test_channels_are_largest_weight_row_norms(mbv2: nn.Module) -> None:
    convs = conv_modules(mbv2)
    for idx, ch in scheme_channels(get_scheme("SU-3"), mbv2).items():
        weight = convs[idx][1].weight.detach()
        norms = weight.flatten(1).norm(dim=1)
        chosen = torch.zeros(weight.shape[0], dtype=torch.bool)
        chosen[ch] = True
        if 0 < ch.numel() < weight.shape[0]:
            assert norms[chosen].min() >= norms[~chosen].max()


@pytest.fixture
def tiny() -> nn.Module:
    return ranked_tiny_cnn()


def test_tiny_scheme_by_hand(tiny: nn.Module) -> None:
    nm = enumerate_neurons(tiny, always_trained=["fc"])
    scheme = StaticScheme("t", {2: 0.25, 0: 0.5}, bias_depth=2)
    assert list(scheme.weights) == [0, 2]  # stored in layer order
    channels = scheme_channels(scheme, tiny)
    assert channels[0].tolist() == [1, 2]  # conv1 rows 0.5, 0.3 are the largest
    assert channels[2].tolist() == [2, 6]  # conv3 rows 2.0, 1.0
    assert scheme_conv_weight_params(scheme, tiny) == 2 * 27 + 2 * 4
    # biases: conv2 has none -> the BatchNorm after it; conv3 has its own
    assert scheme_bias_tensors(scheme, tiny) == ("bn2.bias", "conv3.bias")
    mask = scheme_mask(scheme, tiny, nm)
    assert torch.nonzero(mask.neurons).flatten().tolist() == [1, 2, 10, 14]  # conv3 offset 8
    assert mask.full_tensors == {"bn2.bias", "conv3.bias", "fc.weight", "fc.bias"}
    # layer order first, then weight-row norm
    assert scheme_neuron_order(scheme, tiny, nm).tolist() == [1, 2, 10, 14]
    flipped = StaticScheme("f", {0: 0.5, 2: 0.25}, bias_depth=0)
    with torch.no_grad():
        tiny.conv1.weight[2] = 0.9
        tiny.conv3.weight[6] = 3.0
    assert scheme_neuron_order(flipped, tiny, nm).tolist() == [2, 1, 14, 10]


def test_bad_schemes(tiny: nn.Module) -> None:
    nm = enumerate_neurons(tiny, always_trained=["fc"])
    with pytest.raises(ValueError, match=r"conv indices \[3\].*3 Conv2d modules"):
        scheme_mask(StaticScheme("x", {3: 1.0}, bias_depth=0), tiny, nm)
    with pytest.raises(ValueError, match="bias_depth=4"):
        scheme_mask(StaticScheme("x", {0: 1.0}, bias_depth=4), tiny, nm)
    with pytest.raises(ValueError, match=r"ratio of conv 0 must be in \[0, 1\], got 1.5"):
        StaticScheme("x", {0: 1.5}, bias_depth=0)
    with pytest.raises(ValueError, match="conv index must be an int >= 0, got -1"):
        StaticScheme("x", {-1: 1.0}, bias_depth=0)
    with pytest.raises(ValueError, match="bias_depth must be an int >= 0, got -2"):
        StaticScheme("x", {}, bias_depth=-2)
    with pytest.raises(ValueError, match=r"scheme must be one of \['SU-1', 'SU-3', 'SU-5'\]"):
        get_scheme("SU-2")
    frozen_conv1 = enumerate_neurons(tiny, never_trained=["conv1"])
    with pytest.raises(ValueError, match="conv 0 .*'conv1'.* not a selectable layer"):
        scheme_mask(StaticScheme("x", {0: 0.5}, bias_depth=0), tiny, frozen_conv1)


def test_paper_mobilenet_scheme_fails_on_small_model(tiny: nn.Module) -> None:
    nm = enumerate_neurons(tiny)
    with pytest.raises(ValueError, match="names conv indices"):
        scheme_mask(SCHEMES["SU-1"], tiny, nm)
