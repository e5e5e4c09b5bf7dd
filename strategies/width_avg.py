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
Options (``[strategy] options``), each off by default (the results of
before):

* ``static_bn`` (all three): HeteroFL's static BatchNorm. Clients train with
  batch statistics and send no running statistic
  (:class:`~fedneq.federation.width_client.WidthOptions`); before the server
  evaluates a model it computes its statistics by a query pass over
  ``query_examples`` seeded examples of the training pool (0: all of it, as
  HeteroFL's code), for the global model and for every width's sub-model
  (:func:`fedneq.training.static_bn.query_statistics`). Off: BatchNorm
  follows ``[train] bn_stats`` (frozen by default).
* ``roll_step`` (``fedrolex``): the window starts at
  ``roll_step * (round - 1)``; 1 by default, -1 is FedRolex's code exactly
  (``torch.roll(arange(C), round - 1)[:k]``), the mirror image of 1.
* ``capacity_accuracy`` (all three, **on** by default): the server also
  scores each fleet width's own sub-model of the global model every round
  (rounds.csv gains ``accuracy_w<width>`` columns, clients.csv's
  ``submodel_accuracy`` the sub-model of each client's width); ``false``
  writes the tables of before.

Differences from the papers: the server averages weighted by examples
(HeteroFL counts clients); HeteroFL's label split of the classifier is an
option (``label_split = true``: :mod:`strategies.label_split`, each head row
averaged over the clients holding its label), its local masked cross-entropy
is not (the default balanced-softmax loss likewise leaves a client's absent
labels out); HeteroFL's scaler (outputs divided by the width in training) is
left out (before a BatchNorm, which every scaled layer of its models is, it
cancels); FjORD's self-distillation is not implemented (the authors' own
Flower baseline runs without it by default) and FjORD's per-width running
statistics are approximated by ``static_bn``'s query pass per width;
FedRolex's ``overlap`` ablation (a window over a shuffled order) is not
implemented.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ConfigRecordValues

from fedneq.federation.protocol import WIDTH_KEY, WIDTH_OPTIONS_KEY
from fedneq.federation.width_client import WidthOptions
from fedneq.federation.wire import SparseUpdate, element_mask
from fedneq.neurons import NeuronMap

from .base import ReplyFacts, SparseStrategy
from .label_split import split_labels
from .options import check_flag
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

    Parameters
    ----------
    static_bn : bool (default: False)
        HeteroFL's static BatchNorm (module notes).
    query_examples : int (default: 0)
        With ``static_bn``: examples of the training pool in the server's
        query pass, a seeded subset; 0: the whole pool.
    capacity_accuracy : bool (default: True)
        Score every fleet width's sub-model each round (module notes).
    **kwargs
        Those of :class:`~strategies.base.SparseStrategy`, except
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
        static_bn: bool = False,
        query_examples: int = 0,
        capacity_accuracy: bool = True,
        max_update_ratio: float | None = WIDTH_UPDATE_RATIO,
        roll_step: int = 1,
        label_split: bool = False,
        **kwargs: Any,
    ) -> None:
        self.label_split = check_flag("label_split", label_split)
        for name, value in (("static_bn", static_bn), ("capacity_accuracy", capacity_accuracy)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} should be true or false, got {value!r}")
        if isinstance(query_examples, bool) or not isinstance(query_examples, int) or query_examples < 0:
            raise ValueError(f"query_examples should be an int >= 0 (0: all), got {query_examples!r}")
        if roll_step != 1 and self.method != "fedrolex":
            raise ValueError(f"roll_step is an option of fedrolex only, got roll_step={roll_step!r} "
                             f"for {self.method}")  # fmt: skip
        super().__init__(neuron_map, table, max_update_ratio=max_update_ratio, **kwargs)
        self.options = WidthOptions(static_bn=static_bn, roll_step=roll_step)  # validates
        self.query_examples = query_examples
        self.capacity_accuracy = capacity_accuracy

    def train_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        config: dict[str, ConfigRecordValues] = {WIDTH_KEY: self.method}
        if self.options != WidthOptions():  # the defaults travel as no key (messages of before)
            config[WIDTH_OPTIONS_KEY] = self.options.to_json()
        return config

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        return element_average(global_state, updates, weights)

    @property
    def uses_reply_facts(self) -> bool:
        """``label_split`` is on."""
        return self.label_split

    def aggregate_with_facts(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
        facts: list[ReplyFacts],
    ) -> dict[str, torch.Tensor]:
        """The head's rows from the clients holding their label, the rest as :meth:`aggregate`."""
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
    """FedRolex: a rolling window of channels, ``roll_step`` channels a round (module notes)."""

    method = "fedrolex"
