"""Budgeted backward: weight gradients only for the selected rows.

Masking with gradient hooks (:class:`~fedneq.training.masking.RowFreezer`'s
``"masked"`` mode) still computes the full weight gradient of a partially
selected layer and throws most of it away. The ops here compute the weight
(and bias) gradient of the selected output rows only, and write zeros in the
others, so a budget of 10 % of a layer's neurons costs about 10 % of its
weight-gradient FLOPs:

* :func:`budgeted_conv2d`: forward is the normal conv with the full weight;
  backward computes the input gradient only if the input needs one (a
  transposed conv) and the weight gradient on ``grad_output[:, rows]``
  (``aten.convolution_backward``, as ``torch.nn.grad.conv2d_weight``). In a
  grouped or depthwise conv each selected row becomes its own group over the
  input channels of its group, so only those channels are saved for the
  backward pass (a depthwise conv with ``k`` selected rows keeps ``k`` input
  channels). A conv whose weight is frozen keeps no input at all (PyTorch's
  conv keeps it whether or not the weight trains). Where the split would save
  fewer than :data:`SPLIT_MIN_MACS` multiply-accumulates, the op calls
  PyTorch's fused backward and zeroes the frozen rows instead.
  ``grad_filter_r`` runs the backward on patch averages
  (:mod:`fedneq.training.grad_filter`).
* :func:`budgeted_linear`: the same for ``nn.Linear``.
* :class:`SparseBackward`: installs them on a model's selectable layers for one
  :class:`~fedneq.neurons.TrainMask`, by shadowing each module's ``forward``
  with an instance attribute (the module's own ``forward`` runs whenever no
  gradient is needed), and removes them all with :meth:`remove`.

Nothing below the earliest trained layer is differentiated either way: the
ops only run where an input requires a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from fedneq.costs import CostProfile, LayerProfile
from fedneq.neurons import NeuronMap, TrainMask
from fedneq.training.filter_probe import FilterChoice, choose_layers
from fedneq.training.grad_filter import (
    FilterGeometry,
    GradFilterConfig,
    filter_geometry,
    filtered_input_grad,
    filtered_weight_grad,
    patch_mean,
)
from fedneq.training.shape_memo import mask_key, memo, row_masks

__all__ = [
    "BACKWARDS",
    "FROZEN_MIN_BYTES",
    "SPLIT_MIN_MACS",
    "SparseBackward",
    "budgeted_conv2d",
    "budgeted_linear",
]

BACKWARDS = ("sparse", "masked")

Rows = torch.Tensor | None  # (k,) int64 selected rows, sorted; None: every row


# --------------------------------------------------------------------------- conv


@dataclass(frozen=True)
class _ConvArgs:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


@dataclass(frozen=True)
class _ConvRows:
    """How the weight gradient of the selected rows reads the input."""

    rows: Rows  # selected weight rows
    frozen: torch.Tensor | None  # the other rows; None with ``rows``
    keep: torch.Tensor | None  # input channels the gradient reads (saved); None: all
    gather: torch.Tensor | None  # kept channels per selected row, concatenated; None: as kept
    groups: int  # groups of the weight-gradient conv

    @property
    def empty(self) -> bool:
        return self.rows is not None and self.rows.numel() == 0


def _conv_rows(rows: Rows, weight_shape: Sequence[int], groups: int) -> _ConvRows:
    out_channels, c_g = weight_shape[0], weight_shape[1]
    if rows is None or rows.numel() == out_channels:
        return _ConvRows(None, None, None, None, groups)
    frozen = torch.ones(out_channels, dtype=torch.bool).index_fill_(0, rows, False)
    frozen = frozen.nonzero().flatten()
    if groups == 1:
        return _ConvRows(rows, frozen, None, None, 1)
    # every selected row is its own group over the input channels of its group
    group = rows // (out_channels // groups)  # (k,)
    used = torch.unique(group)  # sorted
    offsets = torch.arange(c_g)
    keep = (used[:, None] * c_g + offsets).flatten()
    gather = (torch.searchsorted(used, group)[:, None] * c_g + offsets).flatten()
    if gather.numel() == keep.numel():  # one selected row per used group, in order
        gather = None
    if keep.numel() == groups * c_g:
        keep = None
    return _ConvRows(rows, frozen, keep, gather, rows.numel())


def _bias_grad(g_sum: torch.Tensor, rows: Rows) -> torch.Tensor:
    if rows is None:
        return g_sum
    return torch.zeros_like(g_sum).index_copy_(0, rows, g_sum.index_select(0, rows))


# Computing the selected rows' weight gradient apart from the input gradient costs a
# custom autograd op and one more conv call (~0.1-0.3 ms on one CPU thread). Below this
# many saved multiply-accumulates per batch a layer runs PyTorch's fused backward and
# zeroes the frozen rows (with a profile: keeps its own forward and the masking hooks).
SPLIT_MIN_MACS = 2**23
# With a profile, a frozen conv whose input (per batch) is smaller than this keeps its
# own forward, and with it the input PyTorch keeps.
FROZEN_MIN_BYTES = 2**20


def _conv_backward(g, x, weight, args: _ConvArgs, mask: tuple[bool, bool], groups: int):
    """``aten.convolution_backward``'s (input, weight) gradients.

    ``x`` and ``weight`` must be real tensors of the right shape (an expanded
    placeholder, as ``torch.nn.grad`` passes, makes PyTorch pick a slower CPU
    kernel); only the shape of ``weight`` matters for a weight gradient alone.
    """
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, args.stride, args.padding, args.dilation, False, (0, 0),
        groups, (*mask, False),
    )[:2]  # fmt: skip


def _input_grad(g, weight, args: _ConvArgs, x_shape: Sequence[int]) -> torch.Tensor:
    """conv2d's input gradient as a transposed conv: needs no input tensor."""
    output_padding = tuple(
        x_shape[2 + i]
        - ((g.shape[2 + i] - 1) * args.stride[i] - 2 * args.padding[i]
           + args.dilation[i] * (weight.shape[2 + i] - 1) + 1)
        for i in range(2)
    )  # fmt: skip
    return F.conv_transpose2d(
        g, weight, None, args.stride, args.padding, output_padding, args.groups, args.dilation
    )


