"""Label-aware aggregation of the classifier head (HeteroFL's label split).

Diao, Ding, Tarokh, "HeteroFL: Computation and Communication Efficient
Federated Learning for Heterogeneous Clients", ICLR 2021,
https://arxiv.org/abs/2010.01264 (``label_split`` in its code): row ``r`` of
the classifier's weight and bias, the logit of label ``r``, is averaged only
over the clients whose data hold label ``r``. A client without label ``r``
never sees it, and local training only pushes that logit down (plain
cross-entropy) or leaves it drifting with the shared features; under label
skew those rows would otherwise be averaged mostly over clients that know
nothing of the label.

:func:`split_labels` marks those rows of each update unsent, so any
aggregation rule then averages each head row over its holders;
:func:`label_weights` gives each head row the total weight of its holders,
the round mean of a rule that counts every client of the round
(``sparse-fedavg``: non-holders are not part of that mean either).

The server knows each client's labels from the partition it computes from the
seed (:attr:`strategies.inputs.ServerInputs.labels`), never from the reply: a
client cannot claim a row it holds no data for. A client whose labels the
server does not know counts as holding every label.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

import torch

from fedneq.federation.wire import SparseUpdate, as_rows

__all__ = ["label_rows", "label_weights", "split_labels"]


def label_rows(labels: Collection[int] | None, num_rows: int) -> torch.Tensor:
    """``(num_rows,)`` bool: the head rows of ``labels`` (``None``: every row).

    Raises
    ------
    ValueError
        If a label is not a row of the head (not in ``[0, num_rows)``).
    """
    if labels is None:
        return torch.ones(num_rows, dtype=torch.bool)
    bad = sorted(x for x in labels if not 0 <= x < num_rows)
    if bad:
        raise ValueError(f"labels {bad} are not rows of a classifier head of {num_rows} rows")
    held = torch.zeros(num_rows, dtype=torch.bool)
    held[list(labels)] = True
    return held


def split_labels(
    updates: Sequence[SparseUpdate],
    labels: Sequence[Collection[int] | None],
    head: Collection[str],
) -> list[SparseUpdate]:
    """Each update with the ``head`` rows of labels its client does not hold left unsent.

    ``labels[i]`` are the labels of update ``i``'s client (``None``:
    unknown, every row kept). Neuron updates lose rows; element-block
    updates lose those rows' elements. A tensor left with no sent row is
    dropped from the update. Other keys pass through unchanged.
    """
    if len(labels) != len(updates):
        raise ValueError(f"labels has {len(labels)} entries for {len(updates)} updates")
    out = []
    for update, held_labels in zip(updates, labels, strict=True):
        keys = [k for k in update.rows if k in head]
        if held_labels is None or not keys:
            out.append(update)
            continue
        values, rows, elements = dict(update.values), dict(update.rows), dict(update.elements)
        for key in keys:
            held = label_rows(held_labels, rows[key].shape[0])
            rows[key] = rows[key] & held
            if key in elements:  # element blocks: those rows' elements unsent
                mask = elements[key] & held.view(-1, *([1] * (elements[key].dim() - 1)))
                elements[key] = mask
                rows[key] = as_rows(mask).any(dim=1)
            if not bool(rows[key].any()):
                for d in (values, rows, elements):
                    d.pop(key, None)
        out.append(dataclasses.replace(update, values=values, rows=rows, elements=elements, whole=None))
    return out


def label_weights(
    global_state: Mapping[str, torch.Tensor],
    labels: Sequence[Collection[int] | None],
    weights: Sequence[float],
    head: Collection[str],
) -> dict[str, torch.Tensor]:
    """``head key -> (rows,) float64``: the total weight of the clients holding each row's label."""
    if len(labels) != len(weights):
        raise ValueError(f"labels has {len(labels)} entries for {len(weights)} weights")
    out: dict[str, torch.Tensor] = {}
    for key in head:
        num_rows = as_rows(global_state[key]).shape[0]
        total = torch.zeros(num_rows, dtype=torch.float64)
        for held, weight in zip(labels, weights, strict=True):
            total += float(weight) * label_rows(held, num_rows).to(torch.float64)
        out[key] = total
    return out
