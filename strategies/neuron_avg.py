"""Neuron-wise federated averaging.

Every row of every tensor (one neuron's slice of a weight, bias or
BatchNorm statistic) becomes the example-weighted mean over the clients that
sent it; rows nobody sent keep their global value. With every client at full
budget this is exactly FedAvg (McMahan et al., https://arxiv.org/abs/1602.05629).

The clients train sparse, velocity-selected sets of neurons after NEq
(Bragagnolo et al., "To update or not to update? Neurons at equilibrium in
deep models", NeurIPS 2022, https://arxiv.org/abs/2207.09455) under a budget
(Quélennec et al., "Towards On-device Learning on the Edge: Ways to Select
Neurons to Update under a Budget Constraint", WACVW 2024,
https://arxiv.org/abs/2312.05282).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedneq.federation.wire import SparseUpdate, as_rows

from .base import SparseStrategy
from .registry import register_strategy

__all__ = ["NeuronAvg", "RowAverage", "average_rows", "check_weights", "neuron_average"]


@dataclass(frozen=True)
class RowAverage:
    """The result of :func:`average_rows`."""

    values: dict[str, torch.Tensor]  # the new state: every key of the global state
    rows: dict[str, torch.Tensor]  # key -> (rows,) bool, rows some client sent with weight > 0
    weights: dict[str, torch.Tensor]  # key -> (rows,) float64, total weight of each row's senders


def check_weights(weights: Sequence[float], num_updates: int) -> None:
    """Raise ``ValueError`` unless ``weights`` holds one finite weight >= 0 per update."""
    if len(weights) != num_updates:
        raise ValueError(f"weights has {len(weights)} entries for {num_updates} updates")
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"weights must be finite and >= 0, got {bad}")


def average_rows(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[SparseUpdate],
    weights: Sequence[float],
) -> RowAverage:
    """Example-weighted mean of every row over the clients that sent it.

    Parameters
    ----------
    global_state:
        The global model the clients started from.
    updates:
        Decoded replies (:func:`fedneq.federation.wire.decode`); values of unsent rows
        are ignored.
    weights:
        One weight per update (its number of training examples), >= 0.

    Returns
    -------
    RowAverage
        ``values`` holds a new tensor for every key of ``global_state`` (rows
        with zero total weight keep their global value, float64 accumulation,
        cast back to the global dtype); ``rows`` marks the rows that changed
        source and ``weights`` holds each row's total sender weight, for every
        key some update touched.
    """
    check_weights(weights, len(updates))
    sums: dict[str, torch.Tensor] = {}  # key -> (R, L) float64 weighted sum of sent rows
    totals: dict[str, torch.Tensor] = {}  # key -> (R,) float64 total weight per row
    for update, weight in zip(updates, weights, strict=True):
        for key, sent in update.rows.items():
            if key not in global_state:
                raise ValueError(f"update sends {key!r}, which is not in the global state")
            rows_global = as_rows(global_state[key])  # (R, L)
            if sent.shape != rows_global.shape[:1]:
                raise ValueError(
                    f"update rows for {key!r} have shape {tuple(sent.shape)}, "
                    f"expected ({rows_global.shape[0]},)"
                )
            if key not in sums:
                sums[key] = torch.zeros(rows_global.shape, dtype=torch.float64)
                totals[key] = torch.zeros(rows_global.shape[0], dtype=torch.float64)
            values = as_rows(update.values[key]).to(torch.float64)
            sums[key][sent] += weight * values[sent]
            totals[key][sent] += weight

    new_state = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in global_state.items()}
    changed: dict[str, torch.Tensor] = {}
    for key, total in totals.items():
        hit = total > 0  # (R,)
        out = as_rows(new_state[key])  # view into new_state[key]
        out[hit] = (sums[key][hit] / total[hit, None]).to(out.dtype)
        changed[key] = hit
    return RowAverage(values=new_state, rows=changed, weights=totals)


def neuron_average(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[SparseUpdate],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """The new global state: :func:`average_rows` values.

    Every row becomes the example-weighted mean over the clients whose update
    contains it; rows nobody sent keep their global value. When every update
    contains every row this is FedAvg.
    """
    return average_rows(global_state, updates, weights).values


@register_strategy("neuron-avg")
class NeuronAvg(SparseStrategy):
    """Neuron-wise FedAvg over sparse replies (:func:`neuron_average`).

    Parameters are those of :class:`~strategies.base.SparseStrategy`.
    """

    fedavg_at_full_budget = True

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        return neuron_average(global_state, updates, weights)