class _BudgetedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        args: _ConvArgs,
        rows: _ConvRows,
        bias_rows: Rows,
        grad_filter_r: int | None,
        name: str,
    ) -> torch.Tensor:
        y = F.conv2d(x, weight, bias, args.stride, args.padding, args.dilation, args.groups)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        geom = None
        if grad_filter_r is not None:
            geom = filter_geometry(
                kernel=weight.shape[-2:],
                stride=args.stride,
                padding=args.padding,
                dilation=args.dilation,
                r=grad_filter_r,
                in_hw=x.shape[-2:],
                out_hw=y.shape[-2:],
                name=name,
            )
        fused = geom is None and need_x and need_w
        if fused and rows.rows is not None:
            b, o, h, w = y.shape
            fused = (o - rows.rows.numel()) * weight[0].numel() * b * h * w < SPLIT_MIN_MACS
        saved = None
        if fused:
            saved = x
        elif need_w and not rows.empty:
            saved = x if rows.keep is None else x.index_select(1, rows.keep)
            if geom is not None:
                saved = patch_mean(saved, geom.patch)  # (B, C_kept, H / R, W / R)
        ctx.save_for_backward(saved, weight if need_x else None)
        ctx.meta = (args, rows, bias_rows, geom, fused, x.shape, weight.shape)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        saved, weight = ctx.saved_tensors
        args, rows, bias_rows, geom, fused, x_shape, w_shape = ctx.meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gb = _bias_grad(g.sum((0, 2, 3)), bias_rows) if need_b else None
        if fused:  # PyTorch's fused backward, frozen rows zeroed
            gx, gw = _conv_backward(g, saved, weight, args, (True, True), args.groups)
            if rows.frozen is not None:
                gw.index_fill_(0, rows.frozen, 0)
            return gx, gw, gb, None, None, None, None, None
        g_used = g if geom is None else patch_mean(g, geom.r)  # (B, O, H_out / r, W_out / r)
        gx = gw = None
        if need_x:
            if geom is None:
                gx = _input_grad(g, weight, args, x_shape)
            else:
                gx = filtered_input_grad(g_used, weight, args.groups, geom)
        if need_w:
            gw = _conv_weight_grad(saved, g_used, weight, w_shape, args, rows, geom, g.dtype)
        return gx, gw, gb, None, None, None, None, None


