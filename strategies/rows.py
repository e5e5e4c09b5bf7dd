"""Row arithmetic shared by the neuron-format rules: every row averaged over its senders.

A sparse reply sends whole rows (one neuron's slice of a weight, bias or
BatchNorm tensor), so a per-element rule is a per-row rule here: every
element of a row has the same senders. :func:`average_rows` is the
example-weighted mean of each row over the clients that sent it (the basis
of ``neuron-avg``, ``sparse-fedavg``, ``server-momentum``, ``fedadam`` and
``fedyogi``); :func:`fednova_average` is the same with each client's update
normalised by its local step count (FedNova). Both return a
:class:`RowAverage`, which the rules then turn into the new global state.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedneq.federation.wire import SparseUpdate, as_rows

__all__ = ["RowAverage", "average_rows", "check_weights", "fednova_average"]


@dataclass(frozen=True)
class RowAverage:
    """The result of :func:`average_rows` or :func:`fednova_average`."""

    values: dict[str, torch.Tensor]  # the new state: every key of the global state
    rows: dict[str, torch.Tensor]  # key -> (rows,) bool, rows some client sent with weight > 0
    weights: dict[str, torch.Tensor]  # key -> (rows,) float64, total weight of each row's senders
    # key -> (rows,) float64: the total weight of the clients a row's round mean is over
    # (sparse-fedavg's W, per row); a key without an entry: every client of the round
    eligible: dict[str, torch.Tensor] = field(default_factory=dict)


def check_weights(weights: Sequence[float], num_updates: int) -> None:
    """Raise ``ValueError`` unless ``weights`` holds one finite weight >= 0 per update."""
    if len(weights) != num_updates:
        raise ValueError(f"weights has {len(weights)} entries for {num_updates} updates")
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"weights must be finite and >= 0, got {bad}")


def _rows_of(global_state: Mapping[str, torch.Tensor], key: str, sent: torch.Tensor) -> torch.Tensor:
    """``global_state[key]`` as rows, checked against an update's sent rows of it."""
    if key not in global_state:
        raise ValueError(f"update sends {key!r}, which is not in the global state")
    rows_global = as_rows(global_state[key])  # (R, L)
    if sent.shape != rows_global.shape[:1]:
        raise ValueError(
            f"update rows for {key!r} have shape {tuple(sent.shape)}, "
            f"expected ({rows_global.shape[0]},)"
        )
    return rows_global


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
    whole = _whole_average(global_state, updates, weights)
    if whole is not None:
        return whole
    sums: dict[str, torch.Tensor] = {}  # key -> (R, L) float64 weighted sum of sent rows
    totals: dict[str, torch.Tensor] = {}  # key -> (R,) float64 total weight per row
    for update, weight in zip(updates, weights, strict=True):
        for key, sent in update.rows.items():
            rows_global = _rows_of(global_state, key, sent)
            if key not in sums:
                sums[key] = torch.zeros(rows_global.shape, dtype=torch.float64)
                totals[key] = torch.zeros(rows_global.shape[0], dtype=torch.float64)
            values = as_rows(update.values[key]).to(torch.float64)
            if bool(sent.all()):  # a whole tensor: the same sums, without gathering its rows
                sums[key] += weight * values
                totals[key] += weight
            else:
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


def _whole_average(
    global_state: Mapping[str, torch.Tensor], updates: Sequence[SparseUpdate], weights: Sequence[float]
) -> RowAverage | None:
    """:func:`average_rows` of updates that all send the same tensors whole
    (:attr:`~fedneq.federation.wire.SparseUpdate.whole` of one layout), in one operation per
    update on their flat values; the same float64 operations element by element, so the
    same result to the bit. None for any other round."""
    layout = updates[0].whole.layout if updates and updates[0].whole is not None else None
    if layout is None or any(u.whole is None or u.whole.layout is not layout for u in updates):
        return None
    for key, shape in zip(layout.keys, layout.shapes, strict=True):
        ref = global_state.get(key)
        if ref is None or tuple(ref.shape) != shape or ref.dtype != torch.float32:
            return None  # the general path names a mismatch and casts to another dtype
    sums = torch.zeros(layout.numel, dtype=torch.float64)
    scaled = torch.empty(layout.numel, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)  # as each row's total weight accumulates
    for update, weight in zip(updates, weights, strict=True):
        scaled.copy_(update.whole.values)
        scaled.mul_(weight)
        sums += scaled
        total += weight
    hit = bool(total > 0)
    averaged = layout.views((sums / total).to(torch.float32)) if hit else {}
    new_state = {
        k: averaged[k] if k in averaged else v.detach().clone(memory_format=torch.contiguous_format)
        for k, v in global_state.items()
    }
    rows_of = {k: as_rows(global_state[k]).shape[0] for k in updates[0].rows}
    return RowAverage(
        values=new_state,
        rows={k: torch.full((n,), hit, dtype=torch.bool) for k, n in rows_of.items()},
        weights={k: total.expand(n).clone() for k, n in rows_of.items()},
    )


