"""What training a :class:`~fedneq.neurons.TrainMask` costs: FLOPs, memory, upload.

Kept apart from training, like MIT tiny-training's memory cost model: one
forward pass with hooks (:func:`profile_model`) records the shapes, the
execution order and the activations of a model; :func:`mask_cost` then prices
any mask with plain arithmetic.

Conventions
-----------
* **FLOPs** are ``2 x`` multiply-accumulates of ``Conv2d`` and ``Linear``
  layers, per sample. One output neuron of a conv costs
  ``(C_in / groups * kh * kw) * H_out * W_out`` MACs (depthwise:
  ``kh * kw * H_out * W_out``), one of a linear ``in_features``. BatchNorm,
  activations, pooling and biases are not counted.
* The backward pass of a layer costs its forward twice: once for the weight
  gradient (only the rows of trained neurons) and once for the input
  gradient. The input gradient is needed by every Conv2d/Linear *strictly
  after*, in execution order, the earliest module with a trained parameter;
  nothing at or below it is differentiated. The model is treated as a chain
  in execution order, so for branches (a ResNet shortcut) this is an upper
  bound.
* **Memory** assumes what :class:`~fedneq.training.masking.RowFreezer` does: a
  parameter with no trainable row has ``requires_grad=False``, so autograd
  records nothing below the earliest trained module. Gradients and optimizer
  state are counted for the trained parameters only (a sparse-update
  implementation; PyTorch's dense ``.grad`` holds whole tensors).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask

__all__ = [
    "OPTIMIZER_STATES",
    "CostProfile",
    "LayerProfile",
    "MaskCost",
    "SavedActivation",
    "mask_cost",
    "measure_saved_bytes",
    "neuron_memory_costs",
    "profile_model",
    "upload_nbytes",
]

# values of optimizer state per trained parameter
OPTIMIZER_STATES: dict[str, int] = {"sgd": 0, "sgd-momentum": 1, "adamw": 2}

_WIRE_BYTES = 4  # int32 indices and float32 values (fedneq.federation.wire)


@dataclass(frozen=True)
class LayerProfile:
    """One Conv2d / Linear as run by the profiling forward pass (per-sample shapes)."""

    name: str  # qualified module name
    order: int  # position of its call among all recorded module calls
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    num_neurons: int
    macs_per_neuron: int  # forward multiply-accumulates of one output neuron, per sample

    @property
    def fwd_flops(self) -> int:
        """Forward FLOPs of the whole layer, per sample."""
        return 2 * self.macs_per_neuron * self.num_neurons


@dataclass(frozen=True)
class SavedActivation:
    """One tensor autograd keeps for the backward pass of one module call."""

    module: str  # qualified name of the module whose backward needs it
    order: int  # call order of that module
    key: int  # identity: activations with equal keys are one tensor (counted once)
    numel: int  # elements (per sample when ``batched``)
    itemsize: int | None = None  # bytes per element; None: activation dtype (bytes_per_value)
    only_if_trained: bool = False  # kept only if ``module`` has a trained parameter (Linear)
    batched: bool = True  # False: one copy per batch (BatchNorm statistics)


@dataclass(frozen=True)
class CostProfile:
    """Shapes, execution order and saved activations of one model.

    ``layers`` is aligned with ``neuron_map.layers``; ``extra_layers`` holds
    the Conv2d/Linear modules outside the neuron map (e.g. an always-trained
    head), in execution order.
    """

    neuron_map: NeuronMap
    layers: tuple[LayerProfile, ...]
    extra_layers: tuple[LayerProfile, ...]
    module_order: tuple[tuple[str, int], ...]  # (module name, order of its first call)
    saved: tuple[SavedActivation, ...]

    def neuron_fwd_flops(self) -> torch.Tensor:
        """(N,) int64 forward FLOPs of every neuron, per sample."""
        return _per_neuron(self.layers, [2 * lay.macs_per_neuron for lay in self.layers])

    @property
    def fwd_flops(self) -> int:
        """Forward FLOPs of every profiled Conv2d/Linear, per sample."""
        return sum(lay.fwd_flops for lay in self.layers + self.extra_layers)

    def order_of(self, module: str) -> int:
        """Execution order of ``module``'s first call."""
        for name, order in self.module_order:
            if name == module:
                return order
        raise KeyError(f"module {module!r} did not run in the profiling forward pass")


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


# --------------------------------------------------------------------------- profiling


@dataclass
class _Call:
    name: str
    module: nn.Module
    order: int
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None


_SAVES_OUTPUT = (nn.ReLU, nn.Sigmoid, nn.Tanh)  # backward uses the result
_SAVES_INPUT = (  # backward uses the input; in place, a copy of it
    nn.Hardtanh,  # ReLU6 included
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Mish,
)


