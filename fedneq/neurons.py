"""Neurons of a PyTorch model: what can be selected, what each one costs.

A *neuron* is one output channel of a ``Conv2d`` (grouped and depthwise
included) or one output unit of a ``Linear``. Its parameters are row ``i`` of
the layer's ``weight`` and ``bias``; when a ``BatchNorm2d`` directly follows
the conv (registered right after it, with matching width), row ``i`` of the
BatchNorm's ``weight``/``bias`` and of its running statistics belong to the
same neuron. The *cost* of a neuron is its exact number of parameters
(buffers are carried with the neuron but cost nothing).

Every parameter of the model is accounted for exactly once: in one neuron,
in the ``always_trained`` set (e.g. a new classifier head) or in the
``never_trained`` set (everything else, e.g. a LayerNorm). A
:class:`TrainMask` says what one round of local training may change: a set of
neurons plus whole tensors (the always-trained set, or a static scheme's
bias-only tensors).

Neurons are numbered globally in module order: layer by layer, each layer's
neurons in channel order. Masks are ``(N,)`` boolean tensors over that order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["NeuronLayer", "NeuronMap", "TrainMask", "enumerate_neurons"]

_BN_ROW_KEYS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class NeuronLayer:
    """One selectable layer: a Conv2d or Linear and the rows its neurons own."""

    name: str  # qualified module name of the Conv2d / Linear
    kind: str  # "conv" | "linear"
    num_neurons: int
    offset: int  # global index of the first neuron
    tensors: tuple[str, ...]  # state_dict keys whose dim-0 row i belongs to neuron i
    param_tensors: tuple[str, ...]  # the subset of `tensors` that are parameters
    cost: int  # parameters per neuron
    weight_row_numel: int  # parameters of one weight row (in/groups * kh * kw)
    bn: str | None = None  # qualified name of the BatchNorm attached to it

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.num_neurons)


@dataclass(frozen=True)
class TrainMask:
    """What local training may change: selected neurons + whole tensors."""

    neurons: torch.Tensor  # (N,) bool
    full_tensors: frozenset[str] = field(default_factory=frozenset)  # state_dict keys

    def __post_init__(self) -> None:
        if self.neurons.dtype != torch.bool or self.neurons.dim() != 1:
            raise ValueError(
                f"TrainMask.neurons must be a 1-D bool tensor, got {self.neurons.dtype} "
                f"of shape {tuple(self.neurons.shape)}"
            )


@dataclass(frozen=True)
class NeuronMap:
    """The neurons of a model and the accounting of all its parameters."""

    layers: tuple[NeuronLayer, ...]
    always_trained: tuple[str, ...]  # parameter names, trained every round, outside the budget
    never_trained: tuple[str, ...]  # parameter names, frozen forever
    total_params: int

    @property
    def num_neurons(self) -> int:
        return sum(layer.num_neurons for layer in self.layers)

    @property
    def selectable_params(self) -> int:
        """Parameters that live in neurons: the denominator of a fractional budget."""
        return sum(layer.cost * layer.num_neurons for layer in self.layers)

    def costs(self) -> torch.Tensor:
        """(N,) int64 parameter count of every neuron (a copy: the server prices every reply)."""
        return self._costs.clone()

    @functools.cached_property
    def _costs(self) -> torch.Tensor:
        return torch.cat(
            [torch.full((layer.num_neurons,), layer.cost, dtype=torch.int64) for layer in self.layers]
        )

    def layer_index(self) -> torch.Tensor:
        """(N,) int64 index into ``layers`` of every neuron."""
        return torch.cat(
            [torch.full((layer.num_neurons,), i, dtype=torch.int64) for i, layer in enumerate(self.layers)]
        )

    def layer(self, name: str) -> NeuronLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no selectable layer named {name!r}; known: {[lay.name for lay in self.layers]}")

    def statistic_tensors(self) -> frozenset[str]:
        """The neuron layers' buffers (BatchNorm running statistics), keyed as in state_dict."""
        return frozenset(
            key for layer in self.layers for key in layer.tensors if key not in layer.param_tensors
        )

    def empty_mask(self) -> torch.Tensor:
        return torch.zeros(self.num_neurons, dtype=torch.bool)

    def train_mask(self, neurons: torch.Tensor, extra: Iterable[str] = ()) -> TrainMask:
        """A :class:`TrainMask` with the always-trained set added to ``extra`` tensors."""
        if neurons.shape != (self.num_neurons,):
            raise ValueError(
                f"neuron mask must have shape ({self.num_neurons},), got {tuple(neurons.shape)}"
            )
        return TrainMask(neurons.to(torch.bool), frozenset(self.always_trained) | frozenset(extra))

    def row_masks(self, mask: TrainMask, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-tensor (rows,) bool masks of what ``mask`` lets training change.

        Only tensors with at least one changeable row appear; ``state`` is the
        model's ``state_dict()`` (used for the row count of whole tensors).
        """
        rows: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            sel = mask.neurons[layer.slice]
            if bool(sel.any()):
                for key in layer.tensors:
                    rows[key] = sel.clone()
        for key in mask.full_tensors:
            if key not in state:
                raise KeyError(f"TrainMask names unknown tensor {key!r}")
            n = state[key].shape[0] if state[key].dim() > 0 else 1
            rows[key] = torch.ones(n, dtype=torch.bool)
        return rows

    def mask_params(self, mask: TrainMask, state: dict[str, torch.Tensor], param_names: Sequence[str]) -> int:
        """Number of parameters (not buffers) that ``mask`` trains."""
        params = set(param_names)
        total = 0
        for key, rows in self.row_masks(mask, state).items():
            if key in params:
                t = state[key]
                row_numel = t[0].numel() if t.dim() > 0 else 1
                total += int(rows.sum()) * row_numel
        return total


def _following_batchnorm(
    modules: list[tuple[str, nn.Module]], i: int, width: int
) -> tuple[str, nn.Module] | None:
    """The BatchNorm registered right after module ``i``, if its width matches."""
    if i + 1 >= len(modules):
        return None
    name, module = modules[i + 1]
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) and module.num_features == width:
        return name, module
    return None


def _in_prefixes(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def enumerate_neurons(
    model: nn.Module,
    always_trained: Sequence[str] = (),
    never_trained: Sequence[str] = (),
    *,
    statistics: bool = True,
) -> NeuronMap:
    """Enumerate the neurons of ``model``.

    Parameters
    ----------
    model:
        Any ``nn.Module``.
    always_trained:
        Module-name prefixes (e.g. ``"classifier"``) whose parameters are
        trained every round and are not selectable (outside the budget).
    never_trained:
        Module-name prefixes whose parameters are frozen and not selectable.
    statistics:
        Whether a neuron carries its BatchNorm's running statistics (rows of
        ``running_mean`` / ``running_var``), so that they train and travel
        with it. ``False`` for BatchNorm kept in eval mode during training
        (``bn_stats="frozen"``): the statistics are then nobody's rows, never
        change and are never sent.

    Raises
    ------
    ValueError
        If the model has no selectable Conv2d/Linear layer, or a prefix names
        no module.
    """
    modules = [(n, m) for n, m in model.named_modules() if n]
    names = {n for n, _ in modules}
    for arg, prefixes in (("always_trained", always_trained), ("never_trained", never_trained)):
        for p in prefixes:
            if p not in names:
                raise ValueError(f"{arg} prefix {p!r} names no module of the model")

    layers: list[NeuronLayer] = []
    claimed: set[str] = set()
    offset = 0
    for i, (name, module) in enumerate(modules):
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if _in_prefixes(name, always_trained) or _in_prefixes(name, never_trained):
            continue
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        weight_row = module.weight[0].numel()
        tensors = [f"{name}.weight"]
        params = [f"{name}.weight"]
        cost = weight_row
        if module.bias is not None:
            tensors.append(f"{name}.bias")
            params.append(f"{name}.bias")
            cost += 1
        bn_name = None
        bn = _following_batchnorm(modules, i, width) if isinstance(module, nn.Conv2d) else None
        if bn is not None and not _in_prefixes(bn[0], list(always_trained) + list(never_trained)):
            bn_name, bn_module = bn
            for key in _BN_ROW_KEYS:
                if key in ("weight", "bias"):
                    if getattr(bn_module, key) is None:
                        continue
                    params.append(f"{bn_name}.{key}")
                    cost += 1
                elif not statistics or getattr(bn_module, key, None) is None:
                    continue
                tensors.append(f"{bn_name}.{key}")
        layers.append(
            NeuronLayer(
                name=name,
                kind="conv" if isinstance(module, nn.Conv2d) else "linear",
                num_neurons=width,
                offset=offset,
                tensors=tuple(tensors),
                param_tensors=tuple(params),
                cost=cost,
                weight_row_numel=weight_row,
                bn=bn_name,
            )
        )
        claimed.update(params)
        offset += width

    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no selectable layer: fedneq selects neurons of "
            "nn.Conv2d and nn.Linear modules outside the always/never-trained sets"
        )

    always: list[str] = []
    never: list[str] = []
    total = 0
    for pname, p in model.named_parameters():
        total += p.numel()
        if pname in claimed:
            continue
        module_name = pname.rsplit(".", 1)[0]
        (always if _in_prefixes(module_name, always_trained) else never).append(pname)
    return NeuronMap(tuple(layers), tuple(always), tuple(never), total)
