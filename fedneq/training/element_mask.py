"""Train chosen elements of a model's parameters; every other element comes out bit-identical.

:class:`ElementMask` is to an element-wise selection (FIARSE's magnitude
top-K, :func:`fedneq.selection.magnitude.magnitude_topk`) what
:class:`~fedneq.training.masking.RowFreezer` is to a neuron mask, and it is
used *around* the one training loop (:func:`~fedneq.training.loop.train_masked`,
given the neurons the elements touch, so the freezer keeps every other row
and tensor as it is):

* a gradient hook per parameter with a trained element keeps only the
  trained elements' gradient (optionally scaled, FIARSE's importance-aware
  gradient below);
* before every forward, each untrained element is set to its value in the
  sub-model: 0 in the tensors named in ``drop`` (FIARSE's sub-model: a
  masked Conv2d / Linear computes with ``w * mask``), its value at
  construction elsewhere (a BatchNorm's affine parameters stay in the
  forward). Momentum and weight decay may move an untrained element during
  an optimizer step; it is reset before it is used again;
* :meth:`remove` writes every untrained element back to its value at
  construction: bit-identical, whatever the optimizer did.

FIARSE's importance-aware gradient (``threshold``): the public code masks a
weight with ``m = Bern(|w|, t) = (|w| >= t)`` whose backward is
``2 t / (|w| + t)^2`` (a straight-through estimator), so the gradient of
``w * m(|w|)`` with respect to a kept ``w`` is ``g * (1 + 2 t |w| / (|w| + t)^2)``,
between ``g`` and ``1.5 g`` (largest at ``|w| = t``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

__all__ = ["ElementMask", "importance_scale"]


def importance_scale(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """FIARSE's gradient factor of a kept element: ``1 + 2 t |w| / (|w| + t)^2`` (module notes)."""
    w = weight.abs()
    return 1.0 + 2.0 * threshold * w / (w + threshold).square()


class ElementMask:
    """Train only ``elements`` of ``model``'s parameters (module notes).

    Use as a context manager, or call :meth:`remove` when done.

    Parameters
    ----------
    model:
        The model, holding the values untrained elements must come back to.
    elements:
        ``{parameter name: bool of its shape}``: the trained elements. A
        parameter not named is left alone.
    drop:
        Parameter names whose untrained elements are 0 in the forward pass
        (out of the sub-model) rather than at their value.
    threshold:
        FIARSE's threshold ``t`` > 0: trained elements' gradients are scaled
        by :func:`importance_scale`; ``None`` (default): plain masking.
    """

    def __init__(
        self,
        model: nn.Module,
        elements: Mapping[str, torch.Tensor],
        *,
        drop: Collection[str] = (),
        threshold: float | None = None,
    ) -> None:
        params = dict(model.named_parameters())
        unknown = sorted((set(elements) | set(drop)) - set(params))
        if unknown:
            raise ValueError(f"ElementMask names parameters {unknown} that the model does not have")
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold must be > 0 or None, got {threshold!r}")
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # (parameter, trained elements, values at construction, values while training)
        self._entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for name, keep in elements.items():
                p = params[name]
                if keep.shape != p.shape or keep.dtype != torch.bool:
                    raise ValueError(
                        f"elements[{name!r}] must be bool of shape {tuple(p.shape)}, got "
                        f"{keep.dtype} of shape {tuple(keep.shape)}"
                    )
                original = p.detach().clone()
                during = torch.where(keep, original, 0.0) if name in drop else original
                self._entries.append((p, keep, original, during))
                if bool(keep.any()) and p.requires_grad:
                    self._handles.append(p.register_hook(_grad_hook(p, keep, threshold)))
        self.reset()
        self._handles.append(model.register_forward_pre_hook(lambda _m, _a: self.reset()))

    @torch.no_grad()
    def reset(self) -> None:
        """Set every untrained element to its value in the sub-model (module notes)."""
        for p, keep, _, during in self._entries:
            p.copy_(torch.where(keep, p, during))

    @torch.no_grad()
    def remove(self) -> None:
        """Remove the hooks; every untrained element gets its value at construction back."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, keep, original, _ in self._entries:
            p.copy_(torch.where(keep, p, original))
        self._entries.clear()

    def __enter__(self) -> ElementMask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _grad_hook(p: nn.Parameter, keep: torch.Tensor, threshold: float | None):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if threshold is not None:
            grad = grad * importance_scale(p.detach(), threshold)
        return torch.where(keep, grad, 0.0)  # a new tensor: autograd may reuse `grad`

    return hook