def fednova_average(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[SparseUpdate],
    weights: Sequence[float],
    steps: Sequence[int],
    keys: Collection[str],
) -> RowAverage:
    """FedNova per element: each client's update divided by its local steps, then rescaled.

    Wang et al., "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", NeurIPS 2020,
    https://arxiv.org/abs/2007.07481. For every element ``e`` of a key in
    ``keys`` (the parameters), with ``S_e`` the clients that trained it,
    ``w_i`` their weights, ``tau_i`` their local optimizer steps, ``x_i``
    their values and ``g`` the global value::

        p_i   = w_i / sum_{j in S_e} w_j
        d_e   = sum_{i in S_e} p_i (x_{i,e} - g_e) / tau_i     (normalised update)
        tau_e = sum_{i in S_e} p_i tau_i                       (effective steps)
        new_e = g_e + tau_e * d_e

    So a client's pull on an element no longer grows with its number of
    steps: with equal ``tau_i`` this is :func:`average_rows`' mean (up to
    rounding), and a client of 6 steps no longer moves an element 6 times as
    far as a client of 1 step. Both sums run over the element's own trainers
    (per element, not FedNova's per round), so an element few clients train
    is normalised by their steps alone. ``tau_i`` counts optimizer steps: the
    paper's ``||a_i||_1`` for plain local SGD (with local momentum the paper
    uses a larger ``||a_i||_1``; fedneq divides by the step count).

    Keys outside ``keys`` (float buffers: BatchNorm running statistics) take
    :func:`average_rows`' plain mean. Float64 accumulation, cast back to the
    global dtype; rows with zero total weight keep their global value.

    Raises
    ------
    ValueError
        As :func:`average_rows`, or if ``steps`` does not hold one int >= 1 per update.
    """
    check_weights(weights, len(updates))
    if len(steps) != len(updates) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in steps
    ):
        raise ValueError(f"steps must hold one int >= 1 per update ({len(updates)}), got {list(steps)}")
    plain = average_rows(global_state, updates, weights)
    values = dict(plain.values)
    normalised: dict[str, torch.Tensor] = {}  # key -> (R, L) float64 sum of w_i (x_i - g) / tau_i
    tau: dict[str, torch.Tensor] = {}  # key -> (R,) float64 sum of w_i tau_i
    for update, weight, t in zip(updates, weights, steps, strict=True):
        for key, sent in update.rows.items():
            if key not in keys:
                continue
            old = as_rows(global_state[key]).to(torch.float64)  # (R, L)
            if key not in normalised:
                normalised[key] = torch.zeros(old.shape, dtype=torch.float64)
                tau[key] = torch.zeros(old.shape[0], dtype=torch.float64)
            delta = as_rows(update.values[key]).to(torch.float64)[sent] - old[sent]
            normalised[key][sent] += (weight / t) * delta
            tau[key][sent] += weight * t
    for key, d in normalised.items():
        hit = plain.rows[key]
        total = plain.weights[key][hit, None]  # (H, 1)
        out = as_rows(global_state[key]).clone(memory_format=torch.contiguous_format)
        old = out[hit].to(torch.float64)
        out[hit] = (old + (tau[key][hit, None] / total) * (d[hit] / total)).to(out.dtype)
        values[key] = out.reshape(global_state[key].shape)
    return RowAverage(values=values, rows=plain.rows, weights=plain.weights)
