"""Width-scaled sub-models: extract a real smaller network, train it, write it back.

The width baselines of heterogeneous federated learning train, on a device
of width ``p``, a sub-network holding ``k = max(1, ceil(p * C))`` of the
``C`` channels of every layer:

* **HeteroFL** (Diao et al., "HeteroFL: Computation and Communication
  Efficient Federated Learning for Heterogeneous Clients", ICLR 2021,
  https://arxiv.org/abs/2010.01264) and **FjORD** (Horváth et al., "FjORD:
  Fair and Accurate Federated Learning under heterogeneous targets with
  Ordered Dropout", NeurIPS 2021, https://arxiv.org/abs/2102.13451): the
  first ``k`` channels (nested sub-models);
* **FedRolex** (Alam et al., "FedRolex: Model-Heterogeneous Federated
  Learning with Rolling Sub-Model Extraction", NeurIPS 2022,
  https://arxiv.org/abs/2212.01548): a window of ``k`` consecutive channels
  starting at ``shift mod C`` and wrapping around, ``shift`` advancing by
  one every round, so every channel gets trained.

A layer's kept channels depend only on its width ``C`` (and ``p``,
``shift``), so a residual sum of two branches of width ``C`` keeps the same
channels on both sides. Rules (:func:`plan_channels`): a Conv2d / Linear keeps
rows (output channels) ``kept(C_out)`` and columns (input channels)
``kept(C_in)``; the first Conv2d / Linear in module order keeps every input
channel (the image) and the classifier head (the last Linear) every output
(the classes); a depthwise conv (``groups == C_in == C_out``) keeps ``k``
channels and ``k`` groups; a BatchNorm keeps ``kept(num_features)``. Any
other module with parameters, or another grouped conv, is refused.

:func:`extract_submodel` builds the smaller network (a smaller forward and
backward: compute and memory really shrink), :func:`submodel_blocks` turns
its trained state into ``(rows, columns, values)`` blocks in the full
model's index space, sorted (the wire's element blocks), and
:func:`write_back` writes them into a full state. :class:`ChannelMask` zeroes
the dropped channels of a full model instead (the reference the sub-model is
tested against, and FjORD's per-batch narrower widths inside its sub-model).

Budget → width (:func:`width_for_budget`): the selectable parameters of a
width-``p`` sub-model are about ``p²`` of the full model's (rows and columns
both shrink); a device takes the largest ``p`` on a grid of 1/1000 whose
sub-model's selectable parameters (:func:`submodel_params`, the neuron
layers' parameters, as a budget counts them) fit its budget, at least the
narrowest sub-model (one channel per layer).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import skip_init

from fedneq.neurons import NeuronMap

__all__ = [
    "Block",
    "ChannelMask",
    "ChannelPlan",
    "dropped_keep",
    "LayerSlice",
    "extract_submodel",
    "kept_channels",
    "largest_width",
    "nested_keep",
    "plan_channels",
    "submodel_blocks",
    "submodel_params",
    "width_for_budget",
    "write_back",
]

_BN = nn.modules.batchnorm._BatchNorm
WIDTH_GRID = 1000  # width_for_budget tries p = j / WIDTH_GRID


def kept_channels(num: int, width: float, shift: int = 0) -> torch.Tensor:
    """(k,) int64 channels of a layer of ``num``: ``k = max(1, ceil(width * num))``.

    The window starts at ``shift mod num`` and wraps around (``shift = 0``:
    the first ``k`` channels, in order).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num should be an int >= 1, got {num!r}")
    if not 0 < width <= 1:
        raise ValueError(f"width should be in (0, 1], got {width!r}")
    k = min(num, max(1, math.ceil(width * num - 1e-9)))
    return (torch.arange(k, dtype=torch.int64) + shift) % num


@dataclass(frozen=True)
class LayerSlice:
    """What one module keeps: rows (output channels) and columns (input channels)."""

    rows: torch.Tensor  # (k_out,) int64, in sub-model order
    cols: torch.Tensor | None  # (k_in,) int64 for a Conv2d / Linear weight; None for a BatchNorm
    groups: int = 1  # of the sub-module (a depthwise conv: k_out)


@dataclass(frozen=True)
class Block:
    """One tensor's sent elements: ``values[i, j, ...] = tensor[rows[i], cols[j], ...]``."""

    rows: torch.Tensor  # (r,) int64, strictly ascending
    cols: torch.Tensor | None  # (c,) int64, strictly ascending; None for a tensor of rank < 2
    values: torch.Tensor  # (r, c, ...) or (r,)
    elements: torch.Tensor | None = None  # bool like values: the elements sent (None: all)