def _conv_weight_grad(
    saved: torch.Tensor | None,
    g: torch.Tensor,
    weight: torch.Tensor | None,
    w_shape: torch.Size,
    args: _ConvArgs,
    rows: _ConvRows,
    geom: FilterGeometry | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    if saved is None:  # no selected row
        return torch.zeros(w_shape, dtype=dtype, device=g.device)
    if rows.rows is not None:
        g = g.index_select(1, rows.rows)  # (B, k, H', W')
    x = saved if rows.gather is None else saved.index_select(1, rows.gather)
    shape = (g.shape[1], *w_shape[1:])
    if geom is None:
        like = weight[: shape[0]] if weight is not None else x.new_empty(shape)
        part = _conv_backward(g, x, like, args, (False, True), rows.groups)[1]
    else:
        part = filtered_weight_grad(x, g, shape, rows.groups, geom)
    if rows.rows is None:
        return part
    return torch.zeros(w_shape, dtype=part.dtype, device=part.device).index_copy_(
        0, rows.rows, part
    )


def _conv_args(stride, padding, dilation, groups: int, kernel: Sequence[int]) -> _ConvArgs:
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same" and all(
            d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel, strict=True)
        ):
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
        else:
            raise ValueError(
                f"padding={padding!r} with kernel {tuple(kernel)} and dilation {dilation} pads "
                "asymmetrically; allowed: ints, 'valid', or 'same' with symmetric padding"
            )
    return _ConvArgs(stride, _pair(padding), dilation, groups)


def _rows_arg(rows: torch.Tensor | Sequence[int] | None, n: int, what: str) -> Rows:
    if rows is None:
        return None
    rows = torch.as_tensor(rows, dtype=torch.int64).flatten()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"{what} must be indices in [0, {n}), got {rows.tolist()}")
    rows = torch.unique(rows)  # sorted, distinct
    return None if rows.numel() == n else rows


def budgeted_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    weight_rows: torch.Tensor | Sequence[int] | None = None,
    bias_rows: torch.Tensor | Sequence[int] | None = None,
    grad_filter_r: int | None = None,
    name: str = "conv",
) -> torch.Tensor:
    """``F.conv2d`` whose backward computes weight/bias gradients of selected rows only.

    Parameters
    ----------
    weight_rows, bias_rows:
        Output rows whose gradient is computed (``None``: all); the others
        get exactly 0.
    grad_filter_r:
        Gradient-filtering patch size (:mod:`fedneq.training.grad_filter`); ``None``
        for the exact backward.
    name:
        Layer name used in error messages.
    """
    args = _conv_args(stride, padding, dilation, groups, weight.shape[-2:])
    rows = _conv_rows(_rows_arg(weight_rows, weight.shape[0], "weight_rows"), weight.shape, groups)
    b_rows = _rows_arg(bias_rows, weight.shape[0], "bias_rows")
    return _apply_conv(x, weight, bias, args, rows, b_rows, grad_filter_r, name)


def _apply_conv(x, weight, bias, args, rows, bias_rows, grad_filter_r, name) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return F.conv2d(x, weight, bias, args.stride, args.padding, args.dilation, args.groups)
    return _BudgetedConv2d.apply(x, weight, bias, args, rows, bias_rows, grad_filter_r, name)


# --------------------------------------------------------------------------- linear


class _BudgetedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows: Rows, bias_rows: Rows) -> torch.Tensor:
        need_x, need_w = ctx.needs_input_grad[:2]
        empty = rows is not None and rows.numel() == 0
        ctx.save_for_backward(x if need_w and not empty else None, weight if need_x else None)
        ctx.meta = (rows, bias_rows, weight.shape)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows, bias_rows, w_shape = ctx.meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = g.reshape(-1, w_shape[0])  # (N, O)
        gx = gw = gb = None
        if need_x:
            gx = g @ weight  # (..., I)
        if need_w:
            if x is None:
                gw = torch.zeros(w_shape, dtype=g.dtype, device=g.device)
            else:
                x2 = x.reshape(-1, w_shape[1])  # (N, I)
                if rows is None:
                    gw = g2.T @ x2
                else:
                    part = g2.index_select(1, rows).T @ x2  # (k, I)
                    gw = torch.zeros(w_shape, dtype=part.dtype, device=part.device)
                    gw.index_copy_(0, rows, part)
        if need_b:
            gb = _bias_grad(g2.sum(0), bias_rows)
        return gx, gw, gb, None, None


def budgeted_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    weight_rows: torch.Tensor | Sequence[int] | None = None,
    bias_rows: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """``F.linear`` whose backward computes weight/bias gradients of selected rows only."""
    rows = _rows_arg(weight_rows, weight.shape[0], "weight_rows")
    b_rows = _rows_arg(bias_rows, weight.shape[0], "bias_rows")
    if not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return _BudgetedLinear.apply(x, weight, bias, rows, b_rows)


# --------------------------------------------------------------------------- installer