def _saved_by(call: _Call, fresh: Iterator[int]) -> list[SavedActivation]:
    """What PyTorch's CPU autograd keeps for the backward of one module call.

    Measured against ``saved_tensors_hooks`` (torch 2.14): a conv keeps its
    input even when its weight is frozen, a linear only when its weight
    trains; BatchNorm (training) keeps its input and its per-channel mean and
    inverse std; ReLU-like activations keep their output, the others their
    input (a fresh copy when in place, except LeakyReLU, which then keeps its
    result); max-pooling its input and int64 indices; dropout a float mask.
    Functional ops (``F.relu``, ``torch.add``, average pooling) are not
    modules and not seen.
    """
    module, inp, out = call.module, call.inp, call.out  # both tensors: the caller checks

    def keep(t: torch.Tensor | None, numel: int, **kw: object) -> SavedActivation:
        key = next(fresh) if t is None else t.untyped_storage().data_ptr()
        return SavedActivation(call.name, call.order, key, numel, **kw)

    inplace = getattr(module, "inplace", False)
    if isinstance(module, nn.Conv2d):
        return [keep(inp, inp.numel())]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return [keep(inp, inp.numel()), keep(None, 2 * module.num_features, batched=False)]
    if isinstance(module, nn.Linear):
        return [keep(inp, inp.numel(), only_if_trained=True)]
    if isinstance(module, _SAVES_OUTPUT) or (isinstance(module, nn.LeakyReLU) and inplace):
        return [keep(out, out.numel())]
    if isinstance(module, _SAVES_INPUT):
        return [keep(None if inplace else inp, inp.numel())]
    if isinstance(module, nn.MaxPool2d):
        return [keep(inp, inp.numel()), keep(None, out.numel(), itemsize=8)]
    if isinstance(module, nn.Dropout) and module.p > 0:
        return [keep(None, out.numel())]
    return []


@contextmanager
def _recording(model: nn.Module) -> Iterator[list[_Call]]:
    """Record every call of a leaf module or of a module owning parameters/buffers.

    All hooks are removed and every module's train/eval flag restored on exit.
    """
    calls: list[_Call] = []
    by_module: dict[int, list[_Call]] = {}

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            call = _Call(name, module, len(calls))
            calls.append(call)
            by_module.setdefault(id(module), []).append(call)

        return hook

    def post_hook(module: nn.Module, args: tuple, output: object) -> object:
        call = by_module[id(module)][-1]
        call.inp = next((a for a in args if isinstance(a, torch.Tensor)), None)
        call.out = output if isinstance(output, torch.Tensor) else None
        if isinstance(module, nn.Dropout) and call.out is not None:
            # in training dropout returns a new tensor; in eval the input itself
            call.out = output.clone()
            return call.out
        return None

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            owns = any(True for _ in module.parameters(recurse=False)) or any(
                True for _ in module.buffers(recurse=False)
            )
            if owns or not any(True for _ in module.children()):
                handles.append(module.register_forward_pre_hook(pre_hook(name)))
                handles.append(module.register_forward_hook(post_hook))
        model.eval()
        yield calls
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)


def _layer_profile(call: _Call) -> LayerProfile:
    module = call.module
    width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    if call.inp is None or call.out is None:
        raise ValueError(f"layer {call.name!r} did not take and return a single tensor")
    in_shape = tuple(call.inp.shape[1:])
    out_shape = tuple(call.out.shape[1:])
    positions = math.prod(out_shape) // width  # H_out * W_out for a conv, 1 for a linear
    return LayerProfile(
        name=call.name,
        order=call.order,
        in_shape=in_shape,
        out_shape=out_shape,
        num_neurons=width,
        macs_per_neuron=module.weight[0].numel() * positions,
    )


def profile_model(
    model: nn.Module, neuron_map: NeuronMap, input_shape: tuple[int, ...]
) -> CostProfile:
    """Profile ``model`` with one forward pass of a batch of 1 (zeros) in eval mode.

    Parameters
    ----------
    model:
        The model ``neuron_map`` was enumerated from.
    neuron_map:
        Its neurons (:func:`~fedneq.neurons.enumerate_neurons`).
    input_shape:
        Per-sample input shape, e.g. ``(3, 32, 32)``.

    Raises
    ------
    ValueError
        If ``input_shape`` is not a tuple of positive ints, a selectable layer
        does not run (or runs more than once), or ``neuron_map`` names a
        layer the model does not have.
    """
    if (
        not isinstance(input_shape, tuple)
        or not input_shape
        or not all(isinstance(d, int) and d > 0 for d in input_shape)
    ):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}"
        )
    modules = dict(model.named_modules())
    unknown = [lay.name for lay in neuron_map.layers if lay.name not in modules]
    if unknown:
        raise ValueError(f"neuron_map names layers {unknown} that the model does not have")

    param = next(model.parameters())
    x = torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device)
    with _recording(model) as calls, torch.no_grad():
        model(x)

        compute: dict[str, list[_Call]] = {}
        for call in calls:
            if isinstance(call.module, nn.Conv2d | nn.Linear):
                compute.setdefault(call.name, []).append(call)
        repeated = [name for name, cs in compute.items() if len(cs) > 1]
        if repeated:
            raise ValueError(
                f"layers {repeated} run more than once per forward pass: "
                "per-neuron costs would be ambiguous"
            )
        missing = [lay.name for lay in neuron_map.layers if lay.name not in compute]
        if missing:
            raise ValueError(f"selectable layers {missing} did not run in the forward pass")
        layers = tuple(_layer_profile(compute[lay.name][0]) for lay in neuron_map.layers)
        selectable = {lay.name for lay in neuron_map.layers}
        extra = tuple(
            _layer_profile(cs[0]) for name, cs in compute.items() if name not in selectable
        )

        fresh = itertools.count(-1, -1)  # keys of tensors that exist only in training
        saved = tuple(
            act
            for call in calls
            if call.inp is not None and call.out is not None
            for act in _saved_by(call, fresh)
        )
        first: dict[str, int] = {}
        for call in calls:
            first.setdefault(call.name, call.order)
    return CostProfile(neuron_map, layers, extra, tuple(first.items()), saved)


