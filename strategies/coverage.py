"""Coverage: how many clients of a round trained each parameter.

"Every Parameter Matters: Ensuring the Convergence of Federated Learning with
Dynamic Heterogeneous Models Reduction" (NeurIPS 2023) ties the convergence of partial training to
the least number of clients covering each parameter. :func:`coverage` counts,
for every parameter tensor, how many of the round's aggregated updates sent
each element, and summarises the counts per tensor (min, median, mean, max,
the fraction nobody trained); the server writes them to ``coverage.csv``, one
row per round per tensor.

Cheap: a neuron update sends whole rows, so its counts are kept per row (every
element of a row has the same count, and every row of a tensor the same
number of elements, so the row statistics are the element statistics); only
element-block updates (width sub-models, FIARSE) are counted per element, and
a tensor that every sender sent whole (``SparseUpdate.whole``) has one count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedneq.federation.wire import SparseUpdate, as_rows, element_mask

__all__ = ["TensorCoverage", "coverage", "coverage_counts"]


@dataclass(frozen=True)
class TensorCoverage:
    """How many updates trained the elements of one tensor."""

    tensor: str
    elements: int
    clients: int  # updates counted (the round's aggregated replies)
    min: int
    median: float
    mean: float
    max: int
    uncovered: float  # fraction of the elements no update trained


def coverage_counts(
    updates: Sequence[SparseUpdate],
    global_state: Mapping[str, torch.Tensor],
    keys: Iterable[str],
) -> dict[str, torch.Tensor]:
    """``key -> int64 counts``: per row ``(R,)`` where every update sent whole rows of the
    key, else per element (shaped like the tensor); every key of ``keys`` is present."""
    counts: dict[str, torch.Tensor] = {}
    for key in keys:
        shape = global_state[key].shape
        senders = [u for u in updates if key in u.rows]
        if any(key in u.elements for u in senders):
            count = torch.zeros(shape, dtype=torch.int64)
            for u in senders:
                count += element_mask(u, key, shape)
        else:
            count = torch.zeros(as_rows(global_state[key]).shape[0], dtype=torch.int64)
            for u in senders:
                count += u.rows[key].reshape(-1)
        counts[key] = count
    return counts


def coverage(
    updates: Sequence[SparseUpdate],
    global_state: Mapping[str, torch.Tensor],
    keys: Iterable[str],
) -> tuple[TensorCoverage, ...]:
    """One :class:`TensorCoverage` per key of ``keys`` (in order, duplicates once)."""
    ordered = list(dict.fromkeys(keys))
    whole: dict[str, TensorCoverage] = {}
    for key in ordered:
        senders = [u for u in updates if key in u.rows]
        if all(u.whole is not None for u in senders):  # sent whole or not at all: one count
            c = len(senders)
            whole[key] = TensorCoverage(key, int(global_state[key].numel()), len(updates), c,
                                        float(c), float(c), c, float(c == 0))  # fmt: skip
    counted = [key for key in ordered if key not in whole]  # per row or element
    counts = coverage_counts(updates, global_state, counted)
    return tuple(
        whole[key] if key in whole else _stats(key, counts[key], global_state, len(updates))
        for key in ordered
    )


def _stats(key: str, count: torch.Tensor, global_state: Mapping[str, torch.Tensor], clients: int) -> TensorCoverage:
    """The :class:`TensorCoverage` of ``key`` from its counts."""
    flat = count.reshape(-1).to(torch.float64)
    sorted_counts = flat.sort().values
    n = len(sorted_counts)
    median = float((sorted_counts[(n - 1) // 2] + sorted_counts[n // 2]) / 2)
    return TensorCoverage(
        tensor=key,
        elements=int(global_state[key].numel()),
        clients=clients,
        min=int(sorted_counts[0]),
        median=median,
        mean=float(flat.mean()),
        max=int(sorted_counts[-1]),
        uncovered=float((flat == 0).to(torch.float64).mean()),
    )