class _Forward:
    """Replacement ``forward`` of one module, stored as an instance attribute."""

    def __init__(
        self,
        module: nn.Conv2d | nn.Linear,
        name: str,
        rows: Rows,
        bias_rows: Rows,
        grad_filter_r: int | None,
    ) -> None:
        self.module = module
        self.name = name
        self.bias_rows = bias_rows
        self.grad_filter_r = grad_filter_r
        if isinstance(module, nn.Conv2d):
            self.args = _conv_args(
                module.stride, module.padding, module.dilation, module.groups, module.kernel_size
            )
            self.rows: Rows | _ConvRows = _conv_rows(rows, module.weight.shape, module.groups)
        else:
            self.rows = rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        needs_grad = (
            x.requires_grad
            or m.weight.requires_grad
            or (m.bias is not None and m.bias.requires_grad)
        )
        if not (torch.is_grad_enabled() and needs_grad):
            return type(m).forward(m, x)
        if isinstance(m, nn.Conv2d):
            return _BudgetedConv2d.apply(
                x,
                m.weight,
                m.bias,
                self.args,
                self.rows,
                self.bias_rows,
                self.grad_filter_r,
                self.name,
            )
        return _BudgetedLinear.apply(x, m.weight, m.bias, self.rows, self.bias_rows)


def _supported(module: nn.Module) -> bool:
    """A plain Conv2d (zero padding, symmetric) or Linear whose forward is not overridden."""
    if type(module).forward is nn.Linear.forward:
        return True
    if type(module).forward is not nn.Conv2d.forward or module.padding_mode != "zeros":
        return False
    try:
        _conv_args(
            module.stride, module.padding, module.dilation, module.groups, module.kernel_size
        )
    except ValueError:
        return False
    return True


def _pays_off(module: nn.Module, layer: LayerProfile | None, rows: Rows, batch_size: int) -> bool:
    """Whether the budgeted op saves more than its overhead (an unknown shape: yes)."""
    if layer is None:
        return True
    if rows is not None and rows.numel() == 0:  # a frozen conv: it no longer keeps its input
        return batch_size * math.prod(layer.in_shape) * module.weight.element_size() >= (
            FROZEN_MIN_BYTES
        )
    frozen = 0 if rows is None else layer.num_neurons - rows.numel()
    return frozen * layer.macs_per_neuron * batch_size >= SPLIT_MIN_MACS


def _plan_layers(
    model: nn.Module,
    rows: dict[str, torch.Tensor],
    filtered: frozenset[str],
    selectable: frozenset[str],
    shapes: dict[str, LayerProfile],
    batch_size: int,
    r: int | None,
) -> tuple[tuple[tuple[str, Rows, Rows, int | None], ...], tuple[str, ...]]:
    """Which modules :class:`SparseBackward` gives its op, and with which rows.

    Returns ``(name, weight rows, bias rows, filter r or None)`` for each, and
    the names of every supported module it considered (none may have a
    replaced forward already).
    """
    plans: list[tuple[str, Rows, Rows, int | None]] = []
    checked: list[str] = []
    for name, module in model.named_modules():
        if name not in filtered and name not in selectable:
            continue
        if not _supported(module):
            if name in filtered:
                raise ValueError(
                    f"gradient filtering needs a plain nn.Conv2d with zero, symmetric "
                    f"padding; layer {name!r} is {module!r}"
                )
            continue
        checked.append(name)
        w_rows = _row_indices(rows, f"{name}.weight")
        b_rows = None if module.bias is None else _row_indices(rows, f"{name}.bias")
        trained_whole = w_rows is None and b_rows is None
        frozen_linear = isinstance(module, nn.Linear) and w_rows is not None and not w_rows.numel()
        if name not in filtered and (
            trained_whole
            or frozen_linear
            or not _pays_off(module, shapes.get(name), w_rows, batch_size)
        ):
            continue  # the module's own forward is as cheap
        plans.append((name, w_rows, b_rows, r if name in filtered else None))
    return tuple(plans), tuple(checked)


def _row_indices(rows: dict[str, torch.Tensor], key: str) -> Rows:
    mask = rows.get(key)
    if mask is None:
        return torch.zeros(0, dtype=torch.int64)
    return None if bool(mask.all()) else mask.nonzero().flatten()


