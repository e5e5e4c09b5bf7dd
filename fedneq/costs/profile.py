"""Recording a model for the cost model: shapes, execution order, saved activations.

:func:`profile_model` runs one forward pass with hooks and returns a
:class:`CostProfile` that :mod:`fedneq.costs.pricing` prices masks with;
:func:`measure_saved_bytes` measures what autograd really keeps for a mask
(the check of the profile's saved activations).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask

__all__ = [
    "CostProfile",
    "LayerProfile",
    "SavedActivation",
    "measure_saved_bytes",
    "per_neuron",
    "profile_model",
]


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
        return per_neuron(self.layers, [2 * lay.macs_per_neuron for lay in self.layers])

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


def per_neuron(layers: tuple[LayerProfile, ...], values: list[int]) -> torch.Tensor:
    """(N,) int64: ``values[l]`` repeated for each neuron of layer ``l``."""
    counts = torch.tensor([lay.num_neurons for lay in layers])
    return torch.repeat_interleave(torch.tensor(values, dtype=torch.int64), counts)


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
