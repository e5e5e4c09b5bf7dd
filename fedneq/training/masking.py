"""Apply a :class:`~fedneq.neurons.TrainMask` to a model for training.

Zeroing the gradient of frozen rows is not enough: momentum, weight decay
(SGD's coupled or AdamW's decoupled) and BatchNorm running statistics all move
a row whose gradient is zero. :class:`RowFreezer` therefore

* turns ``requires_grad`` off for parameters with no trainable row, so autograd
  computes no weight gradient for them and no backward at all below the
  earliest trainable layer;
* zeroes the gradient of frozen rows of partially trained parameters;
* snapshots every frozen row (parameters and float buffers) and copies it back
  with :meth:`RowFreezer.restore` after each optimizer step, which makes frozen
  neurons bit-identical whatever the optimizer.

With ``backward="sparse"`` it also installs :class:`~fedneq.training.sparse_backward.SparseBackward`:
partially selected Conv2d/Linear layers then compute the weight gradient of
their selected rows only (no gradient hook needed for them), and frozen convs
keep no input for the backward pass. ``grad_filter`` runs the backward of
some convs on patch averages (:mod:`fedneq.training.grad_filter`).

``RowFreezer`` is to a mask what ``torch.nn.utils.prune`` is to a pruning
mask: ``apply`` on construction, exact inverse with :meth:`remove`.
"""

from __future__ import annotations

import torch
from torch import nn

from fedneq.costs import CostProfile
from fedneq.neurons import NeuronMap, TrainMask
from fedneq.training.grad_filter import GradFilterConfig
from fedneq.training.shape_memo import mask_key, memo, named_tensors, parameters, row_masks
from fedneq.training.sparse_backward import BACKWARDS, SparseBackward

__all__ = ["RowFreezer"]


class RowFreezer:
    """Freeze everything in ``model`` that ``mask`` does not select.

    Use as a context manager, or call :meth:`remove` when done.

    Parameters
    ----------
    backward:
        ``"masked"`` (default): the full backward pass, frozen rows' gradients
        zeroed by hooks. ``"sparse"``: weight gradients of selected rows only
        (:class:`~fedneq.training.sparse_backward.SparseBackward`); same gradients.
    grad_filter:
        Gradient filtering of some convs (approximate gradients), or ``None``.
    profile, batch_size:
        Shapes that let ``"sparse"`` skip layers too small to gain from it
        (see :class:`~fedneq.training.sparse_backward.SparseBackward`).
    """

    def __init__(
        self,
        model: nn.Module,
        neuron_map: NeuronMap,
        mask: TrainMask,
        *,
        backward: str = "masked",
        grad_filter: GradFilterConfig | None = None,
        profile: CostProfile | None = None,
        batch_size: int = 32,
    ) -> None:
        if backward not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
        self.ops: SparseBackward | None = None
        if backward == "sparse" or grad_filter is not None:
            self.ops = SparseBackward(
                model,
                neuron_map,
                mask,
                grad_filter=grad_filter,
                budgeted=backward == "sparse",
                profile=profile,
                batch_size=batch_size,
            )
        handled = self.ops.handled if self.ops is not None else frozenset()
        self.model = model
        self.mask = mask
        key = mask_key(mask)
        self.rows = row_masks(model, neuron_map, mask, key=key)  # shared: read only
        self._requires_grad = [(p, p.requires_grad) for p in parameters(model)]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # (tensor, frozen-row indices or None for the whole tensor, snapshot of the frozen part)
        self._frozen: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

        state = named_tensors(model)
        plan = memo(
            model,
            ("freeze", id(neuron_map), key, handled),
            lambda: (neuron_map, _freeze_plan(model, state, self.rows, handled)),
        )[1]
        for name, is_param, frozen, hook in plan:
            tensor = state[name]
            if not tensor.is_floating_point():
                continue
            if frozen is None:  # no trainable row
                if is_param:
                    tensor.requires_grad_(False)
                else:  # e.g. running stats of a BatchNorm whose neurons are all frozen
                    self._frozen.append((tensor, None, tensor.detach().clone()))
                continue
            if is_param:
                tensor.requires_grad_(True)
            if frozen is _ALL_ROWS:
                continue
            self._frozen.append((tensor, frozen, tensor.detach().index_select(0, frozen)))
            if hook:  # else the op's gradient is 0 there already
                self._handles.append(tensor.register_hook(_zero_rows_hook(frozen)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in parameters(self.model) if p.requires_grad]

    @torch.no_grad()
    def restore(self) -> None:
        """Copy every frozen row back to its value at construction."""
        for tensor, frozen, snapshot in self._frozen:
            if frozen is None:
                tensor.copy_(snapshot)
            else:
                tensor.index_copy_(0, frozen, snapshot)

    def remove(self) -> None:
        """Undo: remove gradient hooks and ops, restore ``requires_grad`` flags."""
        if self.ops is not None:
            self.ops.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)

    def __enter__(self) -> RowFreezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


_ALL_ROWS = torch.zeros(0, dtype=torch.int64)  # a plan's marker: every row trains


def _freeze_plan(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    rows: dict[str, torch.Tensor],
    handled: frozenset[str],
) -> tuple[tuple[str, bool, torch.Tensor | None, bool], ...]:
    """What :class:`RowFreezer` does to each tensor of ``state`` for a mask's ``rows``.

    One ``(name, is_param, frozen, hook)`` per tensor with a floating-point
    dtype now, in ``state`` order: ``frozen`` is ``None`` (no trainable row),
    :data:`_ALL_ROWS` (every row trains) or the frozen rows' indices;
    ``hook``: the gradient of those rows needs zeroing (no op handles it).
    Depends on the mask and the architecture only: computed once per model
    and mask (:mod:`fedneq.training.shape_memo`).
    """
    params = {name for name, _ in model.named_parameters()}
    plan = []
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        is_param = name in params
        selected = rows.get(name)
        if selected is None:
            plan.append((name, is_param, None, False))
        elif bool(selected.all()):
            plan.append((name, is_param, _ALL_ROWS, False))
        else:
            frozen = (~selected).nonzero().flatten()
            plan.append((name, is_param, frozen, is_param and name not in handled))
    return tuple(plan)


def _zero_rows_hook(frozen: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.index_fill(0, frozen, 0)  # a copy: autograd may reuse `grad`

    return hook
