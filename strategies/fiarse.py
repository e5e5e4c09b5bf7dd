"""FIARSE: magnitude top-K sub-models, each element averaged over the clients that moved it.

Wu et al., "FIARSE: Model-Heterogeneous Federated Learning via
Importance-Aware Submodel Extraction", NeurIPS 2024,
https://arxiv.org/abs/2407.19389 (code: https://github.com/HarliWu/FIARSE,
``fiarse/server.py``).

Every round each client trains the global model's elements of largest
magnitude, as many as its budget allows and its memory holds
(:mod:`fedneq.federation.element_client`, asked for through
:data:`~fedneq.federation.protocol.ELEMENT_KEY` in the training config), and
replies with them as element blocks with an element bitmap. The server
(:func:`fiarse_aggregate`), for every element::

    Δ_c   = sent_c − global                   (client c's update there; 0 where not sent)
    n     = #{c : Δ_c ≠ 0}                     (the clients that moved it)
    new   = global + η · Σ_c Δ_c / n           (parameters; n = 0: unchanged)
    new   = global + Σ_c Δ_c / n               (float buffers, BatchNorm running statistics)

with the server learning rate η (``server_lr``). Like the code, clients count
equally (not by examples) and an element counts a client only where its
update is non-zero; BatchNorm running statistics take the plain average.

Differences from the paper and its code, on the client side
(:mod:`fedneq.federation.element_client`): the always-trained set (a new
classifier head) is trained whole outside the budget, as for every fedneq
method, where FIARSE ranks the classifier too; BatchNorm's affine parameters
are ranked with the rest and charged to the budget (FIARSE trains
normalisation layers whole, outside the size); the sub-model is fixed for
the round (the code re-tests ``|w| >= t`` at every forward, so an element
that shrinks below the threshold leaves it); ties at the threshold are
broken by position so the count is exactly ``K``; the memory limit may shrink
``K``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ConfigRecordValues

from fedneq.federation.protocol import ELEMENT_KEY
from fedneq.federation.wire import SparseUpdate, element_mask
from fedneq.neurons import NeuronMap

from .base import SparseStrategy
from .options import check_number
from .registry import register_strategy
from .row_rule import parameter_keys

__all__ = ["FIARSE", "fiarse_aggregate"]


def fiarse_aggregate(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[SparseUpdate],
    *,
    server_lr: float = 1.0,
    param_keys: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """FIARSE's server step (module notes): each element's summed update over its movers' count.

    ``param_keys`` take the server learning rate ``server_lr``; every other
    sent key (float buffers) takes the plain average. Float64 accumulation,
    cast back to each tensor's dtype.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for update in updates:
        for key in update.rows:
            if key not in global_state:
                raise ValueError(f"update sends {key!r}, which is not in the global state")
            ref = global_state[key].to(torch.float64)
            sent = element_mask(update, key, ref.shape)
            delta = torch.where(sent, update.values[key].to(torch.float64) - ref, 0.0)
            if key not in sums:
                sums[key] = torch.zeros_like(ref)
                counts[key] = torch.zeros_like(ref)
            sums[key] += delta
            counts[key] += (delta != 0).to(torch.float64)
    out = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in global_state.items()}
    for key, count in counts.items():
        moved = count > 0
        step = server_lr if key in param_keys else 1.0
        new = global_state[key].to(torch.float64) + step * sums[key] / count.clamp(min=1.0)
        out[key][moved] = new[moved].to(out[key].dtype)
    return out


@register_strategy("fiarse")
class FIARSE(SparseStrategy):
    """FIARSE's aggregation of element-wise replies (module notes).

    Parameters
    ----------
    server_lr : float (default: 1.0)
        The server learning rate ``η`` applied to the averaged update of
        every parameter, > 0.
    **kwargs
        Those of :class:`~strategies.base.SparseStrategy`.

    The training config carries :data:`~fedneq.federation.protocol.ELEMENT_KEY`
    = ``"fiarse"``: each client trains its magnitude top-K sub-model.
    Replies are weighted equally, so even at full budget this is not
    Flower's example-weighted FedAvg.
    """

    reply_format = "blocks"

    def __init__(
        self,
        neuron_map: NeuronMap,
        table: Sequence[str],
        *,
        server_lr: float = 1.0,
        **kwargs: Any,
    ) -> None:
        server_lr = check_number("server_lr", server_lr, lambda x: x > 0, "a finite number > 0")
        super().__init__(neuron_map, tuple(table), **kwargs)
        self.server_lr = server_lr
        self.param_keys = parameter_keys(neuron_map) & set(self.table)

    def train_config(self, server_round: int) -> dict[str, ConfigRecordValues]:
        return {ELEMENT_KEY: "fiarse"}

    def aggregate(
        self,
        global_state: dict[str, torch.Tensor],
        updates: list[SparseUpdate],
        weights: list[float],
    ) -> dict[str, torch.Tensor]:
        return fiarse_aggregate(
            global_state, updates, server_lr=self.server_lr, param_keys=self.param_keys
        )
