"""Pricing a mask with the cost model: FLOPs, training memory and upload bytes.

:func:`mask_cost` prices any :class:`~fedneq.neurons.TrainMask` with plain
arithmetic on a :class:`~fedneq.costs.profile.CostProfile` (the conventions
are :mod:`fedneq.costs`'s); :func:`upload_nbytes` is the bytes of the sparse
reply, :func:`neuron_memory_costs` what each neuron adds alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedneq._validate import check_int, owner, row_numel
from fedneq.costs.profile import CostProfile, per_neuron
from fedneq.neurons import NeuronMap, TrainMask

__all__ = [
    "OPTIMIZER_STATES",
    "FilterPricing",
    "MaskCost",
    "mask_cost",
    "neuron_memory_costs",
    "upload_nbytes",
]

# values of optimizer state per trained parameter
OPTIMIZER_STATES: dict[str, int] = {"sgd": 0, "sgd-momentum": 1, "adamw": 2}

_WIRE_BYTES = 4  # int32 indices and float32 values (fedneq.federation.wire)


@dataclass(frozen=True)
class MaskCost:
    """The cost of training one mask (FLOPs per sample, bytes per batch)."""

    trainable_params: int  # parameters of selected neurons + whole tensors that are parameters
    fwd_flops: int
    bwd_weight_flops: int
    bwd_input_flops: int
    saved_activation_bytes: int
    upload_bytes: int
    optimizer_state_bytes: int
    gradient_bytes: int
    weight_bytes: int  # every parameter of the model
    training_memory_bytes: int  # weights + gradients + optimizer state + saved activations
    flops_saved: float  # 1 - total FLOPs / total FLOPs of the full mask

    @property
    def total_flops(self) -> int:
        return self.fwd_flops + self.bwd_weight_flops + self.bwd_input_flops


def _check_optimizer(optimizer: str) -> int:
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    return OPTIMIZER_STATES[optimizer]


def _check_mask(neuron_map: NeuronMap, mask: TrainMask) -> None:
    n = neuron_map.num_neurons
    if mask.neurons.shape != (n,):
        raise ValueError(f"mask.neurons must have shape ({n},), got {tuple(mask.neurons.shape)}")


def _param_names(neuron_map: NeuronMap) -> set[str]:
    """Every parameter of the model: each is in a neuron, always- or never-trained."""
    names = set(neuron_map.always_trained) | set(neuron_map.never_trained)
    for layer in neuron_map.layers:
        names.update(layer.param_tensors)
    return names


@dataclass(frozen=True)
class FilterPricing:
    """How gradient filtering changes one conv's price (:mod:`fedneq.training.grad_filter`).

    ``saved_divisor``: its saved input is a patch mean, ``(stride * r)^2``
    times smaller (a new tensor: one another module keeps stays whole).
    ``flop_factor``: both of its backward gradients cost this times the exact
    ones (``K_h K_w / (k_h k_w r^2)``, ``K`` the reduced kernel); the patch
    averaging and upsampling passes are not counted.
    """

    saved_divisor: int
    flop_factor: float

    def __post_init__(self) -> None:
        check_int("saved_divisor", self.saved_divisor, 1)
        if not 0 < self.flop_factor <= 1:
            raise ValueError(f"flop_factor must be in (0, 1], got {self.flop_factor!r}")


@dataclass(frozen=True)
class _Flops:
    fwd: int
    bwd_weight: int
    bwd_input: int
    start: int | None  # order of the earliest module with a trained parameter
    trained_modules: frozenset[str]

    @property
    def total(self) -> int:
        return self.fwd + self.bwd_weight + self.bwd_input


def _flops(
    profile: CostProfile,
    mask: TrainMask,
    state: Mapping[str, torch.Tensor],
    grad_filter: Mapping[str, FilterPricing] | None = None,
) -> _Flops:
    _check_mask(profile.neuron_map, mask)
    rows = profile.neuron_map.row_masks(mask, dict(state))
    params = _param_names(profile.neuron_map)
    trained_modules = frozenset(owner(k) for k in rows if k in params)
    orders = []
    for module in sorted(trained_modules):
        try:
            orders.append(profile.order_of(module))
        except KeyError as err:
            raise ValueError(
                f"mask trains parameters of module {module!r}, which did not run in the "
                "profiling forward pass"
            ) from err
    start = min(orders) if orders else None

    compute = profile.layers + profile.extra_layers
    factor = {n: f.flop_factor for n, f in (grad_filter or {}).items()}
    bwd_weight = 0
    for lay in compute:
        trained_rows = rows.get(f"{lay.name}.weight")
        if trained_rows is not None and f"{lay.name}.weight" in params:
            flops = 2 * lay.macs_per_neuron * int(trained_rows.sum())
            bwd_weight += round(flops * factor.get(lay.name, 1.0))
    bwd_input = 0
    if start is not None:
        bwd_input = sum(
            round(lay.fwd_flops * factor.get(lay.name, 1.0)) for lay in compute if lay.order > start
        )
    return _Flops(profile.fwd_flops, bwd_weight, bwd_input, start, trained_modules)


def _saved_bytes(
    profile: CostProfile,
    flops: _Flops,
    batch_size: int,
    bytes_per_value: int,
    grad_filter: Mapping[str, FilterPricing] | None = None,
) -> int:
    if flops.start is None:
        return 0
    grad_filter = grad_filter or {}
    kept: dict[int | tuple[str, int], int] = {}
    for act in profile.saved:
        if act.order < flops.start:
            continue
        if act.only_if_trained and act.module not in flops.trained_modules:
            continue
        copies = batch_size if act.batched else 1
        key: int | tuple[str, int] = act.key
        numel = act.numel
        if act.module in grad_filter:  # a filtered conv keeps its own patch means
            key, numel = (act.module, act.key), numel // grad_filter[act.module].saved_divisor
        kept[key] = copies * numel * (act.itemsize or bytes_per_value)
    return sum(kept.values())


def upload_nbytes(neuron_map: NeuronMap, mask: TrainMask, state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the four wire arrays (:mod:`fedneq.federation.wire`) that send ``mask``'s values.

    ``4 * K`` neuron ids + ``4 *`` every row of every selected neuron over its
    layer's ``tensors`` (parameters and BatchNorm running statistics) +
    ``4 * T`` tensor ids + ``4 *`` every value of the ``T`` whole tensors.
    """
    _check_mask(neuron_map, mask)
    values = 0
    for layer in neuron_map.layers:
        k = int(mask.neurons[layer.slice].sum())
        if k:
            values += k * sum(row_numel(state[key]) for key in layer.tensors)
    for key in mask.full_tensors:
        if key not in state:
            raise KeyError(f"mask.full_tensors names {key!r}, which is not in state")
        values += state[key].numel()
    ids = int(mask.neurons.sum()) + len(mask.full_tensors)
    return _WIRE_BYTES * (ids + values)


