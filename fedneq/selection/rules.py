"""The selection rules: which neurons of a ranking fit the budget (and the memory limit).

Rules rank neurons by score, descending, ties to the lower index.
``"prefix"`` (the paper's, Quélennec et al., https://arxiv.org/abs/2312.05282)
takes the longest prefix of that order whose cumulative cost fits; ``"fill"``
skips a neuron that does not fit and keeps going. Neither ever exceeds the
budget. With a memory limit (:class:`~fedneq.selection.memory_meter.MemoryLimit`)
a neuron fits only if the selection's exact training memory stays within it too.
"""

from __future__ import annotations

import torch

from fedneq._validate import is_int
from fedneq.selection.memory_meter import MemoryLimit

__all__ = ["RULES", "ranked", "select_fill", "select_ordered", "select_prefix"]

RULES = ("prefix", "fill")


def _check_costs(costs: torch.Tensor, n: int | None = None) -> None:
    if not isinstance(costs, torch.Tensor) or costs.dim() != 1 or costs.dtype != torch.int64:
        raise ValueError(
            f"costs must be a 1-D int64 tensor, got "
            f"{getattr(costs, 'dtype', type(costs).__name__)} of shape "
            f"{tuple(getattr(costs, 'shape', ()))}"
        )
    if n is not None and costs.numel() != n:
        raise ValueError(f"costs must have {n} entries (one per score), got {costs.numel()}")
    if bool((costs < 0).any()):
        raise ValueError(f"costs must be >= 0, got minimum {int(costs.min())}")


def _check_budget(budget: int) -> None:
    if not is_int(budget) or budget < 0:
        raise ValueError(f"budget must be an int >= 0 (parameters), got {budget!r}")


def select_ordered(
    order: torch.Tensor,
    costs: torch.Tensor,
    budget: int,
    rule: str = "prefix",
    memory: MemoryLimit | None = None,
) -> torch.Tensor:
    """Apply ``rule`` to neurons taken in ``order``; only neurons in ``order`` can be selected.

    Parameters
    ----------
    order:
        (K,) int64 distinct neuron indices, best first (a permutation of a subset).
    costs:
        (N,) int64 cost of every neuron.
    budget:
        Parameters available (>= 0).
    rule:
        ``"prefix"`` (longest fitting prefix) or ``"fill"`` (skip what does not fit).
    memory:
        Optional training-memory limit: a neuron fits only if the selection's
        memory (:meth:`MemoryMeter.mask_bytes`) stays within it as well. A
        neuron whose memory alone (:meth:`MemoryMeter.alone_bytes`) exceeds
        the limit is dropped from ``order`` first: the prefix rule then stops
        only at a neuron the device could have held.

    Returns
    -------
    (N,) bool mask whose selected cost is at most ``budget`` (and whose memory
    is at most ``memory.limit_bytes``).
    """
    _check_costs(costs)
    _check_budget(budget)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {list(RULES)}, got {rule!r}")
    if memory is not None and rule == "fill":
        return memory.meter.fill(order, costs, budget, memory.limit_bytes)
    mask = torch.zeros(costs.numel(), dtype=torch.bool)
    if memory is not None:  # a neuron the device cannot hold even alone is no candidate
        order = order[memory.meter.alone_bytes()[order] <= memory.limit_bytes]
    ordered = costs[order]  # (K,)
    fits = torch.cumsum(ordered, 0) <= budget  # nondecreasing cumsum: True then False
    if memory is not None:  # memory of a growing prefix never decreases either
        fits &= memory.meter.prefix_bytes(order) <= memory.limit_bytes
    k = int(fits.sum())
    mask[order[:k]] = True
    if rule == "fill":
        remaining = budget - int(ordered[:k].sum())
        for index, cost in zip(order[k:].tolist(), ordered[k:].tolist(), strict=True):
            if cost <= remaining:
                mask[index] = True
                remaining -= cost
    return mask


def ranked(scores: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """Indices by score descending, ties to the lower index."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a 1-D floating tensor, got "
            f"{getattr(scores, 'dtype', type(scores).__name__)} of shape "
            f"{tuple(getattr(scores, 'shape', ()))}"
        )
    _check_costs(costs, scores.numel())
    if bool(torch.isnan(scores).any()):
        raise ValueError(
            f"scores contain {int(torch.isnan(scores).sum())} NaN value(s); "
            "allowed: finite or infinite floats"
        )
    return torch.sort(scores, descending=True, stable=True).indices


def select_prefix(scores: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """(N,) bool: the longest prefix of the score ranking whose cost fits ``budget``."""
    return select_ordered(ranked(scores, costs), costs, budget, "prefix")


def select_fill(scores: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """(N,) bool: walk the score ranking, take every neuron that still fits ``budget``."""
    return select_ordered(ranked(scores, costs), costs, budget, "fill")