class SparseBackward:
    """Install budgeted (and gradient-filtered) ops on a model for one mask.

    Parameters
    ----------
    model, neuron_map, mask:
        The model, its neurons and what training may change; a tensor's
        selected rows are ``neuron_map.row_masks(mask, ...)``.
    grad_filter:
        Convs to run with gradient filtering (:class:`GradFilterConfig`); with
        ``fallback="probe"`` only those its probe finds faster (``"shape"``: those
        whose shape it can handle)
        (:attr:`choices` says why for each, :attr:`filtered` names them).
    budgeted:
        Install the budgeted op on the supported selectable layers that need
        it: a Conv2d/Linear with some but not all rows selected, and a Conv2d
        with a frozen weight (it then keeps no input). ``False``: only the
        filtered convs.
    profile, batch_size:
        If a :func:`~fedneq.costs.profile_model` of the model is given, a
        layer gets the budgeted op only where it pays for its own overhead (a
        custom autograd op costs ~0.1 ms per call on one CPU thread): a
        partially selected layer if its frozen rows' weight gradient is at
        least :data:`SPLIT_MIN_MACS` multiply-accumulates per batch of
        ``batch_size``, a frozen conv if its input is at least
        :data:`FROZEN_MIN_BYTES`. Without a profile every such layer gets it.

    Layers trained whole (and unsupported ones: reflect padding, overridden
    forwards) keep their own forward. :attr:`handled` names the parameters
    whose gradient the ops already zero outside the selected rows.

    Raises
    ------
    ValueError
        If a filtered layer is not a supported Conv2d.
    RuntimeError
        If a module's ``forward`` is already replaced (e.g. by another
        :class:`SparseBackward` not yet removed).
    """

    def __init__(
        self,
        model: nn.Module,
        neuron_map: NeuronMap,
        mask: TrainMask,
        *,
        grad_filter: GradFilterConfig | None = None,
        budgeted: bool = True,
        profile: CostProfile | None = None,
        batch_size: int = 32,
    ) -> None:
        shapes = {} if profile is None else {lay.name: lay for lay in profile.layers}
        self.choices: tuple[FilterChoice, ...] = ()
        selectable = frozenset(lay.name for lay in neuron_map.layers) if budgeted else frozenset()
        if grad_filter is None:  # what to install depends on the mask and shapes only
            key = mask_key(mask)
            layers, checked = memo(
                model,
                ("sparse", id(neuron_map), key, id(profile), batch_size, budgeted,
                 SPLIT_MIN_MACS, FROZEN_MIN_BYTES),  # the thresholds as they are now
                lambda: (neuron_map, profile, *_plan_layers(
                    model, row_masks(model, neuron_map, mask, key=key), frozenset(), selectable,
                    shapes, batch_size, None,
                )),
            )[2:]  # fmt: skip
        else:
            rows = row_masks(model, neuron_map, mask)
            trained = {
                lay.name for lay in neuron_map.layers
                if (m := rows.get(f"{lay.name}.weight")) is not None and bool(m.any())
            }  # fmt: skip
            names = grad_filter.resolve(model, neuron_map, trained)
            if grad_filter.fallback != "off":
                self.choices = choose_layers(
                    model, names, shapes, r=grad_filter.r, batch_size=batch_size,
                    filtered_op=budgeted_conv2d, supported=_supported,
                    probe=grad_filter.fallback == "probe",
                )  # fmt: skip
                names = tuple(c.name for c in self.choices if c.filtered)
            layers, checked = _plan_layers(
                model, rows, frozenset(names), selectable, shapes, batch_size, grad_filter.r
            )
        for name in checked:
            if "forward" in model.get_submodule(name).__dict__:
                raise RuntimeError(
                    f"module {name!r} already has a replaced forward (another SparseBackward?); "
                    "call remove() on it first"
                )
        plans = [(name, model.get_submodule(name), w, b, r) for name, w, b, r in layers]

        self.model = model
        self._installed: list[nn.Module] = []
        handled: set[str] = set()
        for name, module, w_rows, b_rows, r in plans:
            module.forward = _Forward(module, name, w_rows, b_rows, r)
            self._installed.append(module)
            handled.add(f"{name}.weight")
            if module.bias is not None:
                handled.add(f"{name}.bias")
        self.layers: tuple[str, ...] = tuple(p[0] for p in plans)
        self.filtered: tuple[str, ...] = tuple(p[0] for p in plans if p[4] is not None)
        self.handled: frozenset[str] = frozenset(handled)

    def remove(self) -> None:
        """Give every module its own forward back; idempotent."""
        for module in self._installed:
            if isinstance(module.__dict__.get("forward"), _Forward):
                del module.forward
        self._installed.clear()

    def __enter__(self) -> SparseBackward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