# --------------------------------------------------------------------------- pricing


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_optimizer(optimizer: str) -> int:
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    return OPTIMIZER_STATES[optimizer]


def _check_mask(neuron_map: NeuronMap, mask: TrainMask) -> None:
    n = neuron_map.num_neurons
    if mask.neurons.shape != (n,):
        raise ValueError(f"mask.neurons must have shape ({n},), got {tuple(mask.neurons.shape)}")


def _row_numel(t: torch.Tensor) -> int:
    return t[0].numel() if t.dim() else 1


def _per_neuron(layers: tuple[LayerProfile, ...], values: list[int]) -> torch.Tensor:
    """(N,) int64: ``values[l]`` repeated for each neuron of layer ``l``."""
    counts = torch.tensor([lay.num_neurons for lay in layers])
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.int64), counts)


def _param_names(neuron_map: NeuronMap) -> set[str]:
    """Every parameter of the model: each is in a neuron, always- or never-trained."""
    names = set(neuron_map.always_trained) | set(neuron_map.never_trained)
    for layer in neuron_map.layers:
        names.update(layer.param_tensors)
    return names


def _owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


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


def _flops(profile: CostProfile, mask: TrainMask, state: Mapping[str, torch.Tensor]) -> _Flops:
    _check_mask(profile.neuron_map, mask)
    rows = profile.neuron_map.row_masks(mask, dict(state))
    params = _param_names(profile.neuron_map)
    trained_modules = frozenset(_owner(k) for k in rows if k in params)
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
    bwd_weight = 0
    for lay in compute:
        trained_rows = rows.get(f"{lay.name}.weight")
        if trained_rows is not None and f"{lay.name}.weight" in params:
            bwd_weight += 2 * lay.macs_per_neuron * int(trained_rows.sum())
    bwd_input = 0 if start is None else sum(lay.fwd_flops for lay in compute if lay.order > start)
    return _Flops(profile.fwd_flops, bwd_weight, bwd_input, start, trained_modules)


def _saved_bytes(profile: CostProfile, flops: _Flops, batch_size: int, bytes_per_value: int) -> int:
    if flops.start is None:
        return 0
    kept: dict[int, int] = {}
    for act in profile.saved:
        if act.order < flops.start:
            continue
        if act.only_if_trained and act.module not in flops.trained_modules:
            continue
        copies = batch_size if act.batched else 1
        kept[act.key] = copies * act.numel * (act.itemsize or bytes_per_value)
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
            values += k * sum(_row_numel(state[key]) for key in layer.tensors)
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
    _check_positive("batch_size", batch_size)
    _check_positive("bytes_per_value", bytes_per_value)
    states = _check_optimizer(optimizer)
    neuron_map = profile.neuron_map
    flops = _flops(profile, mask, state)
    full = _flops(profile, neuron_map.train_mask(~neuron_map.empty_mask()), state)

    trainable = neuron_map.mask_params(mask, dict(state), sorted(_param_names(neuron_map)))
    saved = _saved_bytes(profile, flops, batch_size, bytes_per_value)
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
    _check_positive("batch_size", batch_size)
    _check_positive("bytes_per_value", bytes_per_value)
    states = _check_optimizer(optimizer)
    per_param = bytes_per_value * (1 + states)
    inputs = [batch_size * math.prod(lay.in_shape) * bytes_per_value for lay in profile.layers]
    activation = _per_neuron(profile.layers, inputs)
    return profile.neuron_map.costs() * per_param + activation


def measure_saved_bytes(
    model: nn.Module, neuron_map: NeuronMap, mask: TrainMask, inputs: torch.Tensor
) -> int:
    """Bytes autograd actually keeps for the backward of one training forward pass.

    Sets ``requires_grad`` as :class:`~fedneq.training.masking.RowFreezer` does (only
    parameters with a trainable row), runs ``model(inputs)`` in training mode
    under ``torch.autograd.graph.saved_tensors_hooks`` and sums the distinct
    storages packed, parameters and buffers excluded. Restores
    ``requires_grad``, every module's mode and every buffer afterwards.
    """
    state = model.state_dict()
    rows = neuron_map.row_masks(mask, state)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in rows)
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(inputs)
        del out
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for module, training in modes.items():
            module.train(training)
    return sum(kept.values())
