"""Figures that depend only on a model, a mask and shapes, computed once per model.

A client process trains the same model object for every client it serves.
What training derives from the mask and the input shape alone (the cost
model's :class:`~fedneq.costs.MaskCost`, the number of trained parameters,
the shapes :func:`~fedneq.costs.profile_model` records, a step's measured
memory) is the same for every client and step with that mask and shape, so
:func:`memo` keeps it beside the model (weakly: it goes with the model) and
:func:`~fedneq.training.loop.train_masked` computes it once instead of on
every epoch or step. Values never depend on weights, so results are
bit-identical with or without the memo.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask

__all__ = [
    "clear_memo", "fix_structure", "lookup", "mask_key", "memo", "named_tensors", "parameters", "remember",
    "row_masks",
]

T = TypeVar("T")
MAX_ENTRIES = 256  # per model; a full memo starts over (velocity masks rarely repeat)
# a fixed structure (fix_structure) and what it lets the memo keep: these survive a start-over
_FIXED, _NAMED, _PARAMETERS = ("fixed-structure",), ("named-tensors",), ("parameters",)

_MEMOS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def mask_key(mask: TrainMask) -> tuple[bytes, frozenset[str]]:
    """A hashable identity of a mask: its neuron bits and whole tensors."""
    return mask.neurons.numpy().tobytes(), frozenset(mask.full_tensors)


def memo(model: nn.Module, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` the first time ``key`` is asked for ``model``; the same value after.

    ``key`` must name everything the value depends on besides the model's
    architecture (mask, shapes, options). Objects that only have an identity
    (a :class:`~fedneq.costs.CostProfile`) enter it as ``id(obj)``, with the
    object itself held by the value so that the id cannot be reused while the
    entry lives.
    """
    entries = _MEMOS.setdefault(model, {})
    if key in entries:
        return entries[key]
    value = compute()
    remember(model, key, value)
    return value


def lookup(model: nn.Module, key: Hashable) -> Any | None:
    """What was remembered for ``model`` under ``key``, or None."""
    return _MEMOS.get(model, {}).get(key)


def remember(model: nn.Module, key: Hashable, value: Any) -> None:
    """Keep ``value`` for ``model`` under ``key`` (see :func:`memo`)."""
    entries = _MEMOS.setdefault(model, {})
    if len(entries) >= MAX_ENTRIES:  # starts over, but a fixed structure stays declared
        kept = {k: entries[k] for k in (_FIXED, _NAMED, _PARAMETERS) if k in entries}
        entries.clear()
        entries.update(kept)
    entries[key] = value


def fix_structure(model: nn.Module) -> None:
    """Declare that no module, parameter or buffer of ``model`` is ever replaced (its values
    change in place only): :func:`named_tensors` and :func:`parameters` may then remember the
    tensors instead of walking the module tree on every call. A client process's runtime model
    is such a model; :func:`clear_memo` undoes the declaration."""
    remember(model, _FIXED, True)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)``: the model's own tensors by name (read only: do not
    add or remove keys); walked once for a :func:`fix_structure` model, on every call otherwise."""
    if lookup(model, _FIXED):
        return memo(model, _NAMED, lambda: model.state_dict(keep_vars=True))
    return model.state_dict(keep_vars=True)


def parameters(model: nn.Module) -> list[nn.Parameter]:
    """``list(model.parameters())``; walked once for a :func:`fix_structure` model."""
    if lookup(model, _FIXED):
        return list(memo(model, _PARAMETERS, lambda: tuple(model.parameters())))
    return list(model.parameters())


def clear_memo(model: nn.Module | None = None) -> None:
    """Forget what was computed for ``model`` (every model: ``None``)."""
    if model is None:
        _MEMOS.clear()
    else:
        _MEMOS.pop(model, None)


def row_masks(
    model: nn.Module,
    neuron_map: NeuronMap,
    mask: TrainMask,
    state: dict[str, torch.Tensor] | None = None,
    key: tuple[bytes, frozenset[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """``neuron_map.row_masks(mask, state)`` of ``model``'s state, once per model and mask.

    ``state`` (default: ``model.state_dict()``, taken only when the rows are
    not known yet) gives the row count of whole tensors; ``key`` is
    ``mask_key(mask)`` where the caller has it already. The dict and its
    tensors are shared by every caller: read them, never modify them.
    """

    def compute() -> tuple[NeuronMap, dict[str, torch.Tensor]]:
        return neuron_map, neuron_map.row_masks(mask, model.state_dict() if state is None else state)

    return memo(model, ("rows", id(neuron_map), key or mask_key(mask)), compute)[1]

