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

``RowFreezer`` is to a mask what ``torch.nn.utils.prune`` is to a pruning
mask: ``apply`` on construction, exact inverse with :meth:`remove`.
"""

from __future__ import annotations

import torch
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask

__all__ = ["RowFreezer"]


class RowFreezer:
    """Freeze everything in ``model`` that ``mask`` does not select.

    Use as a context manager, or call :meth:`remove` when done.
    """

    def __init__(self, model: nn.Module, neuron_map: NeuronMap, mask: TrainMask) -> None:
        self.model = model
        self.mask = mask
        state = model.state_dict(keep_vars=True)
        self.rows = neuron_map.row_masks(mask, state)
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # (tensor, frozen-row mask or None for the whole tensor, snapshot of the frozen part)
        self._frozen: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

        params = dict(model.named_parameters())
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                continue
            rows = self.rows.get(name)
            is_param = name in params
            if rows is None:
                if is_param:
                    tensor.requires_grad_(False)
                else:  # e.g. running stats of a BatchNorm whose neurons are all frozen
                    self._frozen.append((tensor, None, tensor.detach().clone()))
                continue
            if is_param:
                tensor.requires_grad_(True)
            if bool(rows.all()):
                continue
            frozen = ~rows
            self._frozen.append((tensor, frozen, tensor.detach()[frozen].clone()))
            if is_param:
                self._handles.append(tensor.register_hook(_zero_rows_hook(frozen)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def restore(self) -> None:
        """Copy every frozen row back to its value at construction."""
        for tensor, frozen, snapshot in self._frozen:
            if frozen is None:
                tensor.copy_(snapshot)
            else:
                tensor[frozen] = snapshot

    def remove(self) -> None:
        """Undo: remove gradient hooks and restore ``requires_grad`` flags."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad[name])

    def __enter__(self) -> RowFreezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _zero_rows_hook(frozen: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[frozen] = 0
        return grad

    return hook
