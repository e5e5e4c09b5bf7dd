"""FedAvg of sparse updates: a row a client did not send counts as unchanged.

Every row becomes the example-weighted mean over *all* clients of the round,
a client that did not send the row contributing the global value (a zero
update). A row only some clients trained therefore moves by their share of
the round's examples, as in FedAvg over masked updates, whereas
:func:`~strategies.neuron_avg.neuron_average` moves it all the way to the
mean of its senders. With every client sending every row both equal FedAvg
(McMahan et al., https://arxiv.org/abs/1602.05629).

Why the paper sweep aggregates budgeted runs with it: with random masks most
neurons are trained by one client of the round, and ``neuron-avg`` applies
that client's label-skewed update whole. The two rules are compared on the
same plan in docs/variants/neuron-avg/RESULTS.md (its reading) and
docs/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedneq.federation.wire import SparseUpdate, as_rows

from .registry import register_strategy
from .row_rule import RowRule
from .rows import RowAverage, average_rows

__all__ = ["SparseFedAvg", "sparse_fedavg", "sparse_mix"]


def sparse_mix(
    global_state: Mapping[str, torch.Tensor], average: RowAverage, total: float
) -> dict[str, torch.Tensor]:
    """``average``'s values, each row mixed with the global value by its senders' share.

    ``new = (c · avg + (W − c) · global) / W`` per row, with ``c`` the
    senders' total weight (``average.weights``), ``avg`` the row's average
    over its senders (``average.values``) and ``W`` the round's total weight
    ``total``, or the row's own total where ``average.eligible`` gives one
    (the label split: only the clients holding the row's label). Float64
    arithmetic, cast back to the global dtype; rows nobody sent, or a round
    of zero total weight, keep their global value.
    """
    values = average.values
    for key, hit in average.rows.items():
        covered = average.weights[key]  # (R,) senders' weight per row
        eligible = average.eligible.get(key)  # (R,) each row's own total, or None: the round's
        # rows where some client of the round (holding the row's label) did not send
        partial = hit & (covered < (total if eligible is None else eligible))
        if not partial.any():
            continue
        out, old = as_rows(values[key]), as_rows(global_state[key]).to(torch.float64)  # (R, L)
        c = covered[partial, None]
        w = total if eligible is None else eligible[partial, None]
        mixed = (c * out[partial].to(torch.float64) + (w - c) * old[partial]) / w
        out[partial] = mixed.to(out.dtype)
    return values


def sparse_fedavg(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[SparseUpdate],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """The new global state: every row averaged over all updates, unsent rows as global.

    ``new = (c · mean over senders + (W − c) · global) / W`` per row, with
    ``c`` the senders' total weight and ``W`` the total weight of the round
    (float64 arithmetic, cast back to the global dtype). Rows nobody sent,
    or a round of zero total weight, keep their global value.
    """
    average = average_rows(global_state, updates, weights)  # validates the inputs
    return sparse_mix(global_state, average, float(sum(weights)))


@register_strategy("sparse-fedavg")
class SparseFedAvg(RowRule):
    """FedAvg over sparse replies (:func:`sparse_fedavg`).

    Parameters are those of :class:`~strategies.row_rule.RowRule` (``fednova``,
    ``label_split``) and :class:`~strategies.base.SparseStrategy`.
    """

    fedavg_at_full_budget = True

    def step(
        self, global_state: dict[str, torch.Tensor], average: RowAverage, total: float
    ) -> dict[str, torch.Tensor]:
        return sparse_mix(global_state, average, total)
