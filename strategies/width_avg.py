"""Width sub-models: HeteroFL, FjORD and FedRolex, averaged element by element.

A device of width ``p`` trains a real sub-network holding ``ceil(p * C)``
channels of every layer (:mod:`fedneq.training.submodel`) and replies with
element blocks (rows x input columns of each weight,
:data:`fedneq.federation.wire.BLOCK_KEYS`). The server averages every element
over the clients that trained it, weighted by their examples; an element
nobody trained keeps its global value (HeteroFL's rule; with every client at
``p = 1`` it is FedAvg).

* ``heterofl`` — Diao et al., ICLR 2021, https://arxiv.org/abs/2010.01264:
  the first ``ceil(p * C)`` channels, nested.
* ``fjord`` — Horváth et al., NeurIPS 2021, https://arxiv.org/abs/2102.13451:
  the same nested sub-model, trained with ordered dropout (a narrower width
  sampled per batch, up to the device's).
* ``fedrolex`` — Alam et al., NeurIPS 2022, https://arxiv.org/abs/2212.01548:
  a window of ``ceil(p * C)`` channels that starts at ``round - 1`` and wraps
  around, so it rolls over every channel.

These strategies need the client's cooperation: :meth:`WidthAvg.train_config`
puts :data:`~fedneq.federation.protocol.WIDTH_KEY` in the training config, and the client then trains
its sub-model (:mod:`fedneq.federation.width_client`) instead of a neuron mask.
Differences from the papers: the server averages weighted by examples
(HeteroFL counts clients); BatchNorm follows ``[train] bn_stats`` (frozen by
default) rather than HeteroFL's static BatchNorm; HeteroFL's label split of
the classifier is an option (``label_split = true``:
:mod:`strategies.label_split`, each head row averaged over the clients
holding its label), its local masked cross-entropy is not (the default
balanced-softmax loss likewise leaves a client's absent labels out); the
global model is evaluated at full width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ConfigRecordValues

from fedneq.federation.protocol import WIDTH_KEY
from fedneq.federation.wire import SparseUpdate, element_mask
from fedneq.neurons import NeuronMap

from .base import ReplyFacts, SparseStrategy
from .label_split import split_labels
from .registry import register_strategy
from .rows import check_weights

__all__ = [
    "FedRolex", "FjORD", "HeteroFL", "WIDTH_UPDATE_RATIO", "WidthAvg", "element_average",
]  # fmt: skip

WIDTH_UPDATE_RATIO = 100.0  # default max_update_ratio of the width strategies (WidthAvg)


def element_average(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[SparseUpdate],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Every element becomes the weighted mean over the updates that sent it.

    Element-block updates count their sent elements
    (:attr:`~fedneq.federation.wire.SparseUpdate.elements`), neuron updates
    their sent rows whole. Elements with no sender (or zero total weight) keep
    their global value; float64 accumulation, cast back to the global dtype.
    """
    check_weights(weights, len(updates))
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, torch.Tensor] = {}
    for update, weight in zip(updates, weights, strict=True):
        for key in update.rows:
            if key not in global_state:
                raise ValueError(f"update sends {key!r}, which is not in the global state")
            ref = global_state[key]
            mask = element_mask(update, key, ref.shape)
            if mask.shape != ref.shape:
                raise ValueError(
                    f"update elements of {key!r} have shape {tuple(mask.shape)}, expected {tuple(ref.shape)}"
                )
            if key not in sums:
                sums[key] = torch.zeros(ref.shape, dtype=torch.float64)
                totals[key] = torch.zeros(ref.shape, dtype=torch.float64)
            w = weight * mask.to(torch.float64)
            sums[key] += w * torch.where(mask, update.values[key].to(torch.float64), 0.0)
            totals[key] += w
    out = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in global_state.items()}
    for key, total in totals.items():
        hit = total > 0
        out[key][hit] = (sums[key][hit] / total[hit]).to(out[key].dtype)
    return out


class WidthAvg(SparseStrategy):
    """Element-wise average of width sub-model replies (:func:`element_average`).

    Subclasses set :attr:`method`, the client-side training it asks for.
    Parameters are those of :class:`~strategies.base.SparseStrategy`, except
    that ``max_update_ratio`` defaults to :data:`WIDTH_UPDATE_RATIO`: sub-models
    of different widths move their weights by amounts far apart (on the
    default run the full-width phones' RMS change was 11-18 times the median
    of a round with mostly width-0.08 and 0.2 clients, which the velocity
    strategies' default of 10 rejected); an exploded update is ~10^4 times.
    ``label_split`` (default False): average each classifier-head row only
    over the clients whose partition holds its label (HeteroFL's label split,
    :mod:`strategies.label_split`).
    """

    method: str = "heterofl"
    reply_format = "blocks"
    fedavg_at_full_budget = True  # every client at width 1

    def __init__(
        self,
        neuron_map: NeuronMap,
        table: Sequence[str],
        *,
        max_update_ratio: float | None = WIDTH_UPDATE_RATIO,
        label_split: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(label_split, bool):
            raise ValueError(f"label_split must be true or false, got {label_split!r}")
        self.label_split = label_split
        super().__init__(neuron_map, table, max_update_ratio=max_update_ratio, **kwargs)

    def train_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {WIDTH_KEY: self.method}

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        return element_average(global_state, updates, weights)

    def aggregate_replies(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
        facts: list[ReplyFacts],
    ) -> dict[str, torch.Tensor]:
        if self.label_split:
            head = self.server_inputs.head_tensors & set(self.table)
            updates = split_labels(updates, [f.labels for f in facts], head)
        return element_average(global_state, updates, weights)


@register_strategy("heterofl")
class HeteroFL(WidthAvg):
    """HeteroFL: nested sub-models of the first channels (module notes)."""

    method = "heterofl"


@register_strategy("fjord")
class FjORD(WidthAvg):
    """FjORD: nested sub-models trained with ordered dropout (module notes)."""

    method = "fjord"


@register_strategy("fedrolex")
class FedRolex(WidthAvg):
    """FedRolex: a rolling window of channels, one step per round (module notes)."""

    method = "fedrolex"