def mask_cost(
    profile: CostProfile,
    mask: TrainMask,
    state: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    optimizer: str = "sgd-momentum",
    bytes_per_value: int = 4,
    dense_grads: bool = False,
    grad_filter: Mapping[str, FilterPricing] | None = None,
) -> MaskCost:
    """Price one local training step with ``mask``.

    Parameters
    ----------
    profile:
        :func:`profile_model` of the model.
    mask:
        What training may change.
    state:
        The model's ``state_dict()`` (shapes of whole tensors, upload sizes).
    batch_size:
        Samples per step: saved activations scale with it; FLOPs are per sample.
    optimizer:
        ``"sgd"`` (no state), ``"sgd-momentum"`` (1 value per trained
        parameter) or ``"adamw"`` (2).
    bytes_per_value:
        Bytes of one weight / gradient / activation value (4 = float32).
    dense_grads:
        ``False`` (default): gradients and optimizer state of the trained rows
        only (a sparse-update implementation). ``True``: of every whole
        parameter tensor with a trained row, which is what PyTorch's ``.grad``
        and ``torch.optim`` state hold, so what fedneq's training allocates
        (:func:`fedneq.training.loop.measure_step_memory` measures it).
    grad_filter:
        Convs whose backward runs gradient-filtered, with their
        :class:`FilterPricing` (:func:`fedneq.training.grad_filter.filter_pricing`);
        ``flops_saved`` is then relative to the exact full mask.

    Notes
    -----
    Saved activations: let ``E`` be the execution order of the earliest
    module with a trained parameter (a selected neuron's layer, or the owner
    of a trained whole tensor, e.g. a BatchNorm bias). Every module call at
    order ``>= E`` keeps what :class:`SavedActivation` lists for it: a
    Conv2d its input (trained or not, as PyTorch does), a Linear its input
    only when it trains, a BatchNorm its input, an activation its input or
    output, max-pooling its input and indices, dropout its mask. A tensor
    kept by several modules (a ReLU output that is the next conv's input) is
    counted once. Each tensor costs ``batch_size * numel * bytes_per_value``
    (max-pool indices: 8 bytes per element), except BatchNorm's per-channel
    mean and inverse std, kept once per batch. Calls before ``E`` keep
    nothing; functional ops are not seen. On a chain this equals
    :func:`measure_saved_bytes` exactly; across a branch that needs no
    backward (a ResNet downsample shortcut above ``E``) it is an upper bound.

    Raises
    ------
    ValueError
        Bad ``batch_size`` / ``optimizer`` / ``bytes_per_value``, a mask of
        the wrong size, or one training a module that did not run.
    KeyError
        If ``mask.full_tensors`` names a tensor not in ``state``.
    """
    check_int("batch_size", batch_size, 1)
    check_int("bytes_per_value", bytes_per_value, 1)
    states = _check_optimizer(optimizer)
    neuron_map = profile.neuron_map
    flops = _flops(profile, mask, state, grad_filter)
    full = _flops(profile, neuron_map.train_mask(~neuron_map.empty_mask()), state)

    trainable = neuron_map.mask_params(mask, dict(state), sorted(_param_names(neuron_map)))
    saved = _saved_bytes(profile, flops, batch_size, bytes_per_value, grad_filter)
    held = trainable
    if dense_grads:
        params = _param_names(neuron_map)
        rows = neuron_map.row_masks(mask, dict(state))
        held = sum(state[key].numel() for key in rows if key in params)
    gradient = held * bytes_per_value
    optimizer_state = states * held * bytes_per_value
    weights = neuron_map.total_params * bytes_per_value
    return MaskCost(
        trainable_params=trainable,
        fwd_flops=flops.fwd,
        bwd_weight_flops=flops.bwd_weight,
        bwd_input_flops=flops.bwd_input,
        saved_activation_bytes=saved,
        upload_bytes=upload_nbytes(neuron_map, mask, state),
        optimizer_state_bytes=optimizer_state,
        gradient_bytes=gradient,
        weight_bytes=weights,
        training_memory_bytes=weights + gradient + optimizer_state + saved,
        flops_saved=1.0 - flops.total / full.total,
    )


def neuron_memory_costs(
    profile: CostProfile,
    *,
    batch_size: int,
    optimizer: str = "sgd-momentum",
    bytes_per_value: int = 4,
) -> torch.Tensor:
    """(N,) int64 bytes that selecting each neuron alone adds to training memory.

    ``cost_i * bytes * (1 + optimizer states)`` (its gradient and optimizer
    state) plus ``batch_size * prod(in_shape) * bytes``: the input activation
    its layer must keep for the weight gradient (paid once per layer, charged
    to every neuron as if it were alone). The activations of the backward
    region above the layer are not included: they depend on the earliest
    selected layer, not on one neuron.
    """
    check_int("batch_size", batch_size, 1)
    check_int("bytes_per_value", bytes_per_value, 1)
    states = _check_optimizer(optimizer)
    per_param = bytes_per_value * (1 + states)
    inputs = [batch_size * math.prod(lay.in_shape) * bytes_per_value for lay in profile.layers]
    activation = per_neuron(profile.layers, inputs)
    return profile.neuron_map.costs() * per_param + activation
