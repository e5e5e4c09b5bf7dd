"""Server momentum on neuron-wise averages (FedAvgM restricted to sent rows).

Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", https://arxiv.org/abs/1909.06335. With
sparse replies the server step touches only the rows some client sent:

    Δ = neuron_average − global           (updated rows)
    m = β·m + Δ                           (updated rows; other rows of m untouched)
    new = global + η·m                    (updated rows; other rows keep global)

Only parameters take the momentum step; float buffers (BatchNorm running
statistics) take the plain neuron average, so a running variance never
overshoots below zero.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedneq.federation.wire import as_rows
from fedneq.neurons import NeuronMap

from .registry import register_strategy
from .row_rule import RowRule, parameter_keys
from .rows import RowAverage

__all__ = ["MomentumStep", "ServerMomentum", "momentum_step", "parameter_keys"]


@dataclass(frozen=True)
class MomentumStep:
    """The result of :func:`momentum_step`."""

    values: dict[str, torch.Tensor]  # the new global state
    momentum: dict[str, torch.Tensor]  # the new momentum buffers


def momentum_step(
    global_state: Mapping[str, torch.Tensor],
    average: RowAverage,
    momentum: Mapping[str, torch.Tensor],
    keys: Collection[str],
    beta: float = 0.9,
    eta: float = 1.0,
) -> MomentumStep:
    """One server-momentum step on the rows ``average`` updated.

    Parameters
    ----------
    global_state:
        The global model the clients started from.
    average:
        :func:`~strategies.neuron_avg.average_rows` of this round's updates.
    momentum:
        Buffers from the previous step, keyed like the state (missing = zeros).
    keys:
        The state keys that take the momentum step (parameters); other keys
        take ``average.values``.
    beta, eta:
        Momentum factor and server learning rate.
    """
    values = dict(average.values)
    new_momentum = {k: v.clone(memory_format=torch.contiguous_format) for k, v in momentum.items()}
    for key, hit in average.rows.items():
        if key not in keys:
            continue
        old = global_state[key]
        m = new_momentum.get(key)
        if m is None:
            m = torch.zeros_like(old, memory_format=torch.contiguous_format)
        elif m.shape != old.shape:
            raise ValueError(
                f"momentum[{key!r}] has shape {tuple(m.shape)}, global has {tuple(old.shape)}"
            )
        out = average.values[key].clone(memory_format=torch.contiguous_format)
        old_rows, m_rows, out_rows = as_rows(old), as_rows(m), as_rows(out)  # (R, L) views
        delta = as_rows(average.values[key])[hit] - old_rows[hit]
        m_rows[hit] = beta * m_rows[hit] + delta
        out_rows[hit] = old_rows[hit] + eta * m_rows[hit]
        new_momentum[key], values[key] = m, out
    return MomentumStep(values=values, momentum=new_momentum)


@register_strategy("server-momentum")
class ServerMomentum(RowRule):
    """FedAvgM-style server momentum over neuron-wise averages.

    Parameters
    ----------
    beta : float (default: 0.9)
        Momentum factor, in [0, 1).
    eta : float (default: 1.0)
        Server learning rate, > 0.
    **kwargs
        Those of :class:`~strategies.row_rule.RowRule` (``fednova``,
        ``label_split``) and :class:`~strategies.base.SparseStrategy`.

    The momentum buffers are :meth:`state_dict` (keyed by parameter name,
    created on first update).
    """

    def __init__(
        self,
        neuron_map: NeuronMap,
        table: Sequence[str],
        *,
        beta: float = 0.9,
        eta: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if not (math.isfinite(beta) and 0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not (math.isfinite(eta) and eta > 0.0):
            raise ValueError(f"eta must be > 0, got {eta}")
        super().__init__(neuron_map, tuple(table), **kwargs)
        self.beta = beta
        self.eta = eta
        self.momentum: dict[str, torch.Tensor] = {}

    def step(
        self, global_state: dict[str, torch.Tensor], average: RowAverage, total: float
    ) -> dict[str, torch.Tensor]:
        step = momentum_step(
            global_state,
            average,
            self.momentum,
            self.param_keys,
            beta=self.beta,
            eta=self.eta,
        )
        self.momentum = step.momentum
        return step.values

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.momentum.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(state) - self.param_keys)
        if unknown:
            raise ValueError(
                f"momentum keys {unknown} are not parameters of the tensor table; "
                f"allowed: {sorted(self.param_keys)}"
            )
        self.momentum = {k: v.detach().clone() for k, v in state.items()}
