"""Static Sparse Update (SU) schemes.

Lin et al., "On-device training under 256kB memory", NeurIPS 2022
(https://arxiv.org/abs/2206.15472). An offline search picks a fixed
sub-network — some conv layers with a ratio of their output channels, plus
the biases of the last ``bias_depth`` convs — and the same sub-network is
trained on every task.

Conventions
-----------
* **Conv index**: position of a module among the model's ``nn.Conv2d`` modules
  in ``named_modules()`` order. For torchvision ``mobilenet_v2`` (52 convs):
  0 = stem, 1/2 = block 0's depthwise/project (it has no expand conv), block
  ``b >= 1`` -> ``3b`` expand, ``3b+1`` depthwise, ``3b+2`` project, 51 = the
  last 1x1 conv.
* **Channels** of a scheme layer: the ``round(ratio * out_channels)`` output
  channels (half rounds up) with the largest weight-row L2 norm, ties to the
  lower channel index.
* **Bias depth** ``N``: the biases of the last ``N`` convs — ``conv.bias`` if
  present, else the bias of the BatchNorm registered right after the conv.
  They are trained as whole tensors (``TrainMask.full_tensors``), outside
  any neuron budget.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from fedneq.neurons import NeuronLayer, NeuronMap, TrainMask

__all__ = [
    "SCHEMES",
    "StaticScheme",
    "conv_modules",
    "conv_weight_params",
    "get_scheme",
    "tail_scheme",
    "scheme_bias_tensors",
    "scheme_channels",
    "scheme_conv_weight_params",
    "scheme_mask",
    "scheme_neuron_order",
    "scheme_neurons",
    "weight_row_norms",
]


@dataclass(frozen=True)
class StaticScheme:
    """A Sparse Update scheme: conv index -> ratio of output channels, and a bias depth.

    ``weights`` is stored sorted by conv index (the scheme's layer order).
    """

    name: str
    weights: dict[int, float]  # conv index -> ratio of output channels trained
    bias_depth: int

    def __post_init__(self) -> None:
        for idx, ratio in self.weights.items():
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise ValueError(
                    f"scheme {self.name!r}: conv index must be an int >= 0, got {idx!r}"
                )
            if (
                isinstance(ratio, bool)
                or not isinstance(ratio, numbers.Real)
                or not 0 <= ratio <= 1
            ):
                raise ValueError(
                    f"scheme {self.name!r}: ratio of conv {idx} must be in [0, 1], got {ratio!r}"
                )
        if (
            isinstance(self.bias_depth, bool)
            or not isinstance(self.bias_depth, int)
            or self.bias_depth < 0
        ):
            raise ValueError(
                f"scheme {self.name!r}: bias_depth must be an int >= 0, got {self.bias_depth!r}"
            )
        object.__setattr__(
            self, "weights", {idx: float(self.weights[idx]) for idx in sorted(self.weights)}
        )


_DEEP_EXPANDS = (27, 30, 33, 36, 39, 42, 45, 48)

SCHEMES: dict[str, StaticScheme] = {
    s.name: s
    for s in (
        StaticScheme(
            "SU-1",
            {36: 1, 39: 1, 40: 0, 41: 0.25, 42: 0.125, 45: 0.125, 48: 0.125, 49: 0.125},
            bias_depth=16,
        ),
        StaticScheme(
            "SU-3",
            {27: 1, 30: 1, 33: 1, 36: 1, 39: 1, 42: 0.125, 45: 0.5, 48: 1},
            bias_depth=25,
        ),
        StaticScheme("SU-5", dict.fromkeys(_DEEP_EXPANDS, 1.0), bias_depth=34),
    )
}
"""The paper's three MobileNetV2 schemes (torchvision ``mobilenet_v2`` conv indices)."""


def get_scheme(name: str) -> StaticScheme:
    """The shipped scheme called ``name`` (``"SU-1"``, ``"SU-3"``, ``"SU-5"``)."""
    if name not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {name!r}")
    return SCHEMES[name]


def tail_scheme(model: nn.Module, neuron_map: NeuronMap, budget: int) -> StaticScheme:
    """An SU-style scheme for any model: the deepest convs first, whole, within ``budget``.

    Sparse Update's searched schemes train the last layers; for a model with
    no shipped scheme this takes selectable convs from the last one backwards,
    every output channel while the layer fits, then as many channels of the
    next layer as fit, and stops (bias depth 0: a neuron's biases are in it).
    """
    if budget <= 0:
        raise ValueError(f"budget must be > 0 parameters, got {budget}")
    selectable = {layer.name: layer for layer in neuron_map.layers}
    weights: dict[int, float] = {}
    remaining = budget
    for idx, (name, _) in reversed(list(enumerate(conv_modules(model)))):
        layer = selectable.get(name)
        if layer is None:
            continue
        take = min(layer.num_neurons, remaining // layer.cost)
        if take:
            weights[idx] = take / layer.num_neurons
            remaining -= take * layer.cost
        if weights and take < layer.num_neurons:
            break
    return StaticScheme("SU-tail", weights, bias_depth=0)


def conv_modules(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """``(qualified name, module)`` of every ``nn.Conv2d``, in conv-index order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def conv_weight_params(model: nn.Module) -> int:
    """Total number of conv weight parameters (the paper's budget denominator)."""
    return sum(m.weight.numel() for _, m in conv_modules(model))


def weight_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """(out,) L2 norm of every output row of a weight tensor."""
    return weight.detach().flatten(1).norm(dim=1)  # (out,)


def _checked_convs(scheme: StaticScheme, model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    convs = conv_modules(model)
    bad = [idx for idx in scheme.weights if idx >= len(convs)]
    if bad:
        raise ValueError(
            f"scheme {scheme.name!r} names conv indices {bad}, but "
            f"{type(model).__name__} has {len(convs)} Conv2d modules (indices 0..{len(convs) - 1})"
        )
    if scheme.bias_depth > len(convs):
        raise ValueError(
            f"scheme {scheme.name!r} has bias_depth={scheme.bias_depth}, but "
            f"{type(model).__name__} has only {len(convs)} Conv2d modules"
        )
    return convs


def scheme_channels(scheme: StaticScheme, model: nn.Module) -> dict[int, torch.Tensor]:
    """Selected output channels (int64, ascending) of every scheme layer, by conv index."""
    convs = _checked_convs(scheme, model)
    channels: dict[int, torch.Tensor] = {}
    for idx, ratio in scheme.weights.items():
        conv = convs[idx][1]
        count = int(ratio * conv.out_channels + 0.5)
        order = torch.sort(weight_row_norms(conv.weight), descending=True, stable=True).indices
        channels[idx] = torch.sort(order[:count]).values
    return channels


def scheme_conv_weight_params(scheme: StaticScheme, model: nn.Module) -> int:
    """Conv weight parameters the scheme trains (the paper's accounting)."""
    convs = conv_modules(model)
    return sum(
        int(ch.numel()) * convs[idx][1].weight[0].numel()
        for idx, ch in scheme_channels(scheme, model).items()
    )


def scheme_bias_tensors(scheme: StaticScheme, model: nn.Module) -> tuple[str, ...]:
    """``state_dict`` keys of the biases of the last ``bias_depth`` convs."""
    convs = _checked_convs(scheme, model)
    if scheme.bias_depth == 0:
        return ()
    modules = [(n, m) for n, m in model.named_modules() if n]
    position = {n: i for i, (n, _) in enumerate(modules)}
    keys: list[str] = []
    for name, conv in convs[len(convs) - scheme.bias_depth :]:
        if conv.bias is not None:
            keys.append(f"{name}.bias")
            continue
        i = position[name]
        nxt = modules[i + 1][1] if i + 1 < len(modules) else None
        if (
            isinstance(nxt, nn.BatchNorm2d)
            and nxt.num_features == conv.out_channels
            and nxt.bias is not None
        ):
            keys.append(f"{modules[i + 1][0]}.bias")
            continue
        raise ValueError(
            f"scheme {scheme.name!r}: conv {name!r} is within bias_depth={scheme.bias_depth} "
            "but has no bias and no BatchNorm with a bias right after it"
        )
    return tuple(keys)


def _layer_of(neuron_map: NeuronMap, scheme: StaticScheme, idx: int, name: str) -> NeuronLayer:
    try:
        return neuron_map.layer(name)
    except KeyError:
        raise ValueError(
            f"scheme {scheme.name!r} trains conv {idx} ({name!r}), which is not a "
            "selectable layer of the neuron map (always- or never-trained)"
        ) from None


def scheme_neurons(
    scheme: StaticScheme, model: nn.Module, neuron_map: NeuronMap
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global indices (int64, ascending) of the scheme's neurons and their weight-row L2 norms."""
    convs = conv_modules(model)
    indices: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)]
    norms: list[torch.Tensor] = [torch.zeros(0)]
    for idx, ch in scheme_channels(scheme, model).items():
        if ch.numel() == 0:
            continue
        name, conv = convs[idx]
        layer = _layer_of(neuron_map, scheme, idx, name)
        indices.append(layer.offset + ch)
        norms.append(weight_row_norms(conv.weight)[ch].float())
    index, norm = torch.cat(indices), torch.cat(norms)
    order = torch.argsort(index)
    return index[order], norm[order]


def scheme_neuron_order(
    scheme: StaticScheme, model: nn.Module, neuron_map: NeuronMap
) -> torch.Tensor:
    """The scheme's neurons ranked by layer order, then weight-row norm descending."""
    index, norm = scheme_neurons(scheme, model, neuron_map)
    by_norm = index[torch.sort(norm, descending=True, stable=True).indices]
    layer = neuron_map.layer_index()[by_norm]
    return by_norm[torch.sort(layer, stable=True).indices]


def scheme_mask(scheme: StaticScheme, model: nn.Module, neuron_map: NeuronMap) -> TrainMask:
    """The scheme's :class:`TrainMask`: its neurons, its bias tensors, the always-trained set.

    Raises
    ------
    ValueError
        If the scheme names a conv index the model does not have, a conv outside
        the neuron map, or a bias the model does not have, or the bias is never trained.
    """
    neurons = neuron_map.empty_mask()
    neurons[scheme_neurons(scheme, model, neuron_map)[0]] = True
    biases = scheme_bias_tensors(scheme, model)
    frozen = set(neuron_map.never_trained) & set(biases)
    if frozen:
        raise ValueError(
            f"scheme {scheme.name!r} trains biases {sorted(frozen)}, which the neuron map "
            "marks as never trained"
        )
    return neuron_map.train_mask(neurons, biases)