@dataclass(frozen=True)
class ChannelPlan:
    """The channels a width-``width`` sub-model keeps in every Conv2d / Linear / BatchNorm."""

    width: float
    shift: int
    slices: dict[str, LayerSlice]  # module qualified name -> its slice

    def indices(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(rows, cols)`` of state entry ``key`` (``cols`` None: a tensor of rank < 2)."""
        module, _, attr = key.rpartition(".")
        if module not in self.slices:
            raise KeyError(f"{key!r} belongs to no module of the channel plan")
        s = self.slices[module]
        return s.rows, (s.cols if attr == "weight" and s.cols is not None else None)


def _compute_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def plan_channels(
    model: nn.Module, width: float, shift: int = 0, *, head: str | None = None
) -> ChannelPlan:
    """The channels a width-``width`` sub-model of ``model`` keeps (module notes).

    ``head`` names the classifier whose outputs are all kept: a module name or
    a prefix of it (``"classifier"`` for torchvision's ``classifier.1``;
    default: the last ``nn.Linear``). Raises ``ValueError`` for a module it
    cannot slice.
    """
    compute = _compute_modules(model)
    if not compute:
        raise ValueError(f"{type(model).__name__} has no Conv2d / Linear to slice")
    linears = [n for n, m in compute if isinstance(m, nn.Linear)]
    if head is None:  # the last Linear; a model without one has no head to keep whole
        heads = set(linears[-1:])
    else:
        heads = {n for n, _ in compute if n == head or n.startswith(head + ".")}
        if not heads:
            raise ValueError(f"head {head!r} names no Conv2d / Linear of the model")
    stem = compute[0][0]
    slices: dict[str, LayerSlice] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            c_out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            c_in = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            rows = torch.arange(c_out) if name in heads else kept_channels(c_out, width, shift)
            groups = module.groups if isinstance(module, nn.Conv2d) else 1
            if groups == 1:
                cols = torch.arange(c_in) if name == stem else kept_channels(c_in, width, shift)
                slices[name] = LayerSlice(rows, cols, 1)
            elif groups == c_in == c_out and name != stem and name not in heads:
                slices[name] = LayerSlice(rows, torch.zeros(1, dtype=torch.int64), len(rows))
            else:
                raise ValueError(
                    f"cannot slice conv {name!r} by width: groups={groups} with {c_in} inputs and "
                    f"{c_out} outputs (only groups=1 or depthwise convs)"
                )
        elif isinstance(module, _BN):
            slices[name] = LayerSlice(kept_channels(module.num_features, width, shift), None)
        elif any(True for _ in module.parameters(recurse=False)):
            raise ValueError(
                f"cannot slice module {name!r} ({type(module).__name__}) by width: only Conv2d, "
                "Linear and BatchNorm own parameters in a width sub-model"
            )
    return ChannelPlan(float(width), int(shift), slices)


def _sliced(module: nn.Module, s: LayerSlice) -> nn.Module:
    """A new module holding ``s``'s rows and columns of ``module`` (same settings)."""
    with torch.no_grad():
        if isinstance(module, nn.Conv2d | nn.Linear):
            assert s.cols is not None
            weight = module.weight[s.rows][:, s.cols]  # (k_out, k_in / groups, ...)
            if isinstance(module, nn.Conv2d):
                in_channels = len(s.rows) if s.groups > 1 else len(s.cols)
                new: nn.Module = skip_init(
                    nn.Conv2d, in_channels, len(s.rows), module.kernel_size, stride=module.stride,
                    padding=module.padding, dilation=module.dilation, groups=s.groups,
                    bias=module.bias is not None, padding_mode=module.padding_mode,
                )  # fmt: skip
            else:
                new = skip_init(nn.Linear, len(s.cols), len(s.rows), bias=module.bias is not None)
            new.weight.copy_(weight)
            if module.bias is not None:
                new.bias.copy_(module.bias[s.rows])
        else:
            new = type(module)(
                len(s.rows), eps=module.eps, momentum=module.momentum, affine=module.affine,
                track_running_stats=module.track_running_stats,
            )  # fmt: skip
            for key, value in module.state_dict().items():
                target = new.state_dict()[key]
                target.copy_(value if value.dim() == 0 else value[s.rows])
    new.to(next(module.parameters(), torch.empty(0)).dtype)
    new.train(module.training)
    for param, old in zip(new.parameters(), module.parameters(), strict=True):
        param.requires_grad_(old.requires_grad)
    return new


def extract_submodel(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """A copy of ``model`` whose modules hold only ``plan``'s channels (a smaller network).

    Module names, the train / eval flags and the ``requires_grad`` flags are
    kept; sub-model channel ``j`` of a module is full channel ``rows[j]``.
    """
    sub = copy.deepcopy(model)
    for name, s in plan.slices.items():
        parent_name, _, attr = name.rpartition(".")
        parent = sub.get_submodule(parent_name) if parent_name else sub
        setattr(parent, attr, _sliced(getattr(parent, attr), s))
    return sub


def _sorted_block(value: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor | None) -> Block:
    r_order = torch.argsort(rows)
    value = value[r_order]
    if cols is None:
        return Block(rows[r_order], None, value)
    c_order = torch.argsort(cols)
    return Block(rows[r_order], cols[c_order], value[:, c_order])


def submodel_blocks(
    sub_state: Mapping[str, torch.Tensor], plan: ChannelPlan, keys: Iterable[str]
) -> dict[str, Block]:
    """``{key: Block}``: each of ``keys`` of the sub-model as elements of the full model.

    Rows and columns sorted ascending (FedRolex's window wraps), values
    permuted to match, detached copies.
    """
    out = {}
    for key in keys:
        rows, cols = plan.indices(key)
        out[key] = _sorted_block(sub_state[key].detach().clone(), rows, cols)
    return out


def write_back(
    full_state: Mapping[str, torch.Tensor], blocks: Mapping[str, Block]
) -> dict[str, torch.Tensor]:
    """A copy of ``full_state`` with every block written in (other elements unchanged)."""
    out = {k: v.detach().clone() for k, v in full_state.items()}
    for key, block in blocks.items():
        target = out[key]
        if block.cols is None:
            target[block.rows] = block.values.to(target.dtype)
        else:
            target[block.rows[:, None], block.cols[None, :]] = block.values.to(target.dtype)
    return out


def submodel_params(model: nn.Module, plan: ChannelPlan, names: Iterable[str] | None = None) -> int:
    """Parameters of the width sub-model (those of ``names`` only, if given), counted from
    the plan (nothing is built)."""
    wanted = None if names is None else set(names)
    total = 0
    for name, p in model.named_parameters():
        if wanted is not None and name not in wanted:
            continue
        rows, cols = plan.indices(name)
        per_row = p[0].numel() if p.dim() else 1
        if cols is not None:
            per_row = per_row // p.shape[1] * len(cols)
        total += len(rows) * per_row
    return total


def largest_width(fits: Callable[[float], bool]) -> float:
    """The largest width ``j / 1000`` for which ``fits(width)`` holds (1/1000 when none does).

    ``fits`` must be monotone: true up to some width and false above it, as
    a sub-model's parameters and memory grow with its width.
    """
    if fits(1.0):
        return 1.0
    lo, hi = 1, WIDTH_GRID  # the answer is in [lo, hi): fits(hi / grid) is false
    if not fits(lo / WIDTH_GRID):
        return lo / WIDTH_GRID
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid / WIDTH_GRID):
            lo = mid
        else:
            hi = mid
    return lo / WIDTH_GRID


def width_for_budget(model: nn.Module, neuron_map: NeuronMap, budget_params: int) -> float:
    """The largest width ``j / 1000`` whose sub-model's selectable parameters fit ``budget_params``.

    Selectable parameters are those of the neuron layers (what a budget
    counts; an always-trained head is outside it). The narrowest sub-model
    (1/1000) when nothing fits.
    """
    if isinstance(budget_params, bool) or not isinstance(budget_params, int) or budget_params < 1:
        raise ValueError(f"budget_params should be an int >= 1, got {budget_params!r}")
    names = [k for layer in neuron_map.layers for k in layer.param_tensors]
    return largest_width(
        lambda width: submodel_params(model, plan_channels(model, width), names) <= budget_params
    )


def nested_keep(outer: ChannelPlan, inner: ChannelPlan) -> dict[str, torch.Tensor]:
    """``{module: (k_outer,) bool}``: which channels of ``outer``'s sub-model ``inner`` keeps.

    For FjORD: a narrower width inside a device's sub-model (``inner`` must
    keep a subset of ``outer``'s channels in every module).
    """
    keep = {}
    for name, s in outer.slices.items():
        mask = torch.isin(s.rows, inner.slices[name].rows)
        if int(mask.sum()) != len(inner.slices[name].rows):
            raise ValueError(f"the inner plan keeps channels of {name!r} the outer one drops")
        keep[name] = mask
    return keep


class ChannelMask:
    """Forward hooks zeroing the channels a mask drops, at the output of every module named.

    ``keep``: ``{module name: (C,) bool}``, the module's output channels
    (dim 1) to keep; others come out as zeros. :meth:`set` swaps the masks
    (FjORD's per-batch width); use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, keep: Mapping[str, torch.Tensor]) -> None:
        modules = dict(model.named_modules())
        unknown = sorted(set(keep) - set(modules))
        if unknown:
            raise ValueError(f"ChannelMask names modules {unknown} that the model does not have")
        self._keep: dict[str, torch.Tensor] = {}
        self.set(keep)
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in keep]

    def set(self, keep: Mapping[str, torch.Tensor]) -> None:
        self._keep = {name: mask.to(torch.bool) for name, mask in keep.items()}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            mask = self._keep.get(name)
            if mask is None or bool(mask.all()):
                return None
            shape = [1, -1] + [1] * (output.dim() - 2)
            return output * mask.view(shape).to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ChannelMask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def dropped_keep(model: nn.Module, plan: ChannelPlan) -> dict[str, torch.Tensor]:
    """``{module: (C,) bool}`` of the full model: the channels ``plan`` keeps, for :class:`ChannelMask`."""
    modules = dict(model.named_modules())
    keep = {}
    for name, s in plan.slices.items():
        module = modules[name]
        width = (
            module.out_channels if isinstance(module, nn.Conv2d)
            else module.out_features if isinstance(module, nn.Linear) else module.num_features
        )  # fmt: skip
        mask = torch.zeros(width, dtype=torch.bool)
        mask[s.rows] = True
        keep[name] = mask
    return keep
